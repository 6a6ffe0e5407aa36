"""Batched MAML, MAML++ (per-layer per-step rates, multi-step loss), Meta-SGD and ANIL:
the inner loop of every task at once.

Per inner step, one forward over the T tasks computes the T support losses (the model's own
batched ``forward_tasks`` for ``models.Conv4`` and ``models.MLP``, a ``vmap``-ed functional
forward for any other module), one ``autograd.grad`` of their sum gives every task's gradient in its own slice
(tasks are independent), and one ``pymeta.ops.inner_update`` updates every adapted tensor of
every task in a single fused launch.

BatchNorm: inside ``adapt``, ``predict`` and ``meta_loss`` every BatchNorm layer normalizes
with the batch statistics of each task's own inputs (the transductive setting of the MAML
papers), in training and in eval mode alike, and its running statistics (and
``num_batches_tracked``) are never read nor updated. Dropout and other random layers draw
independently per task, and follow the wrapped module's train/eval mode.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from pymeta import _checks, models, ops

__all__ = ["MAML", "CapturedMetaStep"]

_TASK_BATCHED = (models.Conv4, models.MLP)  # models with forward_tasks (see _forward_tasks)

LR_MODES = ("scalar", "per_layer_step", "per_param")

AdaptSpec = Union[None, Sequence[str], Callable[[str, nn.Parameter], bool]]
LossFn = Callable[[Tensor, Tensor], Tensor]


def _shape(t: Tensor) -> list:
    return list(t.shape)


def _is_real_tensor(t: Tensor) -> bool:
    return not t.is_complex() and t.dtype != torch.bool


class MAML(nn.Module):
    """Wraps any ``nn.Module`` for batched MAML-family meta-learning.

    Args:
        model: the network; called on one task's batch ``[K, ...]``.
        inner_lr: inner-loop rate α (the initial value of learnable rates): one finite
            number >= 0 in every lr_mode.
        inner_steps: inner SGD steps per task (>= 1).
        first_order: drop the second-order terms (FOMAML): inner gradients are treated as
            constants, θ' = θ - α·stopgrad(g); meta-gradients still reach θ and the rates.
        lr_mode: ``"scalar"`` (one fixed α), ``"per_layer_step"`` (MAML++: a learnable []
            rate per adapted tensor per step, ``self.step_lrs`` of shape
            ``[inner_steps, n_adapted]``), or ``"per_param"`` (Meta-SGD: a learnable rate
            tensor shaped like each adapted parameter, ``self.param_lrs``, used at every step).
        adapt: which parameters the inner loop adapts: None (all), a list of parameter names
            (or module names, meaning all of that module's parameters), or a predicate
            ``f(name, param) -> bool``. The others stay shared by all tasks (ANIL: adapt only
            the head).
        checkpoint_steps: second order only: keep just each inner step's inputs (the
            adapted parameters) and rerun the step in the backward to rebuild its graph.
            The graph of the inner loop otherwise grows by one support forward and
            backward per step; this trades that memory for one more support forward and
            backward per step (measured in bench/RESULTS.md). Same meta-gradients (dropout
            masks are replayed). No effect for first order or without grad (no inner graph
            is kept there).

    Learnable rates are parameters of this module, so ``torch.optim.Adam(maml.parameters())``
    meta-trains model and rates together. Names in ``adapted_names`` and in the dicts below
    are the wrapped model's own parameter names.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1,
                 first_order: bool = False, lr_mode: str = "scalar", adapt: AdaptSpec = None,
                 checkpoint_steps: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"pymeta.MAML: model must be an nn.Module, not {type(model).__name__}")
        if lr_mode not in LR_MODES:
            raise ValueError(f"pymeta.MAML: unknown lr_mode {lr_mode!r}; choose one of {LR_MODES}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"pymeta.MAML: inner_steps must be an int >= 1, got {inner_steps!r}")
        inner_lr = self._inner_lr_value(inner_lr)
        # bool(x) would turn the string "False" into True
        for name, flag in (("first_order", first_order), ("checkpoint_steps", checkpoint_steps)):
            if not isinstance(flag, bool):
                raise TypeError(f"pymeta.MAML: {name} must be a bool (True or False), not "
                                f"{type(flag).__name__} {flag!r}")
        self.module = model
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.checkpoint_steps = checkpoint_steps
        self.lr_mode = lr_mode
        self.adapted_names: List[str] = self._select(model, adapt)
        params = dict(model.named_parameters())
        if lr_mode == "per_layer_step":
            p0 = params[self.adapted_names[0]]
            self.step_lrs = nn.Parameter(torch.full((inner_steps, len(self.adapted_names)),
                                                    self.inner_lr, dtype=p0.dtype, device=p0.device))
        elif lr_mode == "per_param":
            self.param_lrs = nn.ParameterList(
                [nn.Parameter(torch.full_like(params[n], self.inner_lr, requires_grad=False))
                 for n in self.adapted_names])
        # functional_call with these set to None makes every BatchNorm use batch statistics
        # and leaves its buffers alone (see the module docstring).
        self._bn_none: Dict[str, None] = {}
        for mname, m in model.named_modules():
            if isinstance(m, _BatchNorm):
                for b in ("running_mean", "running_var", "num_batches_tracked"):
                    if getattr(m, b, None) is not None:
                        self._bn_none[f"{mname}.{b}" if mname else b] = None

    # ---- selection and checks ------------------------------------------------------------

    @staticmethod
    def _inner_lr_value(inner_lr) -> float:
        """inner_lr is one number in every lr_mode (the initial value of the learnable rates
        of per_layer_step and per_param): a real number or a one-element real tensor."""
        if isinstance(inner_lr, Tensor) and inner_lr.numel() == 1 and _is_real_tensor(inner_lr):
            inner_lr = float(inner_lr)
        return _checks.real("pymeta.MAML", "inner_lr", inner_lr, min=0)

    @staticmethod
    def _select(model: nn.Module, adapt: AdaptSpec) -> List[str]:
        named = list(model.named_parameters())
        if adapt is None:
            names = [n for n, _ in named]
        elif callable(adapt):
            names = [n for n, p in named if adapt(n, p)]
        elif isinstance(adapt, str) or not isinstance(adapt, (list, tuple, set, frozenset)):
            raise TypeError(f"pymeta.MAML: adapt must be None, a list of names or a predicate "
                            f"f(name, param) -> bool, not {type(adapt).__name__}")
        else:
            all_names = [n for n, _ in named]
            wanted = set()
            for a in adapt:
                if not isinstance(a, str):
                    raise TypeError(f"pymeta.MAML: adapt must list names (str); got {a!r}")
                hits = [n for n in all_names if n == a or n.startswith(a + ".")]
                if not hits:
                    raise ValueError(f"pymeta.MAML: adapt names {a!r}, which is neither a parameter "
                                     f"nor a module with parameters of the model; its parameters "
                                     f"are {all_names}")
                wanted.update(hits)
            names = [n for n in all_names if n in wanted]
        if not names:
            raise ValueError("pymeta.MAML: adapt selects no parameter of the model; the inner "
                             "loop needs at least one parameter to adapt")
        return names

    @staticmethod
    def _check_tasks(**tensors: Tensor) -> int:
        T, first = None, None
        for name, t in tensors.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"pymeta.MAML: {name} must be a Tensor, not {type(t).__name__}")
            if t.dim() < 2:
                raise ValueError(f"pymeta.MAML: {name} has shape {_shape(t)}; expected "
                                 f"[T, K, ...] (tasks, examples per task, ...)")
            if T is None:
                T, first = t.shape[0], name
            elif t.shape[0] != T:
                raise ValueError(f"pymeta.MAML: {name} has {t.shape[0]} tasks (shape {_shape(t)}) "
                                 f"but {first} has {T}; the task dimensions must agree")
        return T

    def _step_weights(self, step_weights) -> Union[None, Tensor, List[Union[float, Tensor]]]:
        """Checks meta_loss's step_weights: None, or one finite real weight per inner step,
        as a 1-D tensor (which may require grad: learned weights) or any other iterable of
        numbers or [] tensors (a list, a NumPy array, an nn.ParameterList). Returns them
        indexable by step."""
        if step_weights is None:
            return None
        want = lambda: (f"one weight per inner step (inner_steps is {self.inner_steps}): a 1-D "
                        f"tensor or a sequence of real numbers")

        def check_tensor(w: Tensor, name: str) -> None:
            if not _is_real_tensor(w):
                raise TypeError(f"pymeta.MAML: {name} has dtype {w.dtype}; expected {want()}")
            # No finiteness check on a GPU (reading the values back would sync the device)
            # nor under torch.compile (a data-dependent guard).
            if (w.device.type == "cpu" and not torch.compiler.is_compiling()
                    and not bool(torch.isfinite(w.detach()).all())):
                raise ValueError(f"pymeta.MAML: {name} is {w.tolist()}; the weights must be finite")

        if isinstance(step_weights, Tensor):
            # 2-D: each step's row would broadcast into the loss terms, silently summed
            if step_weights.dim() != 1:
                raise ValueError(f"pymeta.MAML: step_weights has shape {_shape(step_weights)}; "
                                 f"expected {want()}")
            check_tensor(step_weights, "step_weights")
            return self._check_step_count(step_weights)
        if (isinstance(step_weights, (str, bytes, set, frozenset, dict))  # (sets: no order)
                or not hasattr(step_weights, "__iter__")):
            raise TypeError(f"pymeta.MAML: step_weights must be None or {want()}, not "
                            f"{type(step_weights).__name__} {step_weights!r}")
        weights = []
        for i, w in enumerate(step_weights):
            if isinstance(w, Tensor) and w.dim() == 0:
                check_tensor(w, f"step_weights[{i}]")
                weights.append(w)
            elif isinstance(w, Tensor) or not _checks.is_real(w):
                raise TypeError(f"pymeta.MAML: step_weights[{i}] is {type(w).__name__} {w!r}; "
                                f"expected {want()}")
            else:
                weights.append(_checks.real("pymeta.MAML", f"step_weights[{i}]", w))
        return self._check_step_count(weights)

    def _check_step_count(self, weights):
        if len(weights) != self.inner_steps:
            raise ValueError(f"pymeta.MAML: step_weights has {len(weights)} weights but "
                             f"inner_steps is {self.inner_steps}; give one weight per inner step")
        return weights

    @staticmethod
    def _check_labels(out: Tensor, y: Tensor, y_name: str) -> None:
        # Runs per task under vmap: out is [K, ...], y is [K, ...]. Accepted: targets shaped
        # like the output, or integer class indices with the class dimension (1) dropped.
        if y.shape == out.shape:
            return
        if (out.dim() >= 2 and not y.is_floating_point() and not y.is_complex()
                and y.shape[:1] == out.shape[:1] and y.shape[1:] == out.shape[2:]):
            return
        raise ValueError(
            f"pymeta.MAML: {y_name} has per-task shape {_shape(y)} (after the task dim), which "
            f"does not fit the model's per-task output {_shape(out)}: expected {_shape(out)} "
            f"(same shape) or, for integer class labels, {_shape(out)[:1] + _shape(out)[2:]}")

    # ---- rates and the functional forward ------------------------------------------------

    def _lr(self, step: int):
        if self.lr_mode == "scalar":
            return self.inner_lr
        if self.lr_mode == "per_layer_step":
            return list(self.step_lrs[step].unbind(0))
        return list(self.param_lrs)

    def _forward_tasks(self, shared: Dict[str, Tensor], adapted: Sequence[Tensor], x: Tensor,
                       per_task: Callable[[Tensor, Tensor], Tensor], *extra: Tensor) -> Tensor:
        """vmap over tasks of ``per_task(model_output, *extra_t)``; adapted are [T, ...],
        shared are broadcast (in_dims None), x and extra are [T, ...].

        pymeta.models.Conv4 and MLP (exactly those classes, not subclasses) run all tasks in
        their own ``forward_tasks`` (grouped convs, batched matmuls, contiguous layouts)
        instead of vmap over the model: same results, fewer and larger kernels
        (PYMETA_MAML_VMAP=1 forces the vmap path, for comparisons)."""
        names, module, bn_none = self.adapted_names, self.module, self._bn_none
        if type(module) in _TASK_BATCHED and os.environ.get("PYMETA_MAML_VMAP") != "1":
            out = module.forward_tasks({**shared, **dict(zip(names, adapted))}, x)
            return vmap(per_task, in_dims=0)(out, *extra) if extra else per_task(out)

        def task(adapted_t, x_t, *extra_t):
            out = functional_call(module, {**shared, **dict(zip(names, adapted_t)), **bn_none}, (x_t,))
            return per_task(out, *extra_t)

        return vmap(task, in_dims=0, randomness="different")(tuple(adapted), x, *extra)

    def _task_losses(self, shared, adapted, x, y, loss_fn: LossFn, y_name: str) -> Tensor:
        def per_task(out, y_t):
            self._check_labels(out, y_t, y_name)
            loss = loss_fn(out, y_t)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError(f"pymeta.MAML: loss_fn must return a scalar per task; got "
                                 f"{_shape(loss) if isinstance(loss, Tensor) else type(loss).__name__}")
            return loss
        return self._forward_tasks(shared, adapted, x, per_task, y)

    def _query_losses(self, shared, adapted, x_query, y_query, loss_fn: LossFn) -> Tensor:
        # The meta-gradient's backward through the query forward is usually not differentiated
        # again: plain F.conv2d there (a gradient of the meta-gradient is still right, through
        # torch's own double backward)
        with models._double_backward(False):
            return self._task_losses(shared, adapted, x_query, y_query, loss_fn, "y_query")

    def _split_params(self):
        params = dict(self.module.named_parameters())
        adapted = [params.pop(n) for n in self.adapted_names]
        if not torch.is_grad_enabled():
            params = {n: p.detach() for n, p in params.items()}
        return params, adapted

    # ---- the inner loop ------------------------------------------------------------------

    def _inner_step(self, step: int, shared: Dict[str, Tensor], x_support: Tensor,
                    y_support: Tensor, loss_fn: LossFn, grad_on: bool, create_graph: bool,
                    current: Sequence[Tensor], lr) -> List[Tensor]:
        """One inner step of every task: the support losses, their gradients, inner_update."""
        T = x_support.shape[0]
        with torch.enable_grad():
            if step == 0:
                # Per-task gradients w.r.t. the shared meta-params: differentiate through an
                # expanded view (no copy), so each task's gradient lands in its own slice.
                handles = [(p if grad_on and p.requires_grad else p.detach().requires_grad_())
                           .expand(T, *p.shape) for p in current]
            else:
                handles = [p if grad_on and p.requires_grad else p.detach().requires_grad_()
                           for p in current]
            # models._GroupedConv only where this forward's backward gets differentiated
            with models._double_backward(create_graph):
                losses = self._task_losses(shared, handles, x_support, y_support, loss_fn,
                                           "y_support")
            grads = torch.autograd.grad(losses.sum(), handles, create_graph=create_graph,
                                        allow_unused=True, materialize_grads=True)
        # Step 0 passes the shared meta-params (S_i): inner_update broadcasts them.
        return ops.inner_update(list(current), list(grads), lr)

    def _inner_loop(self, shared: Dict[str, Tensor], current: List[Tensor], x_support: Tensor,
                    y_support: Tensor, loss_fn: LossFn,
                    after_step: Optional[Callable[[int, List[Tensor]], None]] = None) -> List[Tensor]:
        """Runs ``inner_steps`` steps from the meta-params ``current``; returns the adapted
        list of ``[T, ...]``, calling ``after_step(step, adapted)`` after each step."""
        grad_on = torch.is_grad_enabled()
        create_graph = grad_on and not self.first_order
        for step in range(self.inner_steps):
            lr = self._lr(step)
            if create_graph and self.checkpoint_steps:
                current = _recomputed_step(self, step, shared, x_support, y_support, loss_fn,
                                           current, lr)
            else:
                current = self._inner_step(step, shared, x_support, y_support, loss_fn, grad_on,
                                           create_graph, current, lr)
            if after_step is not None:
                after_step(step, current)
        return current

    # ---- public API ----------------------------------------------------------------------

    def adapt(self, x_support: Tensor, y_support: Tensor, loss_fn: LossFn) -> Dict[str, Tensor]:
        """Adapts the model to T tasks at once.

        Args:
            x_support: ``[T, K, ...]`` support inputs (K examples per task).
            y_support: ``[T, K, ...]`` support targets, shaped like the model's per-task
                output ``[K, ...]`` or integer class labels ``[K]`` for ``[K, C]`` logits.
            loss_fn: ``loss_fn(output [K, ...], target [K, ...]) -> []``, called per task
                (under vmap), e.g. ``F.cross_entropy`` or ``F.mse_loss``.

        Returns:
            dict name -> ``[T, *param.shape]`` of the adapted parameters only; shared
            parameters are not copied. Differentiable w.r.t. the meta-parameters and rates
            (second order unless ``first_order``). Under ``torch.no_grad()`` the inner
            gradients are still computed but no graph is kept and the results need no grad.
        """
        self._check_tasks(x_support=x_support, y_support=y_support)
        adapted = self._inner_loop(*self._split_params(), x_support, y_support, loss_fn)
        return dict(zip(self.adapted_names, adapted))

    def _adapted_list(self, adapted: Dict[str, Tensor], T: int, x_name: str) -> List[Tensor]:
        if not isinstance(adapted, dict):
            raise TypeError(f"pymeta.MAML: adapted must be the dict returned by adapt, "
                            f"not {type(adapted).__name__}")
        missing = [n for n in self.adapted_names if n not in adapted]
        extra = [n for n in adapted if n not in self.adapted_names]
        if missing or extra:
            raise ValueError(f"pymeta.MAML: adapted must have exactly the adapted parameters "
                             f"{self.adapted_names}; missing {missing}, unexpected {extra}")
        params = dict(self.module.named_parameters())
        out = [adapted[n] for n in self.adapted_names]
        for n, t in zip(self.adapted_names, out):
            p = params[n]
            want = lambda: f"[T, *param.shape] = {[T, *p.shape]}"  # (built only for a message)
            if not isinstance(t, Tensor):
                raise TypeError(f"pymeta.MAML: adapted[{n!r}] must be a Tensor {want()}, not "
                                f"{type(t).__name__}")
            if t.dim() < 1 or t.shape[0] != T:
                raise ValueError(f"pymeta.MAML: adapted[{n!r}] has shape {_shape(t)} but "
                                 f"{x_name} has {T} tasks; the task dimensions must agree")
            if t.shape[1:] != p.shape:
                raise ValueError(f"pymeta.MAML: adapted[{n!r}] has shape {_shape(t)}; "
                                 f"expected {want()}")
            if t.dtype != p.dtype or t.device != p.device:
                raise ValueError(f"pymeta.MAML: adapted[{n!r}] is {t.dtype} on {t.device}, but "
                                 f"the parameter is {p.dtype} on {p.device}")
        return out

    def predict(self, adapted: Dict[str, Tensor], x_query: Tensor) -> Tensor:
        """Runs each task's adapted model on its queries.

        Args:
            adapted: the dict from ``adapt`` (name -> ``[T, ...]``).
            x_query: ``[T, Q, ...]``.

        Returns:
            ``[T, Q, ...]`` outputs.
        """
        T = self._check_tasks(x_query=x_query)
        adapted_list = self._adapted_list(adapted, T, "x_query")
        shared, _ = self._split_params()
        return self._forward_tasks(shared, adapted_list, x_query, lambda out: out)

    def meta_loss(self, x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor,
                  loss_fn: LossFn, step_weights: Optional[Union[Sequence[float], Tensor]] = None) -> Tensor:
        """The meta-training objective: adapt on the support sets, then the mean over the T
        tasks of each task's query loss.

        Args:
            x_support, y_support: ``[T, K, ...]``; x_query, y_query: ``[T, Q, ...]``.
            loss_fn: as in ``adapt``; used for the support and the query losses.
            step_weights: MAML++ multi-step loss: ``inner_steps`` finite weights (a 1-D tensor,
                which may require grad, or a sequence of numbers); the result is
                ``sum_s w[s] * mean_t L_query(θ_t after step s+1)``. None: only the last step.

        Returns:
            a ``[]`` tensor; ``.backward()`` gives the meta-gradients of the model's
            parameters and of the learnable rates.
        """
        self._check_tasks(x_support=x_support, y_support=y_support, x_query=x_query, y_query=y_query)
        step_weights = self._step_weights(step_weights)
        shared, meta = self._split_params()
        if step_weights is None:
            adapted = self._inner_loop(shared, meta, x_support, y_support, loss_fn)
            return self._query_losses(shared, adapted, x_query, y_query, loss_fn).mean()
        terms: List[Tensor] = []

        def after_step(step: int, adapted: List[Tensor]) -> None:
            q = self._query_losses(shared, adapted, x_query, y_query, loss_fn)
            terms.append(step_weights[step] * q.mean())

        self._inner_loop(shared, meta, x_support, y_support, loss_fn, after_step)
        return torch.stack(terms).sum()

    def capture(self, loss_fn: LossFn, x_support: Tensor, y_support: Tensor, x_query: Tensor,
                y_query: Tensor, step_weights: Optional[Union[Sequence[float], Tensor]] = None,
                warmup: int = 3) -> "CapturedMetaStep":
        """Captures one meta-gradient computation (``meta_loss(...).backward()``) in a CUDA
        graph, for static shapes on a GPU. Replaying it removes the host's per-kernel launch
        cost, which dominates batched MAML on a GPU (thousands of small kernels per step).

        The tensors given are examples: they fix shapes, dtypes and the device. Returns a
        ``CapturedMetaStep``; ``step(x_support, y_support, x_query, y_query)`` copies a new
        batch in, replays, and returns the loss (a tensor that the next replay overwrites).
        The meta-gradients land in the parameters' ``.grad`` (overwritten, not accumulated,
        by each replay), so the loop is ``loss = step(*batch); optimizer.step()`` with no
        ``zero_grad`` (which would detach ``.grad`` from the graph's buffers). Parameters must
        be updated in place (every torch.optim optimizer does). Warm-up runs compute
        gradients only: the parameters are not changed by capturing.
        """
        return CapturedMetaStep(self, loss_fn, (x_support, y_support, x_query, y_query),
                                step_weights, warmup)

    def forward(self, *args, **kwargs):
        """Calls the wrapped model unchanged (plain, un-adapted forward)."""
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
                f"first_order={self.first_order}, lr_mode={self.lr_mode!r}, "
                f"adapted={len(self.adapted_names)} tensors"
                + (", checkpoint_steps=True" if self.checkpoint_steps else ""))


