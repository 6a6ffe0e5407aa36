"""Standard few-shot models, built from plain modules so that ``torch.func.functional_call``
and ``vmap`` (hence ``pymeta.MAML``) can run them with per-task parameters.

Both models name their last layer ``head``, so ANIL is ``pymeta.MAML(model, adapt=["head"])``.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pymeta import _checks, ops

__all__ = ["Conv4", "MLP"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
                "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU}

Activation = Union[str, Callable[[], nn.Module]]


def _activation(act: Activation) -> Callable[[], nn.Module]:
    """A factory of fresh activation modules; each module it makes is checked (see _make)."""
    if isinstance(act, str):
        try:
            return _ACTIVATIONS[act.lower()]
        except KeyError:
            raise ValueError(f"pymeta.models: unknown activation {act!r}; choose one of "
                             f"{sorted(_ACTIVATIONS)} or pass a module class") from None
    if isinstance(act, nn.Module):  # callable, but calling it runs its forward
        raise TypeError(f"pymeta.models: activation must be a name or a module class, not the "
                        f"module instance {act!r}; pass its class (e.g. nn.ReLU, not nn.ReLU())")
    if not callable(act):
        raise TypeError(f"pymeta.models: activation must be a name or a module class, "
                        f"not {type(act).__name__}")
    return act


def _make(factory: Callable[[], nn.Module], activation: Activation) -> nn.Module:
    """factory(), which must be an nn.Module (not e.g. torch.relu, a function of a tensor)."""
    try:
        m = factory()
    except TypeError as e:
        raise TypeError(f"pymeta.models: activation {activation!r} cannot be called without "
                        f"arguments to make a module ({e}); pass a name or a module class "
                        f"such as nn.ReLU") from e
    if not isinstance(m, nn.Module):
        raise TypeError(f"pymeta.models: activation {activation!r} made a "
                        f"{type(m).__name__}, not an nn.Module; pass a name or a module class "
                        f"such as nn.ReLU")
    return m


def _check_input(where: str, x: Tensor, like: Tensor) -> None:
    """x is a floating tensor of like's dtype (any floating dtype under autocast) and device.
    Attribute reads only: forward_tasks runs at every inner step."""
    if not x.is_floating_point() or (x.dtype != like.dtype
                                     and not torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"{where}: x has dtype {x.dtype}, but the parameters are {like.dtype}; "
                        f"convert one to the other")
    if x.device != like.device:
        raise ValueError(f"{where}: x is on {x.device}, but the parameters are on "
                         f"{like.device}; move one to the other")


def _param(params: Dict[str, Tensor], name: str) -> Tensor:
    try:
        return params[name]
    except KeyError:
        raise ValueError(f"pymeta.models: params has no entry {name!r}; it must map every "
                         f"parameter name of the model to a tensor") from None


def _per_task(params: Dict[str, Tensor], name: str, like: Tensor, T: int) -> Tensor:
    """params[name] as [T, *like.shape]: per-task tensors as they are, a shared one (shaped
    like the module's own parameter) broadcast over the tasks (a view)."""
    p = _param(params, name)
    if p.dim() == like.dim():
        return p.expand(T, *p.shape)
    if p.dim() != like.dim() + 1 or p.shape[0] != T or p.shape[1:] != like.shape:
        raise ValueError(f"pymeta.models: parameter {name} has shape {list(p.shape)}; expected "
                         f"{list(like.shape)} (shared) or {[T] + list(like.shape)} (per task)")
    return p


# ---- grouped convolution whose derivatives of every order stay grouped ---------------------
# torch's double backward of a grouped conv computes one term (the weight gradient from the
# gradient of the input gradient) with one convolution per group: 32 tasks = 32 launches per
# inner step and layer (15 ms of a 55 ms second-order meta-iteration on an H100, 2026-11-26).
# A conv is bilinear in (input, weight), so its input gradient and weight gradient are
# bilinear too, and the derivatives of all three are again these three maps (stride 1,
# dilation 1, same padding): each is one grouped aten call.
#   conv:  y  = conv(x, w)          dy -> (dgrad(dy, w), wgrad(dy, x))
#   dgrad: dx = conv^T(dy, w)       ddx -> (conv(ddx, w), wgrad(dy, ddx))
#   wgrad: dw = corr(dy, x)         ddw -> (conv(x, ddw), dgrad(dy, ddw))


class _Geom:
    """The non-tensor arguments of the three maps, as one opaque value (a tuple would be
    flattened by torch.func's generated vmap rules, which then miscount the tangents)."""
    __slots__ = ("padding", "groups", "x_shape", "w_shape")

    def __init__(self, padding, groups, x_shape, w_shape):
        self.padding, self.groups = tuple(padding), int(groups)
        self.x_shape, self.w_shape = list(x_shape), list(w_shape)


def _conv(x: Tensor, w: Tensor, geom: _Geom, b=None) -> Tensor:
    return _GroupedConv.apply(x, w, b, geom)


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


class _GroupedConv(torch.autograd.Function):
    """conv2d(x [B, g*Ci, H, W], w [g*Co, Ci, kh, kw], b [g*Co] or None, padding, groups=g),
    stride 1."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b, geom):
        return F.conv2d(x, w, b, 1, geom.padding, 1, geom.groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _, ctx.geom = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)  # jvp reads them too

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not torch.is_grad_enabled():  # a plain backward (first order): one aten call, as
            # F.conv2d's own backward (the Functions below only matter for a graph of it)
            g = ctx.geom
            gx, gw, gb = torch.ops.aten.convolution_backward(
                dy, x, w, [w.shape[0]] if need[2] else None, [1, 1], list(g.padding), [1, 1],
                False, [0, 0], g.groups, list(need[:3]))
            return gx, gw, gb, None
        return (_ConvInputGrad.apply(dy, w, ctx.geom) if need[0] else None,
                _ConvWeightGrad.apply(dy, x, ctx.geom) if need[1] else None,
                dy.sum((0, 2, 3)) if need[2] else None, None)

    @staticmethod
    def jvp(ctx, tx, tw, tb, _):
        x, w = ctx.saved_tensors
        out = _add(None if tx is None else _conv(tx, w, ctx.geom),
                   None if tw is None else _conv(x, tw, ctx.geom))
        return _add(out, None if tb is None else tb.view(1, -1, 1, 1))


def _save_operands(ctx, inputs, output):
    """setup_context of the two gradient maps: operands (a, b) kept for backward and jvp."""
    a, b, ctx.geom = inputs
    ctx.save_for_backward(a, b)
    ctx.save_for_forward(a, b)


def _bilinear_jvp(fn, ctx, ta, tb):
    """The tangent of a bilinear fn(a, b, geom): fn(ta, b) + fn(a, tb)."""
    a, b = ctx.saved_tensors
    return _add(None if ta is None else fn(ta, b, ctx.geom),
                None if tb is None else fn(a, tb, ctx.geom))


def _grad_map_backward(ctx, dd, conv_operands, other_map):
    """The backward of a gradient map g(dy, b) (b = w or x), given dd = d loss / d g: w.r.t.
    dy a conv (of conv_operands(dd, b)), w.r.t. b the other gradient map of (dy, dd)."""
    dy, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (_conv(*conv_operands(dd, b), ctx.geom) if need[0] else None,
            other_map.apply(dy, dd, ctx.geom) if need[1] else None, None)


class _ConvInputGrad(torch.autograd.Function):
    """The input gradient of _GroupedConv: dy [B, g*Co, H', W'], w -> dx [geom.x_shape]."""
    generate_vmap_rule = True
    setup_context = staticmethod(_save_operands)

    @staticmethod
    def forward(dy, w, geom):
        return torch.nn.grad.conv2d_input(geom.x_shape, w, dy, 1, geom.padding, 1, geom.groups)

    @staticmethod
    def backward(ctx, ddx):  # d/d dy = conv(ddx, w); d/dw = wgrad(dy, ddx)
        return _grad_map_backward(ctx, ddx, lambda ddx, w: (ddx, w), _ConvWeightGrad)

    @staticmethod
    def jvp(ctx, tdy, tw, _):
        return _bilinear_jvp(_ConvInputGrad.apply, ctx, tdy, tw)


class _ConvWeightGrad(torch.autograd.Function):
    """The weight gradient of _GroupedConv: dy [B, g*Co, H', W'], x -> dw [geom.w_shape]."""
    generate_vmap_rule = True
    setup_context = staticmethod(_save_operands)

    @staticmethod
    def forward(dy, x, geom):
        return torch.nn.grad.conv2d_weight(x, geom.w_shape, dy, 1, geom.padding, 1, geom.groups)

    @staticmethod
    def backward(ctx, ddw):  # d/d dy = conv(x, ddw); d/dx = dgrad(dy, ddw)
        return _grad_map_backward(ctx, ddw, lambda ddw, x: (x, ddw), _ConvInputGrad)

    @staticmethod
    def jvp(ctx, tdy, tx, _):
        return _bilinear_jvp(_ConvWeightGrad.apply, ctx, tdy, tx)


_STATE = threading.local()


@contextlib.contextmanager
def _double_backward(flag: bool):
    """Within the block, forward_tasks takes _GroupedConv only if flag: whether the caller
    will differentiate the forward's backward (pymeta.MAML: the support forward of a
    second-order inner step). Outside any block it does (a direct caller may). Either way the
    values and derivatives are the same; F.conv2d costs less host time per call."""
    before = getattr(_STATE, "double_backward", True)
    _STATE.double_backward = flag
    try:
        yield
    finally:
        _STATE.double_backward = before


# Where Conv4.forward_tasks takes _GroupedConv for its grouped convs (elsewhere F.conv2d's own
# derivatives). Not on the CPU: there it measured 4-5% slower (CPU config, 8 tasks; the
# per-group double backward costs little with mkldnn at that size).
_GROUPED_CONV_DEVICES = ("cuda",)

# Where a one-channel first layer runs as patches x weights (see Conv4.forward_tasks).
_PATCHES_DEVICES = ("cpu", "cuda")


def _patches(x: Tensor, kernel: tuple, padding: tuple) -> Tensor:
    """The stride-1 conv patches of one-channel images, as F.unfold: x [N, H, W] ->
    [N, kh * kw, Ho * Wo]. One strided view of the padded images and one copy (F.unfold's
    CPU im2col took 5x as long at Conv-4 sizes). Images that need a gradient take F.unfold
    (the strided view's backward is the slow one there)."""
    (kh, kw), (ph, pw) = kernel, padding
    if x.requires_grad:
        return F.unfold(x.unsqueeze(1), kernel, padding=padding)
    xp = F.pad(x, (pw, pw, ph, ph)).contiguous()  # F.pad keeps x's strides when it copies
    N, Hp, Wp = xp.shape
    Ho, Wo = Hp - kh + 1, Wp - kw + 1
    view = xp.as_strided((N, kh, kw, Ho, Wo), (Hp * Wp, Wp, 1, Wp, 1))
    return view.reshape(N, kh * kw, Ho * Wo)


def _max_pool2(h: Tensor) -> Tensor:
    """2x2 max-pool: pymeta.ops.max_pool2x2 where its CPU kernel applies (about 10x torch's
    NCHW max-pool there), else F.max_pool2d; the same values and gradients either way."""
    if (h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64) and h.dim() == 4
            and h.shape[-1] >= 2 and h.shape[-2] >= 2 and h.numel() > 0 and h.is_contiguous()):
        return ops.max_pool2x2(h)[0]
    return F.max_pool2d(h, 2)


