"""Checks of the Python numbers the public APIs take (rates, p, seeds, step counts): each
refuses a bad value with a TypeError / ValueError that names the argument. A bool is refused
where a number is expected (Python counts True as 1, but a True rate is a mistake), as are
NaN and inf where the value must be finite (they give silent NaN / inf results further in)."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch


def is_real(v: Any) -> bool:
    """A real number (Python's or NumPy's), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _scalar(v: Any, integral: bool) -> Any:
    """A one-element real tensor as its Python number (float() / int() took them, and so did
    the APIs before these checks; on a GPU that reads the value back, as float() did), else
    v unchanged. A bool tensor stays a tensor (refused), as does a floating one where an int
    is wanted."""
    if (isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype != torch.bool
            and not v.is_complex() and not (integral and v.is_floating_point())):
        return v.item()
    return v


def is_int(v: Any) -> bool:
    """An integer (Python's or NumPy's), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def real(where: str, name: str, v: Any, *, finite: bool = True, min: Optional[float] = None,
         gt: Optional[float] = None) -> float:
    """``float(v)``, or an error ``"{where}: {name} must be ..."``. finite: NaN and inf (and
    ints too large for a double) are refused; min / gt: v >= min / v > gt.

    Under torch.compile the value comes back unchecked: a float argument there may be a
    SymFloat, which ``math`` cannot read, and the ops' C++ fronts and fake kernels check it."""
    if torch.compiler.is_compiling():
        return v
    if type(v) is float:  # the usual case, without the ABC check's cost (the op fronts are hot)
        f = v
    elif not is_real(v := _scalar(v, False)):
        raise TypeError(f"{where}: {name} must be a real number, not {type(v).__name__} {v!r}")
    else:
        try:
            f = float(v)
        except OverflowError:
            f = math.inf if v > 0 else -math.inf
    if finite and not math.isfinite(f):
        raise ValueError(f"{where}: {name} must be a finite number, got {v!r}")
    if min is not None and not f >= min:
        raise ValueError(f"{where}: {name} must be >= {min:g}, got {v!r}")
    if gt is not None and not f > gt:
        raise ValueError(f"{where}: {name} must be > {gt:g}, got {v!r}")
    return f


def integer(where: str, name: str, v: Any, *, min: Optional[int] = None) -> int:
    """``int(v)`` for an integer v (Python's or NumPy's, not a bool), or an error naming it."""
    rule = "an int" if min is None else f"an int >= {min}"
    v = _scalar(v, True)
    if not is_int(v):
        raise TypeError(f"{where}: {name} must be {rule}, not {type(v).__name__} {v!r}")
    if min is not None and v < min:
        raise ValueError(f"{where}: {name} must be {rule}, got {v!r}")
    return int(v)