def _recomputed_step(maml: MAML, step: int, shared: Dict[str, Tensor], x_support: Tensor,
                     y_support: Tensor, loss_fn: LossFn, current: List[Tensor], lr) -> List[Tensor]:
    """A second-order inner step whose graph is not kept (``MAML(checkpoint_steps=True)``).

    The forward runs the step as first order does (no create_graph; nothing kept but the
    inputs); the backward reruns it with create_graph, under the forward's RNG state, and
    takes the vector-Jacobian product. So the extra cost is one support forward and backward
    per step. (torch.utils.checkpoint would rerun the support forward once more inside the
    forward pass: the step's own autograd.grad needs the saved tensors it has dropped.)"""
    names = list(shared)
    lr_list = list(lr) if isinstance(lr, (list, tuple)) else None
    n_cur, n_sh = len(current), len(names)

    def run(tensors: Sequence[Tensor], create_graph: bool) -> List[Tensor]:
        cur, sh = tensors[:n_cur], dict(zip(names, tensors[n_cur:n_cur + n_sh]))
        rates = list(tensors[n_cur + n_sh:]) if lr_list is not None else lr
        return maml._inner_step(step, sh, x_support, y_support, loss_fn, True, create_graph,
                                cur, rates)

    inputs = [*current, *(shared[n] for n in names), *(lr_list or [])]
    return list(_RecomputedStep.apply(run, *inputs))


