"""Loads the native module and chooses, per call, the native kernel or the reference.

Backends: ``"auto"`` (native where a kernel for the tensor's device is compiled in, else the
reference), ``"native"`` (native or a clear error), ``"reference"`` (pure PyTorch). The
initial value comes from the environment variable ``PYMETA_BACKEND`` (unset or empty:
``"auto"``); a value that names no backend fails ``import pymeta`` with an error naming the
variable (a misconfigured environment must not silently run another backend). Names are
read the same way everywhere (the variable, ``set_backend``, ``use_backend``): case and
surrounding spaces don't matter ("Native" is "native"), and ``get_backend`` returns the
lowercase name.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "native", "reference")

try:  # the module registers the torch.ops.pymeta ops as it loads
    from pymeta import _C  # type: ignore[attr-defined]

    BUILD_INFO: dict = dict(_C.build_info())
    NATIVE = True
    IMPORT_ERROR: str | None = None
except ImportError as e:  # pure-Python install, or a build that failed to load
    _C = None
    BUILD_INFO = {"cpu_kernels": False, "cuda_kernels": False, "cuda_archs": "", "torch_version": None}
    NATIVE = False
    IMPORT_ERROR = str(e)


def _check_name(name: str) -> str:
    """The backend's lowercase name, or a TypeError / ValueError that lists the backends."""
    if not isinstance(name, str):
        raise TypeError(f"pymeta: the backend must be a str, one of {BACKENDS}, "
                        f"not {type(name).__name__} {name!r}")
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"pymeta: unknown backend {name!r}; choose one of {BACKENDS} (any case)")
    return key


def _from_environment() -> str:
    value = os.environ.get("PYMETA_BACKEND", "")
    if not value.strip():
        return "auto"
    try:
        return _check_name(value)
    except ValueError:
        raise ValueError(f"pymeta: unknown backend {value!r} in the environment variable PYMETA_BACKEND; "
                         f"set it to one of {', '.join(BACKENDS)} (any case), or unset it for auto") from None


_backend = _from_environment()


def set_backend(name: str) -> None:
    """Sets the backend for every pymeta op: "auto", "native" or "reference" (any case)."""
    global _backend
    _backend = _check_name(name)


def get_backend() -> str:
    """The active backend name."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ``with pymeta.use_backend("reference"): ...``."""
    global _backend
    previous = _backend
    _backend = _check_name(name)
    try:
        yield
    finally:
        _backend = previous


def native_kernels(device_type: str) -> bool:
    """Whether native kernels for this device type ("cpu", "cuda") are compiled in."""
    if device_type == "cpu":
        return bool(BUILD_INFO.get("cpu_kernels"))
    if device_type == "cuda":
        return bool(BUILD_INFO.get("cuda_kernels"))
    return False


def use_native(op: str, device: torch.device) -> bool:
    """True to run the native kernel of `op` for tensors on `device`, False for the reference."""
    if _backend == "reference":
        return False
    have = native_kernels(device.type)
    if _backend == "native" and not have:
        why = f" (the extension did not load: {IMPORT_ERROR})" if not NATIVE else ""
        raise RuntimeError(
            f"pymeta.{op}: backend 'native' was requested but no native kernel for device "
            f"type '{device.type}' is compiled in{why}; use set_backend('auto') to fall back "
            f"to the reference")
    return have
