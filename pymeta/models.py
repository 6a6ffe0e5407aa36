"""Standard few-shot models, built from plain modules so that ``torch.func.functional_call``
and ``vmap`` (hence ``pymeta.MAML``) can run them with per-task parameters.

Both models name their last layer ``head``, so ANIL is ``pymeta.MAML(model, adapt=["head"])``.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

from torch import Tensor, nn

__all__ = ["Conv4", "MLP"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
                "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU}

Activation = Union[str, Callable[[], nn.Module]]


def _activation(act: Activation) -> Callable[[], nn.Module]:
    if isinstance(act, str):
        try:
            return _ACTIVATIONS[act.lower()]
        except KeyError:
            raise ValueError(f"pymeta.models: unknown activation {act!r}; choose one of "
                             f"{sorted(_ACTIVATIONS)} or pass a module class") from None
    if not callable(act):
        raise TypeError(f"pymeta.models: activation must be a name or a module class, "
                        f"not {type(act).__name__}")
    return act


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

    Shapes: input ``[B, C, H, W]`` -> logits ``[B, n_way]``.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, n_way: int = 5,
                 image_size: int = 28, bn_momentum: float = 0.1):
        super().__init__()
        side = image_size
        for _ in range(4):
            side //= 2
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


class MLP(nn.Module):
    """A fully connected net: ``Linear -> act`` per hidden layer, then a linear ``head``.
    The sinusoid regression net of MAML is ``MLP(1, (40, 40), 1)``.

    Args:
        in_features: input features.
        hidden: sizes of the hidden layers (may be empty: a linear model).
        out_features: output features.
        activation: a name ("relu", "tanh", ...) or a module class / factory.

    Shapes: ``[B, in_features]`` -> ``[B, out_features]``.
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40),
                 out_features: int = 1, activation: Activation = "relu"):
        super().__init__()
        act = _activation(activation)
        layers = []
        n = in_features
        for h in hidden:
            layers += [nn.Linear(n, h), act()]
            n = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(n, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
