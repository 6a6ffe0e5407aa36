"""pymeta.LSTMOptimizerNet: parameters and state_dict of nn.LSTMCell x 2 + nn.Linear, shapes,
and meta-gradients through 20-step unrolls equal to the reference's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pymeta
from pymeta import _backend

native_only = pytest.mark.skipif(not _backend.NATIVE, reason="pymeta._C is not built")
cuda = [pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def test_parameters_are_lstmcells_and_linear():
    net = pymeta.LSTMOptimizerNet(hidden_size=20)
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {
        "cell1.weight_ih": [80, 2], "cell1.weight_hh": [80, 20], "cell1.bias_ih": [80],
        "cell1.bias_hh": [80], "cell2.weight_ih": [80, 20], "cell2.weight_hh": [80, 20],
        "cell2.bias_ih": [80], "cell2.bias_hh": [80], "out.weight": [1, 20], "out.bias": [1]}
    assert pymeta.LSTMOptimizerNet(8, "none").cell1.weight_ih.shape == (32, 1)
    # A state_dict of plain modules of that shape loads.
    plain = nn.ModuleDict({"cell1": nn.LSTMCell(2, 20), "cell2": nn.LSTMCell(20, 20),
                           "out": nn.Linear(20, 1)})
    net.load_state_dict(plain.state_dict())
    assert torch.equal(net.cell2.weight_hh, plain["cell2"].weight_hh)


def test_init_state_and_shapes():
    net = pymeta.LSTMOptimizerNet(hidden_size=5).double()
    s = net.init_state(12)
    assert s.shape == (4, 5, 12) and s.dtype == torch.float64 and (s == 0).all()
    assert net.init_state(3, dtype=torch.float32).dtype == torch.float32
    g = torch.randn(3, 4, dtype=torch.float64)
    update, s2 = net(g, s)
    assert update.shape == (3, 4) and s2.shape == (4, 5, 12)
    with pytest.raises(ValueError, match="preprocessing"):
        pymeta.LSTMOptimizerNet(preprocessing="adam")


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
def test_forward_matches_modules(backend):
    torch.manual_seed(1)
    net = pymeta.LSTMOptimizerNet(7).double()
    g = torch.randn(10, dtype=torch.float64) * 10.0 ** torch.randint(-9, 2, (10,))
    state = torch.randn(4, 7, 10, dtype=torch.float64)
    with pymeta.use_backend(backend):
        update, new_state = net(g, state)
    # by hand, through the submodules
    a = g.abs()
    big = a >= torch.exp(torch.tensor(-10.0, dtype=torch.float64))
    x = torch.stack([torch.where(big, a.clamp_min(1e-300).log() / 10, -torch.ones_like(a)),
                     torch.where(big, g.sign(), g * torch.exp(torch.tensor(10.0)).double())], 1)
    h1, c1 = net.cell1(x, (state[0].t(), state[1].t()))
    h2, c2 = net.cell2(h1, (state[2].t(), state[3].t()))
    torch.testing.assert_close(update, 0.1 * net.out(h2).squeeze(1))
    torch.testing.assert_close(new_state, torch.stack([h1.t(), c1.t(), h2.t(), c2.t()]))


def _unroll_meta_grads(net, device, dtype, steps=20, n=60, seed=0, detach_grads=True):
    """Summed losses of a quadratic optimizee f(theta) = |A theta - y|^2 over a
    `steps`-step unroll; returns the gradients w.r.t. the net's parameters and theta0."""
    gen = torch.Generator().manual_seed(seed)
    A = (torch.randn(30, n, generator=gen, dtype=torch.float64) / 5).to(device, dtype)
    y = torch.randn(30, generator=gen, dtype=torch.float64).to(device, dtype)
    theta0 = torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    theta = theta0
    state = net.init_state(n, device=device, dtype=dtype)
    total = 0.0
    for _ in range(steps):
        loss = ((A @ theta - y) ** 2).sum()
        (g,) = torch.autograd.grad(loss, theta, retain_graph=True, create_graph=not detach_grads)
        if detach_grads:
            g = g.detach()
        update, state = net(g, state)
        theta = theta + update
        total = total + ((A @ theta - y) ** 2).sum()
    params = [*net.parameters(), theta0]
    return total.detach(), torch.autograd.grad(total, params)


@native_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H", [20, 32])
def test_20_step_unroll_meta_gradient_matches_reference(device, dtype, H):
    torch.manual_seed(0)
    net = pymeta.LSTMOptimizerNet(H, out_scale=0.1).to(device=device, dtype=dtype)
    with pymeta.use_backend("native"):
        loss_n, grads_n = _unroll_meta_grads(net, device, dtype)
    with pymeta.use_backend("reference"):
        loss_r, grads_r = _unroll_meta_grads(net, device, dtype)
    rtol, atol = (1e-8, 1e-10) if dtype == torch.float64 else (2e-3, 1e-4)
    torch.testing.assert_close(loss_n, loss_r, rtol=rtol, atol=atol)
    for a, b in zip(grads_n, grads_r):
        scale = b.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(a / scale, b / scale, rtol=rtol, atol=atol)
    assert any(g.abs().sum() > 0 for g in grads_n[:-1])


@native_only
def test_unroll_through_grad_too():
    """Without detaching the optimizee's gradients (second order through the preprocessing)."""
    torch.manual_seed(0)
    net = pymeta.LSTMOptimizerNet(6).double()
    with pymeta.use_backend("native"):
        _, grads_n = _unroll_meta_grads(net, "cpu", torch.float64, steps=5, n=20,
                                        detach_grads=False)
    with pymeta.use_backend("reference"):
        _, grads_r = _unroll_meta_grads(net, "cpu", torch.float64, steps=5, n=20,
                                        detach_grads=False)
    for a, b in zip(grads_n, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@native_only
def test_meta_gradients_bitwise_reproducible():
    torch.manual_seed(0)
    net = pymeta.LSTMOptimizerNet(20).float()
    with pymeta.use_backend("native"):
        _, g1 = _unroll_meta_grads(net, "cpu", torch.float32, steps=5, n=3000)
        _, g2 = _unroll_meta_grads(net, "cpu", torch.float32, steps=5, n=3000)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