class _RecomputedStep(torch.autograd.Function):
    """``apply(run, *inputs)``: outputs of ``run(inputs, create_graph=False)``; the backward
    reruns ``run(inputs, create_graph=True)`` under the forward's RNG state."""

    @staticmethod
    def forward(ctx, run, *inputs):
        ctx.run = run
        ctx.devices = sorted({t.device.index if t.device.index is not None
                              else torch.cuda.current_device() for t in inputs if t.is_cuda})
        ctx.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.devices])
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            return tuple(o.detach() for o in run(leaves, False))

    @staticmethod
    def backward(ctx, *d_outs):
        higher = torch.is_grad_enabled()  # the outer backward's create_graph
        # With create_graph the gradients must stay connected to the inputs' own history
        # (third order): fresh aliases of the saved inputs, so that the nested autograd.grad
        # stops at them (it would otherwise run on into the earlier steps, which the outer
        # backward also does: counted twice). Else detached copies.
        leaves = ([t.view_as(t) if t.requires_grad else t for t in ctx.saved_tensors] if higher
                  else [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors])
        want = [x for x in leaves if x.requires_grad]
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng[0])
            for d, state in zip(ctx.devices, ctx.rng[1]):
                torch.cuda.set_rng_state(state, d)
            pairs = [(o, d) for o, d in zip(ctx.run(leaves, True), d_outs)
                     if d is not None and o.requires_grad]
            grads = (torch.autograd.grad([o for o, _ in pairs], want, [d for _, d in pairs],
                                         allow_unused=True, create_graph=higher)
                     if pairs and want else [None] * len(want))
        it = iter(grads)
        return (None, *(next(it) if x.requires_grad else None for x in leaves))


