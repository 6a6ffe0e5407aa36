"""Pure-PyTorch versions of every pymeta op: the fallback where no native kernel exists,
and the oracle the tests check the kernels against. Each one validates its arguments with
the same messages as the native front, so both backends fail alike.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_same(op: str, t: Tensor, name: str, dtype: torch.dtype, dtype_of: str,
                device: torch.device, device_of: str) -> None:
    """All tensors of one call share a dtype and a device; names the offender."""
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {dtype_of} has {dtype}; "
                        f"all tensors of one call share a dtype")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but {device_of} is on {device}; "
                         f"all tensors of one call share a device")


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
        _check_same(op, t, f"{name}[{i}]", dtype, "params[0]", device, "grads[0]")

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


# ---- lstm_optimizer_step -----------------------------------------------------------------------

LSTM_WEIGHT_NAMES = ("w_ih1", "w_hh1", "b_ih1", "b_hh1", "w_ih2", "w_hh2", "b_ih2", "b_hh2",
                     "w_out", "b_out")
LSTM_MAX_HIDDEN = 64


def lstm_weight_shapes(H: int, n_in: int) -> list[list[int]]:
    """The shapes of the 10 weights, in LSTM_WEIGHT_NAMES order (nn.LSTMCell, nn.Linear)."""
    return [[4 * H, n_in], [4 * H, H], [4 * H], [4 * H], [4 * H, H], [4 * H, H], [4 * H], [4 * H],
            [1, H], [1]]


# log_sign's threshold e^-p must be a normal number of the math dtype (so is then its factor
# e^p): past it, e^p overflows or a flushed e^-p sends a zero grad down the log branch (NaN).
# p <= 87.33 for float32 (bfloat16 states too), 708.39 for float64.
LSTM_MAX_P = {torch.float32: -math.log(torch.finfo(torch.float32).tiny),
              torch.float64: -math.log(torch.finfo(torch.float64).tiny)}


def lstm_max_p_text(dtype: torch.dtype) -> str:
    """LSTM_MAX_P[dtype] rounded down to 2 decimals, as the messages give it."""
    return f"{math.floor(LSTM_MAX_P[dtype] * 100) / 100}"


def check_lstm_optimizer_args(op: str, grad: Tensor, state: Tensor, weights: Sequence[Tensor],
                              preprocessing: str, p: float, out_scale: float) -> tuple[int, int, int]:
    """The argument checks of lstm_optimizer_step, in the order and with the messages of the
    native front. Returns (N, H, n_in)."""
    if preprocessing not in ("log_sign", "none"):
        raise ValueError(f"{op}: preprocessing must be 'log_sign' or 'none', not '{preprocessing}'")
    n_in = 2 if preprocessing == "log_sign" else 1
    if preprocessing == "log_sign" and not (math.isfinite(p) and p > 0):
        raise ValueError(f"{op}: p must be a finite number > 0 for log_sign preprocessing, got {p}")
    if not math.isfinite(out_scale):
        raise ValueError(f"{op}: out_scale must be a finite number, got {out_scale}")
    if grad.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: grad has dtype {grad.dtype}; supported are float32 and float64")
    if grad.dim() != 1:
        raise ValueError(f"{op}: grad must be 1-D [N] (flatten it), got shape {_shape(grad)}")
    if preprocessing == "log_sign" and p > LSTM_MAX_P[grad.dtype]:
        raise ValueError(f"{op}: p = {p} is too large for {str(grad.dtype)[6:]} math: e^-p must "
                         f"be a normal number, p <= {lstm_max_p_text(grad.dtype)}")
    N = grad.shape[0]

    def same(t: Tensor, name: str) -> None:
        _check_same(op, t, name, grad.dtype, "grad", grad.device, "grad")

    if not (state.dtype == grad.dtype
            or (state.dtype == torch.bfloat16 and grad.dtype == torch.float32)):
        raise TypeError(f"{op}: state has dtype {state.dtype} but grad has {grad.dtype}; state "
                        f"shares grad's dtype, or is bfloat16 with float32 grad (bfloat16 "
                        f"storage, float32 math)")
    _check_same(op, state, "state", state.dtype, "grad", grad.device, "grad")
    blocked, blocks = state.dim() == 4, (N + 15) // 16  # (see lstm_state_to_feature_major)
    if not (list(state.shape[::3]) == [blocks, 16] and state.shape[1] == 4 if blocked else
            state.dim() == 3 and state.shape[0] == 4 and state.shape[2] == N):
        raise ValueError(f"{op}: state has shape {_shape(state)}; expected [4, H, N] with N = {N} "
                         f"(h1, c1, h2, c2, feature-major), or the blocked layout "
                         f"[{blocks}, 4, H, 16] ([ceil(N / 16), 4, H, 16])")
    H = state.shape[2 if blocked else 1]
    if not 1 <= H <= LSTM_MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size H = {H} (state.shape[{2 if blocked else 1}]) is not "
                         f"supported; 1 <= H <= {LSTM_MAX_HIDDEN}")
    if not state.is_contiguous():
        layout = "[ceil(N / 16), 4, H, 16], blocked" if blocked else "[4, H, N], feature-major"
        raise ValueError(f"{op}: state must be contiguous (layout {layout})")
    if len(weights) != 10:
        raise ValueError(f"{op}: expected 10 weight tensors, got {len(weights)}")
    for name, w, shape in zip(LSTM_WEIGHT_NAMES, weights, lstm_weight_shapes(H, n_in)):
        same(w, name)
        if list(w.shape) != shape:
            raise ValueError(f"{op}: {name} has shape {_shape(w)}; expected "
                             f"[{', '.join(map(str, shape))}] for H = {H} and n_in = {n_in}")
    return N, H, n_in


def lstm_preprocess(grad: Tensor, preprocessing: str, p: float) -> Tensor:
    """[N] -> [N, n_in]. log_sign: |g| >= e^-p -> (log|g| / p, sign g), else (-1, e^p g)."""
    if preprocessing == "none":
        return grad[:, None]
    a = grad.abs()
    big = a >= math.exp(-p)
    # log of 1 where unused, so that the unused branch has a finite gradient (g = 0).
    x0 = torch.where(big, torch.log(torch.where(big, a, torch.ones_like(a))) / p, -1.0)
    x1 = torch.where(big, torch.sign(grad), grad * math.exp(p))
    return torch.stack([x0, x1], dim=1)


def _lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
               b_hh: Tensor) -> tuple[Tensor, Tensor]:
    z = x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh
    i, f, g, o = z.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def lstm_state_to_feature_major(state: Tensor) -> Tensor:
    """The blocked state layout [B, 4, H, 16] -> feature-major [4, H, 16 B] (a copy;
    differentiable). Blocked, the 4H rows of coordinates 16 b .. 16 b + 15 lie together, so the
    GPU's warp step of 16 coordinates reads and writes one contiguous run. The op on a blocked
    state is the feature-major op on 16 B = 16 ceil(N / 16) coordinates, with grad padded by
    zeros: padding coordinates have state of their own and never reach update."""
    return state.permute(1, 2, 0, 3).clone(memory_format=torch.contiguous_format).view(
        4, state.shape[2], 16 * state.shape[0])


def lstm_state_to_blocked(state: Tensor) -> Tensor:
    """Feature-major [4, H, N] -> the blocked layout [ceil(N / 16), 4, H, 16] (a copy;
    differentiable), padding coordinates zero (the zero state of init_state)."""
    H, N = state.shape[1], state.shape[2]
    pad = -N % 16
    if pad:
        state = torch.nn.functional.pad(state, (0, pad))
    return state.reshape(4, H, (N + pad) // 16, 16).permute(2, 0, 1, 3).clone(
        memory_format=torch.contiguous_format)


def lstm_optimizer_step(grad: Tensor, state: Tensor, w_ih1: Tensor, w_hh1: Tensor, b_ih1: Tensor,
                        b_hh1: Tensor, w_ih2: Tensor, w_hh2: Tensor, b_ih2: Tensor, b_hh2: Tensor,
                        w_out: Tensor, b_out: Tensor, preprocessing: str, p: float,
                        out_scale: float) -> tuple[Tensor, Tensor]:
    """One coordinatewise LSTM optimizer step (see pymeta.ops.lstm_optimizer_step).
    grad [N], state [4, H, N] or blocked [ceil(N / 16), 4, H, 16] -> (update [N], new_state of
    state's shape and dtype). Differentiable. A bfloat16 state is computed in float32 and
    new_state rounded back."""
    weights = (w_ih1, w_hh1, b_ih1, b_hh1, w_ih2, w_hh2, b_ih2, b_hh2, w_out, b_out)
    N, _, _ = check_lstm_optimizer_args("pymeta.lstm_optimizer_step", grad, state, weights,
                                        preprocessing, p, out_scale)
    if state.dim() == 4:  # blocked: the feature-major step on the padded coordinates
        update, new_state = lstm_optimizer_step(
            torch.nn.functional.pad(grad, (0, -N % 16)), lstm_state_to_feature_major(state),
            *weights, preprocessing, p, out_scale)
        return update[:N], lstm_state_to_blocked(new_state)
    x = lstm_preprocess(grad, preprocessing, p)
    h1, c1, h2, c2 = (s.t() for s in state.to(grad.dtype).unbind(0))  # [N, H] each
    h1, c1 = _lstm_cell(x, h1, c1, w_ih1, w_hh1, b_ih1, b_hh1)
    h2, c2 = _lstm_cell(h1, h2, c2, w_ih2, w_hh2, b_ih2, b_hh2)
    update = (h2 @ w_out.t() + b_out).squeeze(1) * out_scale
    new_state = torch.stack([h1.t(), c1.t(), h2.t(), c2.t()]).to(state.dtype).contiguous()
    return update, new_state


def check_lstm_optimizer_backward_args(grad_update: Tensor, grad_new_state: Tensor, grad: Tensor,
                                       state: Tensor, weights: Sequence[Tensor],
                                       preprocessing: str, p: float,
                                       out_scale: float) -> tuple[int, int, int]:
    """The argument checks of lstm_optimizer_step_backward (the native op's messages): those of
    the forward, then the incoming gradients (each of its output's dtype and shape)."""
    op = "pymeta.lstm_optimizer_step_backward"
    N, H, n_in = check_lstm_optimizer_args(op, grad, state, weights, preprocessing, p, out_scale)
    for name, t, like, like_name, shape in (
            ("grad_update", grad_update, grad, "grad", [N]),
            ("grad_new_state", grad_new_state, state, "state", list(state.shape))):
        if t.dtype != like.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {like_name} has {like.dtype}; "
                            f"the gradient of an output has that output's dtype")
        _check_same(op, t, name, t.dtype, "grad", grad.device, "grad")
        if list(t.shape) != shape:
            raise ValueError(f"{op}: {name} has shape {_shape(t)}; expected "
                             f"[{', '.join(map(str, shape))}]")
    return N, H, n_in


def lstm_optimizer_step_backward(grad_update: Tensor, grad_new_state: Tensor, grad: Tensor,
                                 state: Tensor, *args) -> tuple[Tensor, ...]:
    """The backward of lstm_optimizer_step in the native op's layout: args are the 10 weights,
    preprocessing, p, out_scale; returns the gradients of (grad, state, the 10 weights)."""
    weights, (preprocessing, p, out_scale) = args[:10], args[10:]
    check_lstm_optimizer_backward_args(grad_update, grad_new_state, grad, state, weights,
                                       preprocessing, p, out_scale)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (grad, state, *weights)]
        update, new_state = lstm_optimizer_step(*leaves, preprocessing, p, out_scale)
        grads = torch.autograd.grad((update, new_state), leaves, (grad_update, grad_new_state),
                                    allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves))


def check_max_pool2x2_args(op: str, x: Tensor) -> None:
    """The argument checks of max_pool2x2 (the native front's messages)."""
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: x must be float32 or float64, not {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [N, C, H, W]; got {x.dim()} dimensions")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"{op}: x must be at least 2x2 in H and W; got {x.shape[2]}x{x.shape[3]}")
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous (NCHW); call .contiguous() first")


def max_pool2x2(x: Tensor) -> tuple[Tensor, Tensor]:
    """The 2x2, stride-2 max-pool with indices (see pymeta.ops.max_pool2x2):
    x [N, C, H, W] -> (out, indices) [N, C, H // 2, W // 2]. Differentiable."""
    check_max_pool2x2_args("pymeta.max_pool2x2", x)
    return torch.nn.functional.max_pool2d(x, 2, return_indices=True)

