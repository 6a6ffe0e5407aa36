import pytest

from benchutil import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
