"""The fused ops of pymeta: Python fronts over ``torch.ops.pymeta``, with their fake kernels
(for ``torch.compile`` and meta tensors) and autograd formulas.

Each front picks the native kernel or the pure-PyTorch reference per call (see
``pymeta.set_backend``). Forward-mode AD (``torch.func.jvp`` / ``jacfwd``, dual tensors) and
``torch.func.grad`` run the reference on every backend: the native ops have no formulas there. Argument checks live in the native op's C++ front and in the
reference, with the same messages; this file checks Python types, list lengths and Python numbers.
"""
from __future__ import annotations

import numbers
from typing import Sequence, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from pymeta import _backend, _checks, reference

LR = Union[float, Tensor, Sequence[Tensor]]


def _split_lr(lr: LR, count: int) -> tuple[list[Tensor] | None, float]:
    if isinstance(lr, bool):
        raise TypeError("pymeta.inner_update: lr must be a float, a tensor or a list of tensors, not a bool")
    if isinstance(lr, numbers.Real):  # (Python and NumPy numbers)
        return None, _checks.real("pymeta.inner_update", "lr", lr)
    if isinstance(lr, Tensor):  # one [] rate for every tensor
        if lr.dim() != 0:
            raise ValueError(f"pymeta.inner_update: lr given as one tensor must have shape []; "
                             f"got {list(lr.shape)} (pass a list for per-tensor rates)")
        return [lr] * count, 0.0
    if isinstance(lr, (list, tuple)):
        for i, x in enumerate(lr):
            if not isinstance(x, Tensor):
                raise TypeError(f"pymeta.inner_update: lr[{i}] is a {type(x).__name__}, not a Tensor")
        return list(lr), 0.0
    raise TypeError(f"pymeta.inner_update: lr must be a float, a tensor or a list of tensors, "
                    f"not {type(lr).__name__}")


def _is_vmapped(x: Tensor) -> bool:
    return torch._C._functorch.is_batchedtensor(x)


def _needs_reference(tensors, vmap_rule: bool = False) -> bool:
    """Whether a transform the native ops have no formula for sees these tensors: forward-mode
    AD (dual tensors of torch.autograd.forward_ad; torch.func.jvp / jacfwd) or torch.func.grad,
    and, for an op without a vmap rule (``vmap_rule=False``), vmap too (torch's per-sample
    fallback would run the native op under the transforms below it). The native ops would
    drop the tangents there (zeros, silently) or fail, so the fronts run the reference, whose
    PyTorch ops compose with every transform. inner_update's vmap rule calls the front again,
    one level down, so the check repeats under each vmap. Both checks cost nothing when no
    transform is active."""
    if torch._C._functorch.maybe_current_level() is not None:
        wrapped = [t for t in tensors if torch._C._functorch.is_functorch_wrapped_tensor(t)]
        if wrapped and (not vmap_rule or not all(_is_vmapped(t) for t in wrapped)):
            return True
    # (unpack_dual has no batching rule: a BatchedTensor is seen again inside the vmap rule)
    return fwAD._current_level >= 0 and any(
        not _is_vmapped(t) and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _tensor_list(xs, name: str) -> list[Tensor]:
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"pymeta.inner_update: {name} must be a list of tensors, "
                        f"not {type(xs).__name__}")
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"pymeta.inner_update: {name}[{i}] is a {type(x).__name__}, not a Tensor")
    return list(xs)


