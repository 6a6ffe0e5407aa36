"""pymeta.info() and the backend switch (pymeta/_backend.py)."""
import os
import subprocess
import sys

import pytest
import torch

import pymeta
from pymeta import _backend, ops
from testutil import needs_native


def test_info_fields():
    info = pymeta.info()
    for key in ("pymeta", "torch", "native", "cpu_kernels", "cuda_kernels", "cuda_archs",
                "cuda_available", "backend"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert info["native"] == _backend.NATIVE
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["backend"] == pymeta.get_backend()
    if info["cuda_kernels"]:
        assert info["cuda_archs"], "CUDA kernels compiled in but no architecture recorded"


def test_set_get_use_backend():
    pymeta.set_backend("reference")
    assert pymeta.get_backend() == "reference"
    with pymeta.use_backend("native"):
        assert pymeta.get_backend() == "native"
        with pytest.raises(ValueError, match="unknown backend 'fast'"):
            with pymeta.use_backend("fast"):
                pass
        assert pymeta.get_backend() == "native"
    assert pymeta.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        pymeta.set_backend("cuda")


def test_backend_names_ignore_case_and_spaces():
    # One rule for set_backend, use_backend and PYMETA_BACKEND; get_backend gives the lowercase name.
    pymeta.set_backend("Reference")
    assert pymeta.get_backend() == "reference"
    with pymeta.use_backend(" NATIVE "):
        assert pymeta.get_backend() == "native"
    assert pymeta.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown backend ''"):
        pymeta.set_backend("")
    with pytest.raises(TypeError, match="the backend must be a str"):
        pymeta.set_backend(None)
    assert pymeta.get_backend() == "reference"


def test_native_without_kernel_is_a_clear_error():
    p, g = [torch.randn(3, device="meta")], [torch.randn(2, 3, device="meta")]
    with pymeta.use_backend("native"), pytest.raises(RuntimeError, match="no native kernel for device type 'meta'"):
        ops.inner_update(p, g, 0.1)
    with pymeta.use_backend("auto"):  # falls back to the reference, which runs on meta tensors
        assert ops.inner_update(p, g, 0.1)[0].shape == (2, 3)


@needs_native
def test_auto_uses_native_on_cpu(monkeypatch):
    calls = []
    real = torch.ops.pymeta.inner_update

    class Spy:
        def __call__(self, *a):
            calls.append(1)
            return real(*a)

    monkeypatch.setattr(torch.ops.pymeta, "inner_update", Spy())
    with pymeta.use_backend("auto"):
        ops.inner_update([torch.randn(3)], [torch.randn(2, 3)], 0.1)
    with pymeta.use_backend("reference"):
        ops.inner_update([torch.randn(3)], [torch.randn(2, 3)], 0.1)
    assert calls == [1]


def _run_python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_env_var_sets_initial_backend():
    r = _run_python("import pymeta; print(pymeta.get_backend())", PYMETA_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference"
    # A bad value fails the import (rather than run another backend), naming the variable.
    r = _run_python("import pymeta", PYMETA_BACKEND="bogus")
    assert r.returncode != 0
    assert "unknown backend 'bogus' in the environment variable PYMETA_BACKEND" in r.stderr, r.stderr
    assert "auto, native, reference" in r.stderr


def test_env_var_values(monkeypatch):
    # What import reads from PYMETA_BACKEND (in this process: the function import calls).
    for value, name in ((" Native", "native"), ("REFERENCE", "reference"), ("", "auto"), (" ", "auto")):
        monkeypatch.setenv("PYMETA_BACKEND", value)
        assert _backend._from_environment() == name
    monkeypatch.delenv("PYMETA_BACKEND")
    assert _backend._from_environment() == "auto"
    monkeypatch.setenv("PYMETA_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast' in the environment variable PYMETA_BACKEND; set it to one of "
                                         "auto, native, reference"):
        _backend._from_environment()


def test_pure_python_fallback_without_extension():
    # As with PYMETA_NO_EXTENSION=1: pymeta._C cannot be imported, and everything still
    # works through the references; 'native' says why it can't.
    code = (
        "import sys; sys.modules['pymeta._C'] = None\n"
        "import torch, pymeta\n"
        "i = pymeta.info(); assert not i['native'] and not i['cpu_kernels'], i\n"
        "p, g = [torch.randn(3, requires_grad=True)], [torch.randn(2, 3)]\n"
        "out = pymeta.ops.inner_update(p, g, 0.5)[0]\n"
        "assert torch.allclose(out, p[0] - 0.5 * g[0])\n"
        "out.sum().backward(); assert torch.allclose(p[0].grad, torch.full((3,), 2.0))\n"
        "pymeta.set_backend('native')\n"
        "try:\n    pymeta.ops.inner_update(p, g, 0.5)\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    r = _run_python(code)
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "did not load" in r.stdout
