"""Fixtures for the tests (constants and markers live in testutil.py)."""
import pytest

import pymeta
from testutil import DEVICES, device_param


@pytest.fixture(params=[device_param(d) for d in DEVICES])
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _restore_backend():
    before = pymeta.get_backend()
    yield
    pymeta.set_backend(before)