def inner_update(params: Sequence[Tensor], grads: Sequence[Tensor], lr: LR) -> list[Tensor]:
    """One MAML inner-loop SGD step for every tensor of a model and every task, in one launch:
    ``out[i] = params[i] - lr_i * grads[i]``.

    Args:
        params: N tensors. ``params[i]`` is ``S_i`` (shared by all tasks, e.g. the
            meta-parameters at the first inner step; broadcast, never copied T times) or
            ``[T, *S_i]`` (one copy per task).
        grads: N tensors ``[T, *S_i]``, the per-task gradients.
        lr: a float (plain MAML); a ``[]`` tensor for all tensors; or a list of N tensors,
            each ``[]`` (MAML++ per-layer per-step rate) or ``S_i`` (Meta-SGD per-parameter
            rate). Rate tensors may require grad.

    Returns:
        N new tensors ``[T, *S_i]``. Inputs are never modified.

    All tensors share one device and one floating dtype (float32, float64, float16 or
    bfloat16; the 16-bit types compute in float32). Differentiable: the backward is one fused
    launch (plus one small launch that folds the sums of ``[]`` rates); the gradient of a
    shared param is summed over tasks, ``dgrad = -lr * dout``, and the rate's gradient is
    reduced to its shape. Gradients flow on into the graph that produced ``grads``, so
    second-order MAML works. The backward is itself differentiable (its own backward runs as
    PyTorch ops), so ``create_graph=True`` through it, i.e. third order, is supported too.
    """
    params = _tensor_list(params, "params")
    grads = _tensor_list(grads, "grads")
    if not grads:
        raise ValueError("pymeta.inner_update: params is an empty list" if not params
                         else "pymeta.inner_update: grads is an empty list")
    if len(params) != len(grads):  # (before _InnerUpdateFunction splits its flat arguments)
        raise ValueError(f"pymeta.inner_update: params has {len(params)} tensors but grads has "
                         f"{len(grads)}")
    lr_tensors, lr_scalar = _split_lr(lr, len(grads))
    if lr_tensors is not None and any(_is_vmapped(x) for x in lr_tensors):
        return reference.inner_update(params, grads, lr_tensors, lr_scalar)
    if _needs_reference(params + grads + (lr_tensors or []), vmap_rule=True):
        return reference.inner_update(params, grads, lr_tensors, lr_scalar)
    if _backend.use_native("inner_update", grads[0].device):
        args = (params, grads, lr_tensors, lr_scalar)
        # eager and outside torch.func transforms: the registered op's autograd wrapper costs
        # more than the kernels at MAML's sizes (as for lstm_optimizer_step, below)
        if (not torch.compiler.is_compiling()
                and torch._C._functorch.maybe_current_level() is None):
            tensors = params + grads + (lr_tensors or [])
            if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
                return list(_InnerUpdateFunction.apply(len(grads), lr_tensors is not None,
                                                       lr_scalar, *tensors))
            return _below_autograd(torch.ops.pymeta.inner_update, args)
        return torch.ops.pymeta.inner_update(*args)
    return reference.inner_update(params, grads, lr_tensors, lr_scalar)


# ---- registrations on the native ops (only when the extension is built) -------------------

def _needs(flag) -> bool:
    return any(bool(f) for f in flag) if isinstance(flag, (list, tuple)) else bool(flag)


