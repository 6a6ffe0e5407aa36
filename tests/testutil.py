"""Shared by the tests: devices, dtypes, the tolerance table, and markers. (A plain module,
not conftest.py, so that `from testutil import ...` is unambiguous when tests/ and bench/
are collected together.)"""
import pytest
import torch

import pymeta

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Tolerances of native vs reference, per dtype. The kernels compute 16-bit types in float32
# like the reference, so differences are a rounding or two of the storage type.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}

needs_native = pytest.mark.skipif(not pymeta._backend.NATIVE,
                                  reason="pymeta._C is not built (pure-Python install)")


def device_param(dev):
    marks = [pytest.mark.cuda] if dev == "cuda" else []
    return pytest.param(dev, marks=marks, id=dev)
