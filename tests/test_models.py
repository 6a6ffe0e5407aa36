"""pymeta.models: shapes, naming, and that they run batched under pymeta.MAML."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pymeta
from pymeta import models
from pymeta.models import MLP, Conv4
from testutil import DEVICES, device_param


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


def _per_task_loop(model, params, x):
    """Reference for forward_tasks: each task through the module's own forward, with its own
    parameters and BatchNorm on batch statistics (running statistics unused)."""
    T = x.shape[0]
    bn_none = {f"{n}.{b}": None for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
               for b in ("running_mean", "running_var", "num_batches_tracked")}
    outs = []
    for t in range(T):
        p_t = {n: (p[t] if p.dim() > dict(model.named_parameters())[n].dim() else p)
               for n, p in params.items()}
        outs.append(torch.func.functional_call(model, {**p_t, **bn_none}, (x[t],)))
    return torch.stack(outs)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("conv_path", ["default", "grouped_conv_fn", "grouped_conv_fn_no_patches"])
def test_conv4_forward_tasks_matches_per_task_forward(channels, size, conv_path, monkeypatch):
    """Per-task and shared parameters mixed (ANIL-like), values and first and second
    derivatives, float64; channels = 1 takes the patches-times-weights first layer (unless
    switched off); "grouped_conv_fn": the convs take models._GroupedConv as on the GPU."""
    if conv_path != "default":
        monkeypatch.setattr(models, "_GROUPED_CONV_DEVICES", ("cpu",))
    if conv_path == "grouped_conv_fn_no_patches":
        monkeypatch.setattr(models, "_PATCHES_DEVICES", ())
    _check_forward_tasks(channels, size, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_conv4_forward_tasks_matches_per_task_forward_cuda(channels, size):
    """The GPU path (models._GroupedConv, patches x weights for one channel) on the GPU."""
    _check_forward_tasks(channels, size, "cuda")


def _check_forward_tasks(channels, size, device):
    torch.manual_seed(0)
    model = Conv4(channels, hidden=6, n_way=4, image_size=size).double().eval().to(device)
    T = 3
    params = {}
    for i, (n, p) in enumerate(model.named_parameters()):
        per_task = i % 3 != 1
        v = (p.detach().expand(T, *p.shape)
             + 0.1 * torch.randn(T, *p.shape, dtype=p.dtype).to(device)
             if per_task else p.detach().clone())
        params[n] = v.requires_grad_()
    x = torch.randn(T, 5, channels, size, size, dtype=torch.float64).to(device)
    got, want = model.forward_tasks(params, x), _per_task_loop(model, params, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    names = list(params)
    g1 = torch.autograd.grad(got.square().sum(), [params[n] for n in names], create_graph=True)
    w1 = torch.autograd.grad(want.square().sum(), [params[n] for n in names], create_graph=True)
    g2 = torch.autograd.grad(sum(a.square().sum() for a in g1), [params[n] for n in names])
    w2 = torch.autograd.grad(sum(b.square().sum() for b in w1), [params[n] for n in names])
    # Tolerances relative to each order's largest entry: the conv biases feed BatchNorm, so
    # their true derivatives are 0 and both sides hold rounding noise there.
    for got_d, want_d in ((g1, w1), (g2, w2)):
        scale = max(b.abs().max().item() for b in want_d)
        for n, a, b in zip(names, got_d, want_d):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13 * scale, msg=n)


def test_conv4_forward_tasks_with_ties_matches_per_task_forward():
    """Images with flat background (as Omniglot's): conv outputs, hence BatchNorm outputs, tie
    inside many pooling windows, and the gradient goes where nn.MaxPool2d sends it. (Tied
    positions see equal patches, so only the input's gradient tells the tie rules apart.)"""
    torch.manual_seed(3)
    model = Conv4(1, hidden=4, n_way=3, image_size=16).double()
    T = 2
    params = {n: (p.detach().expand(T, *p.shape) + 0.1 * torch.randn(T, *p.shape, dtype=p.dtype))
              .requires_grad_() for n, p in model.named_parameters()}
    x = torch.zeros(T, 4, 1, 16, 16, dtype=torch.float64)
    x[..., 5:9, 6:10] = torch.rand(T, 4, 1, 4, 4, dtype=torch.float64)
    x.requires_grad_()
    got, want = model.forward_tasks(params, x), _per_task_loop(model, params, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    names = list(params) + ["x"]
    leaves = [params[n] for n in names[:-1]] + [x]
    ga = torch.autograd.grad(got.square().sum(), leaves)
    gb = torch.autograd.grad(want.square().sum(), leaves)
    for n, a, b in zip(names, ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("kernel,padding", [((3, 3), (1, 1)), ((3, 3), (0, 0)), ((5, 3), (2, 1))])
def test_patches_equal_unfold(kernel, padding):
    from pymeta.models import _patches
    x = torch.randn(6, 11, 9)
    want = F.unfold(x.unsqueeze(1), kernel, padding=padding)
    assert torch.equal(_patches(x, kernel, padding), want)
    xt = torch.randn(6, 9, 11).transpose(1, 2)  # not contiguous
    assert torch.equal(_patches(xt, kernel, padding), F.unfold(xt.unsqueeze(1), kernel, padding=padding))


def test_mlp_forward_tasks_matches_per_task_forward():
    torch.manual_seed(0)
    model = MLP(3, (7, 5), 2, activation="tanh").double()
    T = 4
    params = {n: (p.detach().expand(T, *p.shape) + 0.1 * torch.randn(T, *p.shape, dtype=p.dtype))
              for n, p in model.named_parameters()}
    params["body.2.bias"] = model.body[2].bias.detach()  # one shared
    x = torch.randn(T, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(model.forward_tasks(params, x), _per_task_loop(model, params, x),
                               rtol=1e-12, atol=1e-12)


def test_forward_tasks_bad_parameter_shape_is_named():
    model = Conv4(1, hidden=4, n_way=2, image_size=16)
    params = {n: p.detach().expand(2, *p.shape) for n, p in model.named_parameters()}
    params["features.4.weight"] = params["features.4.weight"][:, :2]
    with pytest.raises(ValueError, match="features.4.weight has shape"):
        model.forward_tasks(params, torch.randn(2, 3, 1, 16, 16))


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_fast_path_equals_vmap_path(first_order, monkeypatch):
    """pymeta.MAML on Conv4 / MLP runs forward_tasks; PYMETA_MAML_VMAP=1 runs vmap over the
    module: the same meta-gradients (float64)."""
    torch.manual_seed(0)
    model = Conv4(1, hidden=4, n_way=3, image_size=16).double()
    data = (torch.randn(2, 3, 1, 16, 16, dtype=torch.float64), torch.randint(0, 3, (2, 3)),
            torch.randn(2, 4, 1, 16, 16, dtype=torch.float64), torch.randint(0, 3, (2, 4)))
    grads = []
    for vmap_path in ("0", "1"):
        monkeypatch.setenv("PYMETA_MAML_VMAP", vmap_path)
        maml = pymeta.MAML(model, inner_lr=0.3, inner_steps=2, first_order=first_order,
                           lr_mode="per_layer_step")
        maml.meta_loss(*data, F.cross_entropy).backward()
        grads.append([p.grad.clone() for p in maml.parameters()])
        model.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _grouped(x, w, b, groups, padding):
    return models._conv(x, w, models._Geom(padding, groups, x.shape, w.shape), b)


@pytest.mark.parametrize("device", [device_param(d) for d in DEVICES])
@pytest.mark.parametrize("padding", [(1, 1), (0, 2)])
def test_grouped_conv_derivatives_match_conv2d(padding, device):
    """models._GroupedConv (the grouped conv whose double backward stays one grouped call)
    against F.conv2d: values, gradcheck and gradgradcheck, and third derivatives through a
    nonlinear chain, float64."""
    torch.manual_seed(0)
    g = 3
    opts = dict(dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(2, g * 2, 5, 6, **opts)
    w = torch.randn(g * 4, 2, 3, 3, **opts)
    b = torch.randn(g * 4, **opts)

    def ref(x, w, b):
        return F.conv2d(x, w, b, 1, padding, 1, g)

    def new(x, w, b):
        return _grouped(x, w, b, g, padding)

    torch.testing.assert_close(new(x, w, b), ref(x, w, b), rtol=0, atol=0)
    assert torch.autograd.gradcheck(new, (x, w, b))
    # (the bias enters linearly: its second derivatives are not in the graph at all)
    assert torch.autograd.gradgradcheck(lambda x, w: new(x, w, b), (x, w))

    def third(f):
        y = f(x, w, b)
        d1 = torch.autograd.grad(y.sin().sum(), (x, w, b), create_graph=True)
        s = d1[0].sin().sum() + d1[1].square().sum() + d1[2].exp().sum()
        d2 = torch.autograd.grad(s, (x, w, b), create_graph=True)
        t = d2[0].square().sum() + d2[1].cos().sum() + d2[2].square().sum()
        return torch.autograd.grad(t, (x, w, b))

    for a, c in zip(third(new), third(ref)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_grouped_conv_under_torch_func():
    """jvp (tangents in every input), forward-over-reverse, hessians (jacfwd over jacrev) and
    vmap: the same as F.conv2d's."""
    torch.manual_seed(1)
    g = 2
    x = torch.randn(2, g * 2, 4, 4, dtype=torch.float64)
    w = torch.randn(g * 3, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(g * 3, dtype=torch.float64)
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)

    def ref(x, w, b):
        return F.conv2d(x, w, b, 1, (1, 1), 1, g)

    def new(x, w, b):
        return _grouped(x, w, b, g, (1, 1))

    for f_new, f_ref in [(new, ref)]:
        a = torch.func.jvp(f_new, (x, w, b), (tx, tw, tb))
        c = torch.func.jvp(f_ref, (x, w, b), (tx, tw, tb))
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)

    def loss(f):
        return lambda x, w, b: f(x, w, b).pow(3).sum().sin()

    a = torch.func.jvp(torch.func.grad(loss(new), argnums=(0, 1)), (x, w, b), (tx, tw, tb))[1]
    c = torch.func.jvp(torch.func.grad(loss(ref), argnums=(0, 1)), (x, w, b), (tx, tw, tb))[1]
    torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    a = torch.func.hessian(lambda w: loss(new)(x, w, b))(w)
    c = torch.func.hessian(lambda w: loss(ref)(x, w, b))(w)
    torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    xs = torch.randn(3, *x.shape, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(lambda v: new(v, w, b))(xs),
                               ref(xs.flatten(0, 1), w, b).view(3, 2, -1, 4, 4))


# ---- bad inputs: a clear error naming the argument -------------------------------------------

@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(in_channels=0), ValueError, "in_channels"),
    (dict(in_channels=True), TypeError, "in_channels"),
    (dict(in_channels=1.0), TypeError, "in_channels"),
    (dict(hidden=2.5), TypeError, "hidden"),
    (dict(hidden=0), ValueError, "hidden"),
    (dict(n_way=0), ValueError, "n_way"),
    (dict(n_way="5"), TypeError, "n_way"),
    (dict(image_size=16.0), TypeError, "image_size"),
    (dict(image_size=-16), ValueError, "image_size"),
    (dict(bn_momentum=float("nan")), ValueError, "bn_momentum"),
    (dict(bn_momentum=-1), ValueError, "bn_momentum"),
    (dict(bn_momentum=5), ValueError, "bn_momentum"),
    (dict(bn_momentum=True), TypeError, "bn_momentum"),
    (dict(bn_momentum="0.1"), TypeError, "bn_momentum"),
])
def test_conv4_bad_constructor_arguments_are_named(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        Conv4(**kwargs)


def test_conv4_accepted_constructor_arguments():
    import numpy as np
    m = Conv4(np.int64(1), hidden=np.int32(4), n_way=3, image_size=np.int64(16), bn_momentum=None)
    assert m.features[1].momentum is None and m.head.in_features == 4
    for mom in (0, 1, 0.5, np.float32(0.25)):
        assert Conv4(1, hidden=2, image_size=16, bn_momentum=mom).features[1].momentum == mom
    m.train()(torch.randn(4, 1, 16, 16))  # cumulative average: no NaN
    assert torch.isfinite(m.features[1].running_mean).all()


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(in_features=0), ValueError, "in_features"),
    (dict(in_features=True), TypeError, "in_features"),
    (dict(out_features=0), ValueError, "out_features"),
    (dict(out_features=2.0), TypeError, "out_features"),
    (dict(hidden=(0,)), ValueError, r"hidden\[0\]"),
    (dict(hidden=(4, 2.5)), TypeError, r"hidden\[1\]"),
    (dict(hidden=(4, False)), TypeError, r"hidden\[1\]"),
    (dict(hidden=40), TypeError, "hidden"),
    (dict(hidden="40"), TypeError, "hidden"),
    (dict(activation=nn.ReLU()), TypeError, "activation"),
    (dict(activation=torch.relu), TypeError, "activation"),
    (dict(activation=lambda: 3), TypeError, "activation"),
    (dict(activation=3), TypeError, "activation"),
    (dict(hidden=(), activation=nn.ReLU()), TypeError, "activation"),
])
def test_mlp_bad_constructor_arguments_are_named(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        MLP(**kwargs)


def test_mlp_accepted_constructor_arguments():
    import numpy as np
    m = MLP(np.int64(2), [np.int32(3)], 1, activation=lambda: nn.LeakyReLU(0.2))
    assert isinstance(m.body[1], nn.LeakyReLU) and m(torch.randn(5, 2)).shape == (5, 1)
    assert MLP(2, iter([3, 4]), 1)(torch.randn(5, 2)).shape == (5, 1)  # any iterable of ints


def _shared_params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("shape", [
    (2, 3, 16, 16),          # channel dim missing (was accepted for T = 1 as [1, B, H, W])
    (1, 3, 16, 16),
    (1, 2, 3, 1, 16, 16),    # 6-D (was accepted)
    (2, 3, 3, 16, 16),       # channels
    (2, 3, 1, 8, 8),         # image size
    (2, 3, 1, 16, 32),
    (0, 3, 1, 16, 16),       # T = 0
    (2, 0, 1, 16, 16),       # B = 0
])
def test_conv4_forward_tasks_bad_x_shape_is_named(shape):
    model = Conv4(1, hidden=4, n_way=2, image_size=16)
    with pytest.raises(ValueError, match=r"x has shape .*expected \[T, B, 1, 16, 16\]"):
        model.forward_tasks(_shared_params(model), torch.randn(shape))


def test_conv4_forward_tasks_bad_x_dtype_type_device_are_named():
    model = Conv4(1, hidden=4, n_way=2, image_size=16)
    params = _shared_params(model)
    with pytest.raises(TypeError, match="x has dtype torch.float64, but the parameters are torch.float32"):
        model.forward_tasks(params, torch.randn(2, 3, 1, 16, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        model.forward_tasks(params, torch.ones(2, 3, 1, 16, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a Tensor"):
        model.forward_tasks(params, [[1.0]])
    with pytest.raises(ValueError, match="x is on meta, but the parameters are on cpu"):
        model.forward_tasks(params, torch.empty(2, 3, 1, 16, 16, device="meta"))
    del params["features.4.weight"]
    with pytest.raises(ValueError, match="params has no entry 'features.4.weight'"):
        model.forward_tasks(params, torch.randn(2, 3, 1, 16, 16))


def test_conv4_forward_tasks_other_image_sizes_that_fit_the_head():
    """H, W with H // 16 = W // 16 = image_size // 16 fit, as in the module's own forward."""
    torch.manual_seed(0)
    model = Conv4(1, hidden=3, n_way=2, image_size=16).double()
    params = _shared_params(model)
    x = torch.randn(2, 3, 1, 17, 19, dtype=torch.float64)
    torch.testing.assert_close(model.forward_tasks(params, x), _per_task_loop(model, params, x),
                               rtol=1e-12, atol=1e-12)


def test_forward_tasks_under_autocast_takes_another_float_dtype():
    model = Conv4(1, hidden=4, n_way=2, image_size=16)
    x = torch.randn(2, 3, 1, 16, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.forward_tasks(_shared_params(model), x).shape == (2, 3, 2)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4, 3), (2, 3, 4), (0, 3, 3), (2, 0, 3)])
def test_mlp_forward_tasks_bad_x_is_named(shape):
    model = MLP(3, (5,), 2)
    with pytest.raises(ValueError, match=r"x has shape .*expected \[T, B, 3\]"):
        model.forward_tasks(_shared_params(model), torch.randn(shape))


def test_mlp_forward_tasks_bad_x_dtype_is_named():
    model = MLP(3, (5,), 2)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        model.forward_tasks(_shared_params(model), torch.randn(2, 4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):  # a linear model (no body)
        MLP(3, (), 2).forward_tasks(_shared_params(MLP(3, (), 2)), torch.randn(2, 4, 3).double())


def test_maml_names_a_bad_x_before_any_conv():
    maml = pymeta.MAML(Conv4(1, hidden=4, n_way=3, image_size=28), inner_steps=1)
    xs = torch.randn(2, 3, 84, 28)  # [T, B, H, W]: the channel dim missing
    with pytest.raises(ValueError, match=r"x has shape \[2, 3, 84, 28\]; expected \[T, B, 1, 28, 28\]"):
        maml.adapt(xs, torch.zeros(2, 3, dtype=torch.long), F.cross_entropy)