if _backend.NATIVE:

    @torch.library.register_fake("pymeta::inner_update")
    def _inner_update_fake(params, grads, lr_tensors, lr_scalar):
        reference.check_inner_update_args("pymeta.inner_update", params, grads, lr_tensors)
        return [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]

    @torch.library.register_fake("pymeta::inner_update_backward")
    def _inner_update_backward_fake(grad_outs, grads, lr_tensors, lr_scalar, shared,
                                    need_dparams, need_dgrads, need_dlrs):
        dparams = [g.new_empty(g.shape[1:]) for g, s in zip(grads, shared) if s] if need_dparams else []
        dgrads = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads] if need_dgrads else []
        dlrs = ([torch.empty_like(x, memory_format=torch.contiguous_format) for x in lr_tensors]
                if need_dlrs and lr_tensors is not None else [])
        return dparams, dgrads, dlrs

    def _inner_update_setup(ctx, inputs, output):
        params, grads, lr_tensors, lr_scalar = inputs
        ctx.shared = [int(p.shape != g.shape) for p, g in zip(params, grads)]
        ctx.lr_scalar = lr_scalar
        ctx.count = len(grads)
        ctx.has_lr = lr_tensors is not None
        # grads are needed only for the rates' gradient; don't keep them alive otherwise.
        ctx.keep_grads = ctx.has_lr and any(x.requires_grad for x in lr_tensors)
        ctx.save_for_backward(*(grads if ctx.keep_grads else []), *(lr_tensors or []))

    def _inner_update_grads(ctx, grad_outs, need_p, need_g, need_lr):
        """(dparams, dgrads, dlrs), each a list of count (None where not needed; dlrs None
        without rate tensors), from the incoming gradients: the backward of both the
        registration and _InnerUpdateFunction."""
        saved = ctx.saved_tensors
        n_grads = ctx.count if ctx.keep_grads else 0
        grad_outs = list(grad_outs)
        grads = list(saved[:n_grads]) if ctx.keep_grads else grad_outs  # stand-ins: shapes only
        lrs = list(saved[n_grads:]) if ctx.has_lr else None
        need_lr = ctx.has_lr and ctx.keep_grads and need_lr
        args = (grad_outs, grads, lrs, ctx.lr_scalar, ctx.shared, need_p, need_g, need_lr)
        # tangents that arrive with the incoming gradients (forward-over-reverse with dual
        # grad_outputs) need the reference's PyTorch ops, as in the forward
        if _needs_reference(grad_outs):
            dps, dgs, dls = reference.inner_update_backward(*args)
        elif (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
              and torch._C._functorch.maybe_current_level() is None):
            # (a backward without create_graph: no double backward to record)
            dps, dgs, dls = _below_autograd(torch.ops.pymeta.inner_update_backward, args)
        else:
            dps, dgs, dls = torch.ops.pymeta.inner_update_backward(*args)
        none = [None] * ctx.count
        dparams = none
        if need_p:  # a per-task param's gradient is dout itself
            it = iter(dps)
            dparams = [next(it) if s else d for s, d in zip(ctx.shared, grad_outs)]
        return (dparams, list(dgs) if need_g else none,
                (list(dls) if need_lr else none) if ctx.has_lr else None)

    def _inner_update_backward(ctx, grad_outs):
        nig = ctx.needs_input_grad
        return (*_inner_update_grads(ctx, grad_outs, _needs(nig[0]), _needs(nig[1]),
                                     _needs(nig[2])), None)

    torch.library.register_autograd("pymeta::inner_update", _inner_update_backward,
                                    setup_context=_inner_update_setup)

    class _InnerUpdateFunction(torch.autograd.Function):
        """The registration's autograd formula (_inner_update_setup, _inner_update_grads) for
        the eager front, on flat tensor arguments: (count, has_lr, lr_scalar, *params, *grads,
        *lr_tensors). The registered path's Python wrapper (torch's register_autograd: schema
        defaults, list flattening) cost ~0.4 ms per forward + backward on the 2-core VM, about
        as much as the kernels of a 25-task sinusoid MAML step. The forward runs the op below
        autograd; the backward op keeps its registered formula (create_graph, second order)."""

        @staticmethod
        def forward(ctx, count, has_lr, lr_scalar, *tensors):
            params, grads = list(tensors[:count]), list(tensors[count:2 * count])
            lr_tensors = list(tensors[2 * count:]) if has_lr else None
            args = (params, grads, lr_tensors, lr_scalar)
            out = _below_autograd(torch.ops.pymeta.inner_update, args)
            _inner_update_setup(ctx, args, out)
            return tuple(out)

        @staticmethod
        def backward(ctx, *grad_outs):
            n, nig = ctx.count, ctx.needs_input_grad[3:]
            dps, dgs, dls = _inner_update_grads(ctx, grad_outs, any(nig[:n]), any(nig[n:2 * n]),
                                                any(nig[2 * n:]))
            flat = [*dps, *dgs, *(dls or [])]
            return (None, None, None, *(g if need else None for g, need in zip(flat, nig)))

    # The backward's own backward (for create_graph=True through inner_update). It is linear
    # in grad_outs, so plain PyTorch ops are enough here.
    def _inner_update_backward_setup(ctx, inputs, output):
        grad_outs, grads, lr_tensors, lr_scalar, shared, need_p, need_g, need_lr = inputs
        ctx.flags = (list(shared), need_p, need_g, need_lr and lr_tensors is not None, lr_scalar)
        ctx.count = len(grads)
        ctx.has_lr = lr_tensors is not None
        ctx.save_for_backward(*grad_outs, *grads, *(lr_tensors or []))

    def _inner_update_double_backward(ctx, d_dparams, d_dgrads, d_dlrs):
        shared, need_p, need_g, need_lr, lr_scalar = ctx.flags
        n = ctx.count
        saved = ctx.saved_tensors
        douts, grads = saved[:n], saved[n:2 * n]
        lrs = saved[2 * n:] if ctx.has_lr else None
        it_p = iter(d_dparams)
        g_douts, g_grads, g_lrs = [], [], []
        for i in range(n):
            d, g = douts[i], grads[i]
            lr = lr_scalar if lrs is None else lrs[i]
            acc = torch.zeros_like(d)
            if need_p and shared[i]:
                acc = acc + next(it_p)
            if need_g:
                acc = acc - lr * d_dgrads[i]
            gg = torch.zeros_like(g)
            gl = None
            if need_lr:
                c = d_dlrs[i]
                acc = acc - g * c
                gg = -d * c
            if lrs is not None:
                gl = (-(d * d_dgrads[i]).sum() if lrs[i].dim() == 0 else -(d * d_dgrads[i]).sum(0)) \
                    if need_g else torch.zeros_like(lrs[i])
                g_lrs.append(gl)
            g_douts.append(acc)
            g_grads.append(gg)
        return g_douts, g_grads, (g_lrs if lrs is not None else None), None, None, None, None, None

    torch.library.register_autograd("pymeta::inner_update_backward", _inner_update_double_backward,
                                    setup_context=_inner_update_backward_setup)

    # vmap: an extra batch dimension B over (params, grads) folds into the task dimension,
    # so a vmapped call is still one launch. Shared params that are not batched stay shared.
    # Batched rates never get here: functorch can't unwrap a batched Tensor[]? argument
    # (torch 2.14 asserts), so the front sends those calls to the reference.
    def _inner_update_vmap(info, in_dims, params, grads, lr_tensors, lr_scalar):
        B = info.batch_size
        p_dims, g_dims = in_dims[0], in_dims[1]
        l_dims = in_dims[2] if lr_tensors is not None else None
        n = len(grads)

        def first(x, d):  # batch dim first, materialized by expand when x is not batched
            return x.movedim(d, 0) if d is not None else x.expand(B, *x.shape)

        if l_dims is not None and any(d is not None for d in l_dims):
            raise NotImplementedError("pymeta.inner_update: vmap over the rates runs through the "
                                      "reference (pymeta.ops.inner_update does this)")
        ps, gs, task_shapes = [], [], []
        for p, g, pd, gd in zip(params, grads, p_dims, g_dims):
            g = first(g, gd)  # [B, T, *S]
            T, S = g.shape[1], g.shape[2:]
            task_shapes.append((T, S))
            gs.append(g.reshape(B * T, *S))
            logical_shared = (p.dim() - (pd is not None)) == len(S)
            if pd is None and logical_shared:
                ps.append(p)  # still shared by every (batch, task) pair: no copy
            elif logical_shared:  # one copy per batch element, shared by its tasks
                ps.append(p.movedim(pd, 0).unsqueeze(1).expand(B, T, *S).reshape(B * T, *S))
            else:
                ps.append(first(p, pd).reshape(B * T, *S))
        # through the front, so that a transform below this vmap (jvp, grad) is checked again
        outs = inner_update(ps, gs, lr_tensors if lr_tensors is not None else lr_scalar)
        return [o.view(B, T, *S) for o, (T, S) in zip(outs, task_shapes)], [0] * n

    torch.library.register_vmap("pymeta::inner_update", _inner_update_vmap)