class CapturedMetaStep:
    """``MAML.meta_loss(...).backward()`` captured in a CUDA graph (see ``MAML.capture``)."""

    def __init__(self, maml: MAML, loss_fn: LossFn, batch: Sequence[Tensor],
                 step_weights=None, warmup: int = 3):
        names = ("x_support", "y_support", "x_query", "y_query")
        if maml.checkpoint_steps and not maml.first_order:
            # its recompute stashes and restores the RNG state, which a capture forbids
            raise ValueError("pymeta.MAML.capture: checkpoint_steps=True is not supported in "
                             "a CUDA graph; capture a MAML built with checkpoint_steps=False")
        maml._check_tasks(**dict(zip(names, batch)))
        maml._step_weights(step_weights)  # fail here, not inside the warm-up
        params = [p for p in maml.parameters() if p.requires_grad]
        for name, t in zip(names, batch):
            if not t.is_cuda:
                raise ValueError(f"pymeta.MAML.capture: {name} is on {t.device}; CUDA graphs "
                                 f"need CUDA tensors")
        if any(not p.is_cuda for p in params):
            raise ValueError("pymeta.MAML.capture: the model's parameters must be on the GPU")
        self._names = names
        self._static = [t.detach().clone() for t in batch]
        self._params = params

        def run() -> Tensor:
            loss = maml.meta_loss(*self._static, loss_fn, step_weights)
            loss.backward()
            return loss

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (lazy init, autotuning) off the capture
            for _ in range(max(warmup, 1)):
                for p in params:
                    p.grad = None
                run()
        torch.cuda.current_stream().wait_stream(side)
        for p in params:  # .grad allocated inside the graph: replays write, not accumulate
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._loss = run()
        self._grad_ptrs = [p.grad.data_ptr() if p.grad is not None else None for p in params]

    def __call__(self, x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor) -> Tensor:
        """Copies the batch in, replays the graph; returns the loss ([], overwritten by the
        next replay). Meta-gradients are in the parameters' ``.grad``."""
        for name, src, dst in zip(self._names, (x_support, y_support, x_query, y_query), self._static):
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(f"pymeta.MAML.capture: {name} has shape {_shape(src)} and dtype "
                                 f"{src.dtype}, but the graph was captured for {_shape(dst)} "
                                 f"{dst.dtype}; capture again for new shapes")
            dst.copy_(src, non_blocking=True)
        for p, ptr in zip(self._params, self._grad_ptrs):
            if (p.grad.data_ptr() if p.grad is not None else None) != ptr:
                raise RuntimeError("pymeta.MAML.capture: a parameter's .grad was replaced (e.g. "
                                   "by zero_grad()); the graph writes the meta-gradients into "
                                   "the buffers it captured, so don't reset .grad between steps")
        self.graph.replay()
        return self._loss
