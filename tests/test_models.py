"""pymeta.models: shapes, naming, and that they run batched under pymeta.MAML."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pymeta
from pymeta.models import MLP, Conv4


@pytest.mark.parametrize("channels,size,hidden,flat", [(1, 28, 64, 64), (3, 84, 32, 32 * 25), (1, 16, 8, 8)])
def test_conv4_shapes(channels, size, hidden, flat):
    m = Conv4(channels, hidden=hidden, n_way=5, image_size=size)
    assert m.head.in_features == flat
    assert m(torch.randn(2, channels, size, size)).shape == (2, 5)
    kinds = [type(x) for x in m.features]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] * 4
    assert all(c.padding == (1, 1) and c.kernel_size == (3, 3) for c in m.features if isinstance(c, nn.Conv2d))


def test_conv4_too_small_input():
    with pytest.raises(ValueError, match="image_size 8"):
        Conv4(1, image_size=8)


def test_mlp_shapes_and_activation():
    m = MLP(1, (40, 40), 1)
    assert [l.out_features for l in m.modules() if isinstance(l, nn.Linear)] == [40, 40, 1]
    assert m(torch.randn(7, 1)).shape == (7, 1)
    assert isinstance(MLP(3, (5,), 2, activation="tanh").body[1], nn.Tanh)
    assert isinstance(MLP(3, (5,), 2, activation=nn.ELU).body[1], nn.ELU)
    assert MLP(3, (), 2)(torch.randn(4, 3)).shape == (4, 2)
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        MLP(activation="swishy")


def test_models_under_maml_mini_imagenet_shape():
    torch.manual_seed(0)
    maml = pymeta.MAML(Conv4(3, hidden=4, n_way=5, image_size=84), inner_steps=1, adapt=["head"])
    xs, xq = torch.randn(2, 5, 3, 84, 84), torch.randn(2, 10, 3, 84, 84)
    ys = torch.arange(5).expand(2, -1)
    adapted = maml.adapt(xs, ys, F.cross_entropy)
    assert maml.predict(adapted, xq).shape == (2, 10, 5)
