"""Pure-PyTorch versions of every pymeta op: the fallback where no native kernel exists,
and the oracle the tests check the kernels against. Each one validates its arguments with
the same messages as the native front, so both backends fail alike.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_inner_update_args(op: str, params: Sequence[Tensor], grads: Sequence[Tensor],
                            lr_tensors: Sequence[Tensor] | None) -> list[bool]:
    """The argument checks of inner_update; returns which params are shared over tasks."""
    if len(params) == 0:
        raise ValueError(f"{op}: params is an empty list")
    if len(params) != len(grads):
        raise ValueError(f"{op}: params has {len(params)} tensors but grads has {len(grads)}")
    if lr_tensors is not None and len(lr_tensors) != len(grads):
        raise ValueError(f"{op}: lr has {len(lr_tensors)} tensors but params has {len(params)}")
    if grads[0].dim() < 1:
        raise ValueError(f"{op}: grads[0] must have a leading task dimension [T, ...]")
    T = grads[0].shape[0]
    dtype, device = params[0].dtype, grads[0].device
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: params[0] has dtype {dtype}; supported are float32, float64, "
                        f"float16 and bfloat16")

    def check(t: Tensor, name: str, i: int) -> None:
        if t.dtype != dtype:
            raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype} but params[0] has {dtype}; "
                            f"all tensors of one call share a dtype")
        if t.device != device:
            raise ValueError(f"{op}: {name}[{i}] is on {t.device} but grads[0] is on {device}; "
                             f"all tensors of one call share a device")

    shared = []
    for i, (p, g) in enumerate(zip(params, grads)):
        check(p, "params", i)
        check(g, "grads", i)
        if g.dim() < 1 or g.shape[0] != T:
            raise ValueError(f"{op}: grads[{i}] has shape {_shape(g)} but grads[0] has T = {T} "
                             f"tasks; every grads[i] is [T, ...] with the same T")
        if p.shape == g.shape:
            shared.append(False)
        elif p.shape == g.shape[1:]:
            shared.append(True)
        else:
            raise ValueError(f"{op}: params[{i}] has shape {_shape(p)} but grads[{i}] has shape "
                             f"{_shape(g)}; expected {list(g.shape[1:])} (shared over tasks) or "
                             f"{list(g.shape)}")
        if lr_tensors is not None:
            lr = lr_tensors[i]
            check(lr, "lr", i)
            if lr.dim() != 0 and lr.shape != g.shape[1:]:
                raise ValueError(f"{op}: lr[{i}] has shape {_shape(lr)}; expected [] (one rate "
                                 f"for the tensor) or {list(g.shape[1:])} (one rate per element, "
                                 f"the shape of params[{i}])")
    return shared


def inner_update(params: Sequence[Tensor], grads: Sequence[Tensor],
                 lr_tensors: Sequence[Tensor] | None, lr_scalar: float) -> list[Tensor]:
    """out[i] = params[i] - lr_i * grads[i] (see pymeta.ops.inner_update). 16-bit dtypes
    compute in float32, like the kernels. Differentiable by autograd, to any order."""
    check_inner_update_args("pymeta.inner_update", params, grads, lr_tensors)
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        lr = lr_scalar if lr_tensors is None else lr_tensors[i]
        if p.dtype in (torch.float16, torch.bfloat16):
            lr32 = lr if isinstance(lr, float) else lr.float()
            o = (p.float() - lr32 * g.float()).to(p.dtype)
        else:
            o = p - lr * g
        out.append(o.expand(g.shape).contiguous())
    return out


def inner_update_backward(grad_outs: Sequence[Tensor], grads: Sequence[Tensor],
                          lr_tensors: Sequence[Tensor] | None, lr_scalar: float,
                          shared: Sequence[int], need_dparams: bool, need_dgrads: bool,
                          need_dlrs: bool) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The backward of inner_update, in the layout of the native op: (dparams of the
    shared params only, dgrads, dlrs). Differentiable by autograd."""
    dparams, dgrads, dlrs = [], [], []
    for i, (d, g) in enumerate(zip(grad_outs, grads)):
        acc = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
        d_, g_ = d.to(acc), g.to(acc)
        lr = lr_scalar if lr_tensors is None else lr_tensors[i].to(acc)
        if need_dparams and shared[i]:
            dparams.append(d_.sum(0).to(g.dtype))
        if need_dgrads:
            dgrads.append((-lr * d_).to(g.dtype))
        if need_dlrs and lr_tensors is not None:
            prod = -(g_ * d_)
            dl = prod.sum() if lr_tensors[i].dim() == 0 else prod.sum(0)
            dlrs.append(dl.to(lr_tensors[i].dtype))
    return dparams, dgrads, dlrs