# ---- lstm_optimizer_step -----------------------------------------------------------------------

def _below_autograd(op, args):
    """op(*args) where no gradient is recorded (grad mode off, or no input requiring grad),
    eager and outside torch.func transforms: straight to the kernel, as the registered autograd
    kernel's own no-grad branch does after ~15 us of Python per call (the 2-core VM), which a
    10k-coordinate step's GPU kernel takes in all."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def lstm_optimizer_step(grad: Tensor, state: Tensor, w_ih1: Tensor, w_hh1: Tensor, b_ih1: Tensor,
                        b_hh1: Tensor, w_ih2: Tensor, w_hh2: Tensor, b_ih2: Tensor, b_hh2: Tensor,
                        w_out: Tensor, b_out: Tensor, preprocessing: str = "log_sign",
                        p: float = 10.0, out_scale: float = 0.1) -> tuple[Tensor, Tensor]:
    """One step of the coordinatewise LSTM optimizer (Andrychowicz et al. 2016), fused.

    Every coordinate n is one batch element of: x = preprocess(grad[n]); two stacked
    LSTM cells of hidden size H (shared weights, PyTorch gate order i, f, g, o); a linear head;
    ``update[n] = out_scale * (w_out @ h2 + b_out)``. The caller applies ``theta + update``.

    Args:
        grad: ``[N]``, the flat gradient (float32 or float64).
        state: ``[4, H, N]``, contiguous: (h1, c1, h2, c2), feature-major, so that for one
            feature the N coordinates are contiguous (coalesced GPU access). 1 <= H <= 64.
            grad's dtype, or bfloat16 with a float32 grad: bfloat16 storage (half the memory
            of the state: 8 H bytes per coordinate instead of 16 H), float32 math; new_state is then the
            float32 result rounded to bfloat16 (nearest even), and the gradient w.r.t. state
            is bfloat16 too.
            Or the blocked layout ``[ceil(N / 16), 4, H, 16]``, contiguous: the 4H rows of
            coordinates 16 b .. 16 b + 15 together (``reference.lstm_state_to_blocked``), so
            that a GPU warp's 16 coordinates are one contiguous run. The step is then the
            feature-major step on the 16 ceil(N / 16) coordinates with grad padded by zeros
            (padding coordinates keep state of their own and never reach update). The CUDA
            forward reads it directly at H 17..20 and 25..32 (float32 math; on an H100 at
            H = 20 and N = 10M, 3.09 ms against 3.27 feature-major with a float32 state, 2.43
            against 3.22 with a bfloat16 one); elsewhere (the CPU, the backward) the op
            converts around the feature-major kernels.
        w_ih1 ``[4H, n_in]``, w_hh1 ``[4H, H]``, b_ih1, b_hh1 ``[4H]``: layer 1, as
            ``nn.LSTMCell(n_in, H)``; w_ih2, w_hh2 ``[4H, H]``, b_ih2, b_hh2 ``[4H]``: layer 2,
            as ``nn.LSTMCell(H, H)``; w_out ``[1, H]``, b_out ``[1]``: ``nn.Linear(H, 1)``.
            All of grad's dtype and device (float32 weights with a bfloat16 state).
        preprocessing: ``"log_sign"`` (n_in = 2): ``|g| >= e^-p -> (log|g| / p, sign g)``, else
            ``(-1, e^p g)``; ``"none"`` (n_in = 1): x = g.
        p: the log_sign parameter: a real number > 0 such that e^-p is a normal number of the
            math dtype, i.e. p <= 87.33 for float32, 708.39 for float64 (past that e^p overflows
            or e^-p flushes, and zero grads become NaN). Unused by ``"none"``.
        out_scale: the factor of the head's output, a finite real number.

    Returns:
        ``(update [N], new_state)``, new tensors (update of grad's dtype, new_state of state's
        dtype and shape).

    Differentiable w.r.t. every tensor (truncated BPTT through many steps). The backward
    recomputes the step from its inputs (the saved memory of a step is its inputs), and sums
    the weight gradients over coordinates in a fixed order: bitwise reproducible.
    """
    weights = (w_ih1, w_hh1, b_ih1, b_hh1, w_ih2, w_hh2, b_ih2, b_hh2, w_out, b_out)
    for name, t in zip(("grad", "state") + reference.LSTM_WEIGHT_NAMES, (grad, state) + weights):
        if not isinstance(t, Tensor):
            raise TypeError(f"pymeta.lstm_optimizer_step: {name} is a {type(t).__name__}, "
                            f"not a Tensor")
    if not isinstance(preprocessing, str):
        raise TypeError(f"pymeta.lstm_optimizer_step: preprocessing must be a str, "
                        f"not {type(preprocessing).__name__}")
    # (p is unused by "none": any real number goes)
    p = _checks.real("pymeta.lstm_optimizer_step", "p", p, finite=preprocessing == "log_sign")
    out_scale = _checks.real("pymeta.lstm_optimizer_step", "out_scale", out_scale)
    if _backend.use_native("lstm_optimizer_step", grad.device) and not _needs_reference(
            (grad, state) + weights):
        args = (grad, state, *weights, preprocessing, p, out_scale)
        # (an autograd.Function that sets up in forward is refused under torch.func
        # transforms, even with none of its inputs wrapped: those keep the registered op)
        if (not torch.compiler.is_compiling()
                and torch._C._functorch.maybe_current_level() is None):
            if torch.is_grad_enabled() and any(t.requires_grad for t in args[:12]):
                return _LstmStepFunction.apply(*args)
            return _below_autograd(torch.ops.pymeta.lstm_optimizer_step, args)
        return torch.ops.pymeta.lstm_optimizer_step(*args)
    return reference.lstm_optimizer_step(grad, state, *weights, preprocessing, p, out_scale)


if _backend.NATIVE:

    @torch.library.register_fake("pymeta::lstm_optimizer_step")
    def _lstm_optimizer_step_fake(grad, state, *args):
        weights, (preprocessing, p, out_scale) = args[:10], args[10:]
        N, _, _ = reference.check_lstm_optimizer_args(
            "pymeta.lstm_optimizer_step", grad, state, weights, preprocessing, p, out_scale)
        return grad.new_empty([N]), state.new_empty(state.shape)

    @torch.library.register_fake("pymeta::lstm_optimizer_step_backward")
    def _lstm_optimizer_step_backward_fake(grad_update, grad_new_state, grad, state, *args):
        weights, (preprocessing, p, out_scale) = args[:10], args[10:]
        N, _, _ = reference.check_lstm_optimizer_backward_args(
            grad_update, grad_new_state, grad, state, weights, preprocessing, p, out_scale)
        return (grad.new_empty([N]), state.new_empty(state.shape),
                *(w.new_empty(w.shape) for w in weights))

    def _lstm_setup(ctx, inputs, output):
        # The step's inputs only: the backward recomputes the gates from them.
        ctx.cfg = inputs[12:]
        ctx.save_for_backward(*inputs[:12])

    def _lstm_backward(ctx, d_update, d_new_state):
        grad, state, *weights = ctx.saved_tensors
        if d_update is None:
            d_update = grad.new_zeros(grad.shape)
        if d_new_state is None:
            d_new_state = state.new_zeros(state.shape)
        args = (d_update, d_new_state, grad, state, *weights, *ctx.cfg)
        if _needs_reference((d_update, d_new_state)):  # as in inner_update's
            outs = reference.lstm_optimizer_step_backward(*args)
        elif (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
              and torch._C._functorch.maybe_current_level() is None):
            # (the usual backward, without create_graph: no double backward to record)
            outs = _below_autograd(torch.ops.pymeta.lstm_optimizer_step_backward, args)
        else:
            outs = torch.ops.pymeta.lstm_optimizer_step_backward(*args)
        return (*(g if need else None for g, need in zip(outs, ctx.needs_input_grad)),
                None, None, None)

    torch.library.register_autograd("pymeta::lstm_optimizer_step", _lstm_backward,
                                    setup_context=_lstm_setup)

    class _LstmStepFunction(torch.autograd.Function):
        """The same autograd formula as the op's registration above, for the eager front. The
        registered path's Python wrapper costs about as much as the kernels at N = 200k on a
        GPU: torch's fill_defaults alone rebuilds the 15-argument schema's list ~31 times per
        call (92 us on the 2-core VM), and the 20-step unroll at N = 200k took 22.6 ms through
        it against 14.3 through this (H100). Inside forward the op runs below autograd (its
        output's history is this Function's); the backward op keeps its own registered formula
        (double backward), used when the backward itself is recorded (create_graph)."""

        @staticmethod
        def forward(ctx, *args):
            out = _below_autograd(torch.ops.pymeta.lstm_optimizer_step, args)
            _lstm_setup(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, d_update, d_new_state):
            return _lstm_backward(ctx, d_update, d_new_state)

    # The backward's own backward (second order, e.g. gradgradcheck): rare, so it runs the
    # reference twice through autograd rather than a kernel of its own.
    def _lstm_backward_setup(ctx, inputs, output):
        ctx.cfg = inputs[14:]
        ctx.save_for_backward(*inputs[:14])

    def _lstm_double_backward(ctx, *grad_outs):
        leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        d_update, d_new_state, grad, state, *weights = leaves
        with torch.enable_grad():
            update, new_state = reference.lstm_optimizer_step(grad, state, *weights, *ctx.cfg)
            inputs = [grad, state, *weights]
            firsts = torch.autograd.grad((update, new_state), inputs, (d_update, d_new_state),
                                         create_graph=True, allow_unused=True)
            pairs = [(f, g) for f, g in zip(firsts, grad_outs)
                     if f is not None and g is not None and f.requires_grad]
            seconds = torch.autograd.grad([f for f, _ in pairs], leaves, [g for _, g in pairs],
                                          allow_unused=True) if pairs else [None] * len(leaves)
        return (*(torch.zeros_like(x) if s is None else s for s, x in zip(seconds, leaves)),
                None, None, None)

    torch.library.register_autograd("pymeta::lstm_optimizer_step_backward",
                                    _lstm_double_backward, setup_context=_lstm_backward_setup)


def max_pool2x2(x: Tensor) -> tuple[Tensor, Tensor]:
    """The 2x2, stride-2 max-pool of the Conv-4 blocks (no padding, floor mode), with the
    values, indices and gradients of ``F.max_pool2d(x, 2, return_indices=True)``, bit for bit:
    on ties the first element of a window (row-major) wins, and NaN propagates.

    Args:
        x: ``[N, C, H, W]``, contiguous (NCHW), float32 or float64, H and W >= 2.

    Returns:
        ``(out, indices)``, both ``[N, C, H // 2, W // 2]``; ``indices`` (int64) holds the flat
        position ``ih * W + iw`` of each window's maximum inside its ``[H, W]`` plane.

    Differentiable in x to any order: the backward is aten's max_pool2d_with_indices_backward
    on the indices (whose own backward is a gather). The native kernel is CPU only (torch's
    own NCHW max-pool runs one scalar window at a time there, about 10x slower at Conv-4
    sizes); on other devices every backend runs F.max_pool2d, which is fast on the GPU.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"pymeta.max_pool2x2: x is a {type(x).__name__}, not a Tensor")
    if (x.device.type == "cpu" and _backend.use_native("max_pool2x2", x.device)
            and not _needs_reference((x,))):
        return torch.ops.pymeta.max_pool2x2(x)
    return reference.max_pool2x2(x)


if _backend.NATIVE:

    @torch.library.register_fake("pymeta::max_pool2x2")
    def _max_pool2x2_fake(x):
        reference.check_max_pool2x2_args("pymeta.max_pool2x2", x)
        shape = [*x.shape[:2], x.shape[2] // 2, x.shape[3] // 2]
        return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)

    def _max_pool2x2_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[1])

    def _max_pool2x2_backward(ctx, d_out, _d_indices):
        # aten's own backward on the same indices: max_pool2d's gradient, and differentiable
        # (its backward is a gather), so second-order MAML runs through it. (A kernel of our
        # own that wrote the zeros in the same pass measured no faster: 5.5 vs 5.0 ms at
        # [75, 128, 28, 28], slower on smaller planes.)
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            d_out, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)

    torch.library.register_autograd("pymeta::max_pool2x2", _max_pool2x2_backward,
                                    setup_context=_max_pool2x2_setup)