def _linear_tasks(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Per-task linear layer: h [T, B, I], w [T, O, I], b [T, O] -> [T, B, O] (one bmm)."""
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


class Conv4(nn.Module):
    """The 4-block convnet of the MAML papers: 4 x [3x3 conv (padding 1), BatchNorm, ReLU,
    2x2 max-pool], flatten, then a linear ``head`` to ``n_way`` logits.

    Omniglot: ``Conv4(1, n_way=5, image_size=28)``; mini-ImageNet:
    ``Conv4(3, hidden=32, n_way=5, image_size=84)``.

    Under ``pymeta.MAML`` the BatchNorm layers always use each task's batch statistics and
    their running statistics are never touched. Used on its own, it behaves as any module.

    Args:
        in_channels: image channels C.
        hidden: channels of every conv block.
        n_way: number of classes (output features).
        image_size: H = W of the input; the head's input is ``hidden * (H // 16) ** 2``.
        bn_momentum: the BatchNorm layers' running-statistics momentum, in [0, 1], or None
            (a cumulative average).

    All sizes are ints >= 1 (image_size >= 16).

    Shapes: input ``[B, C, H, W]`` -> logits ``[B, n_way]``.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, n_way: int = 5,
                 image_size: int = 28, bn_momentum: Optional[float] = 0.1):
        super().__init__()
        where = "pymeta.models.Conv4"
        in_channels = _checks.integer(where, "in_channels", in_channels, min=1)
        hidden = _checks.integer(where, "hidden", hidden, min=1)
        n_way = _checks.integer(where, "n_way", n_way, min=1)
        image_size = _checks.integer(where, "image_size", image_size)
        if bn_momentum is not None:  # None: BatchNorm's cumulative average
            bn_momentum = _checks.real(where, "bn_momentum", bn_momentum, min=0)
            if bn_momentum > 1:
                raise ValueError(f"{where}: bn_momentum must be in [0, 1] (or None), "
                                 f"got {bn_momentum!r}")
        side = image_size // 16  # after 4 max-pools
        if side < 1:
            raise ValueError(f"pymeta.models.Conv4: image_size {image_size} is too small for "
                             f"4 max-pools; it must be at least 16")
        blocks = []
        c = in_channels
        for _ in range(4):
            blocks += [nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden, momentum=bn_momentum),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c = hidden
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden * side * side, n_way)
        self.in_channels, self.image_size = in_channels, image_size

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))

    def forward_tasks(self, params: Dict[str, Tensor], x: Tensor) -> Tensor:
        """T tasks at once, each with its own parameters (what ``pymeta.MAML`` runs instead of
        ``vmap`` over tasks): ``x [T, B, C, H, W]`` -> logits ``[T, B, n_way]``.

        ``params`` maps every parameter name to ``[T, *shape]`` (per task) or ``[*shape]``
        (shared by all tasks). BatchNorm normalizes with each task's batch statistics and
        never touches the running statistics (the MAML setting). ``x`` must be 5-D with
        ``C = in_channels``, ``H // 16 = W // 16 = image_size // 16``, ``T, B >= 1`` and the
        parameters' dtype (any floating dtype under autocast) and device (ValueError /
        TypeError naming x otherwise; attribute reads only).

        The activations stay in one contiguous ``[B, T * channels, H, W]`` layout: every conv
        is one grouped conv (groups = T), every BatchNorm one plain batch norm over T x
        channels (per-task, per-channel statistics), ReLU and max-pool run on it unchanged
        (on the CPU the max-pool is pymeta.ops.max_pool2x2), and the head is one batched
        matmul; ``vmap`` instead moves the task dimension in and out around each op (permuted
        copies, strided elementwise kernels).
        """
        side = self.image_size // 16
        if (not isinstance(x, Tensor) or x.dim() != 5 or x.shape[2] != self.in_channels
                or x.shape[0] < 1 or x.shape[1] < 1
                or x.shape[3] // 16 != side or x.shape[4] // 16 != side):
            self._bad_input(x)
        T, B = x.shape[:2]
        feats = self.features
        _check_input("pymeta.models.Conv4.forward_tasks", x, _param(params, "features.0.weight"))
        h = x.transpose(0, 1).reshape(B, T * x.shape[2], *x.shape[3:])
        for i in range(0, len(feats), 4):
            conv, bn = feats[i], feats[i + 1]
            w = _per_task(params, f"features.{i}.weight", conv.weight, T)
            b = _per_task(params, f"features.{i}.bias", conv.bias, T)
            if (conv.in_channels == 1 and h.device.type in _PATCHES_DEVICES
                    and conv.stride == (1, 1)):
                # one input channel per task: a grouped conv would be a slow depthwise conv
                # (CPU; on an H100 4.9 ms of a second-order meta-iteration); as 3x3 patches
                # times [T, out, 9] it is one batched matmul (and so are its backward and
                # double backward). The patches are one strided copy (F.unfold, which
                # launches one im2col kernel per image on the GPU, only for images that
                # need a gradient).
                side = h.shape[-2:]
                cols = _patches(h.reshape(B * T, *side), conv.kernel_size, conv.padding)
                h = torch.matmul(w.reshape(T, w.shape[1], -1), cols.view(B, T, cols.shape[1], -1))
                h = (h + b.unsqueeze(-1)).view(B, -1, *side)
            else:
                w = w.reshape(-1, *w.shape[2:])
                if (h.device.type in _GROUPED_CONV_DEVICES and T > 1 and conv.stride == (1, 1)
                        and conv.dilation == (1, 1) and getattr(_STATE, "double_backward", True)):
                    geom = _Geom(conv.padding, T, h.shape, w.shape)
                    h = _conv(h, w, geom, b.reshape(-1))
                else:
                    h = F.conv2d(h, w, b.reshape(-1), padding=conv.padding, groups=T)
            g = _per_task(params, f"features.{i + 1}.weight", bn.weight, T)
            be = _per_task(params, f"features.{i + 1}.bias", bn.bias, T)
            h = F.batch_norm(h, None, None, g.reshape(-1), be.reshape(-1), training=True,
                             eps=bn.eps)
            # relu(max_pool(h)) == max_pool(relu(h)), values and gradients (ReLU is monotonic;
            # a window of negatives gets zero gradient either way), on 1/4 of the elements
            h = F.relu(_max_pool2(h))
        h = h.reshape(B, T, -1).transpose(0, 1)  # [T, B, hidden * side^2], per task as flatten(1)
        return _linear_tasks(h, _per_task(params, "head.weight", self.head.weight, T),
                             _per_task(params, "head.bias", self.head.bias, T))

    def _bad_input(self, x) -> None:
        """Raises the error for an x that forward_tasks does not take."""
        where, C, S = "pymeta.models.Conv4.forward_tasks", self.in_channels, self.image_size
        expected = f"[T, B, {C}, {S}, {S}] (tasks, examples per task, in_channels, image_size, image_size)"
        if not isinstance(x, Tensor):
            raise TypeError(f"{where}: x must be a Tensor {expected}, not {type(x).__name__}")
        note = ""
        if x.dim() == 5 and x.shape[2] == C and x.shape[0] >= 1 and x.shape[1] >= 1:
            note = (f"; images of {x.shape[3]}x{x.shape[4]} do not fit the head (any H and W "
                    f"with H // 16 = W // 16 = {S // 16} would)")
        elif x.dim() == 5 and x.shape[2] == C:
            note = "; it needs at least one task and one example per task"
        raise ValueError(f"{where}: x has shape {list(x.shape)}; expected {expected}{note}")


class MLP(nn.Module):
    """A fully connected net: ``Linear -> act`` per hidden layer, then a linear ``head``.
    The sinusoid regression net of MAML is ``MLP(1, (40, 40), 1)``.

    Args:
        in_features: input features.
        hidden: sizes of the hidden layers (may be empty: a linear model).
        out_features: output features.
        activation: a name ("relu", "tanh", ...) or a module class / factory (called without
            arguments, it must return an ``nn.Module``).

    in_features, out_features and every hidden size are ints >= 1.

    Shapes: ``[B, in_features]`` -> ``[B, out_features]``.
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40),
                 out_features: int = 1, activation: Activation = "relu"):
        super().__init__()
        where = "pymeta.models.MLP"
        in_features = _checks.integer(where, "in_features", in_features, min=1)
        out_features = _checks.integer(where, "out_features", out_features, min=1)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Iterable):
            raise TypeError(f"{where}: hidden must be a sequence of ints (the hidden layers' "
                            f"sizes, may be empty), not {type(hidden).__name__} {hidden!r}")
        hidden = [_checks.integer(where, f"hidden[{i}]", h, min=1) for i, h in enumerate(hidden)]
        act = _activation(activation)
        layers = []
        n = in_features
        for h in hidden:
            layers += [nn.Linear(n, h), _make(act, activation)]
            n = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(n, out_features)
        if not hidden:  # unused, but checked all the same
            _make(act, activation)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def forward_tasks(self, params: Dict[str, Tensor], x: Tensor) -> Tensor:
        """T tasks at once (see ``Conv4.forward_tasks``): ``x [T, B, in_features]`` ->
        ``[T, B, out_features]``; every layer is one batched matmul."""
        if (not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != self.in_features
                or x.shape[0] < 1 or x.shape[1] < 1):
            where = "pymeta.models.MLP.forward_tasks"
            expected = f"[T, B, {self.in_features}] (tasks, examples per task, in_features)"
            if not isinstance(x, Tensor):
                raise TypeError(f"{where}: x must be a Tensor {expected}, not {type(x).__name__}")
            raise ValueError(f"{where}: x has shape {list(x.shape)}; expected {expected}, "
                             f"with T >= 1 and B >= 1")
        T = x.shape[0]
        _check_input("pymeta.models.MLP.forward_tasks", x,
                     _param(params, "body.0.weight" if len(self.body) else "head.weight"))
        h = x
        for name, m in self.body.named_children():
            if isinstance(m, nn.Linear):
                h = _linear_tasks(h, _per_task(params, f"body.{name}.weight", m.weight, T),
                                  _per_task(params, f"body.{name}.bias", m.bias, T))
            else:  # the activation, on [T * B, features] rows as each task's [B, features]
                h = m(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], -1)
        return _linear_tasks(h, _per_task(params, "head.weight", self.head.weight, T),
                             _per_task(params, "head.bias", self.head.bias, T))
