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


def test_weights_follow_swaps_and_parametrizations(monkeypatch):
    """weights() reads the parameter dicts directly (no nn.Module.__getattr__ call): the
    modules' own tensors, those swapped in by torch.func.functional_call, and a parametrized
    weight's computed value (that one through the attribute path)."""
    net = pymeta.LSTMOptimizerNet(hidden_size=3)
    looked_up = []
    getattr_ = nn.Module.__getattr__
    monkeypatch.setattr(nn.Module, "__getattr__",
                        lambda self, name: looked_up.append(name) or getattr_(self, name))
    net.weights()
    assert looked_up == []
    names = ["cell1.weight_ih", "cell1.weight_hh", "cell1.bias_ih", "cell1.bias_hh",
             "cell2.weight_ih", "cell2.weight_hh", "cell2.bias_ih", "cell2.bias_hh",
             "out.weight", "out.bias"]
    params = dict(net.named_parameters())
    assert all(a is params[n] for a, n in zip(net.weights(), names))
    swapped = {n: torch.randn_like(p) for n, p in params.items()}
    seen = []
    net.forward, orig = (lambda: seen.append(net.weights())), net.forward
    try:
        torch.func.functional_call(net, swapped, ())
    finally:
        net.forward = orig
    assert all(a is swapped[n] for a, n in zip(seen[0], names))

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(net.cell2, "weight_hh", Doubled())
    looked_up.clear()
    w = net.weights()
    assert "weight_hh" in looked_up
    torch.testing.assert_close(w[5], 2 * net.cell2.parametrizations.weight_hh.original)
    assert w[0] is net.cell1.weight_ih


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
def test_forward_keeps_grad_shape_and_names_a_non_tensor(backend):
    """A flat grad goes to the op as it is (no view nodes), other shapes are flattened and the
    update reshaped back; either way the results are those of the flat call."""
    torch.manual_seed(2)
    net = pymeta.LSTMOptimizerNet(5).double()
    g = torch.randn(12, dtype=torch.float64)
    s = torch.randn(4, 5, 12, dtype=torch.float64)
    with pymeta.use_backend(backend):
        u1, s1 = net(g, s)
        u2, s2 = net(g.view(3, 4), s)
        u0, _ = net(g[:1].view(()), s[:, :, :1].contiguous())
        assert u1.shape == (12,) and u2.shape == (3, 4) and u0.shape == ()
        assert torch.equal(u1, u2.reshape(-1)) and torch.equal(s1, s2)
        assert u1.grad_fn is not None and "View" not in type(u1.grad_fn).__name__
        with pytest.raises(TypeError, match="grad is a list"):
            net([1.0] * 12, s)


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


def _unroll_meta_grads(net, device, dtype, steps=20, n=60, seed=0, detach_grads=True,
                       state_dtype=None):
    """Summed losses of a quadratic optimizee f(theta) = |A theta - y|^2 over a
    `steps`-step unroll; returns the gradients w.r.t. the net's parameters and theta0."""
    gen = torch.Generator().manual_seed(seed)
    A = (torch.randn(30, n, generator=gen, dtype=torch.float64) / 5).to(device, dtype)
    y = torch.randn(30, generator=gen, dtype=torch.float64).to(device, dtype)
    theta0 = torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    theta = theta0
    state = net.init_state(n, device=device, dtype=state_dtype or dtype)
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
@pytest.mark.parametrize("device", DEVICES)
def test_unroll_with_bf16_state(device):
    """bfloat16 state storage through a 20-step unroll: native and reference agree (both
    round the same float32 state; a rare 1-ulp rounding difference is all they may differ by),
    and the meta-gradient stays near the float32-state one."""
    torch.manual_seed(0)
    net = pymeta.LSTMOptimizerNet(20, out_scale=0.1).to(device)
    runs = {}
    for backend, sd in (("native", torch.bfloat16), ("reference", torch.bfloat16),
                        ("native", None)):
        with pymeta.use_backend(backend):
            runs[backend, sd] = _unroll_meta_grads(net, device, torch.float32, state_dtype=sd)
    (ln, gn), (lr_, gr), (l32, g32) = runs.values()
    torch.testing.assert_close(ln, lr_, rtol=1e-3, atol=0)
    for a, b, c in zip(gn, gr, g32):
        scale = c.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=2e-3)
        torch.testing.assert_close(a / scale, c / scale, rtol=0, atol=5e-2)
    assert any(g.abs().sum() > 0 for g in gn[:-1])


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


# ---- pymeta.LSTMOptimizer (the drop-in torch.optim optimizer) --------------------------------

import os
import pickle

from pymeta.lstm_optimizer import LSTMOptimizer, LSTMOptimizerNet


def _small_net(H=6, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return LSTMOptimizerNet(H).to(dtype)


def _model(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batches(n, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(n)]


def _train(model, opt, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
def test_optimizer_step_equals_net_by_hand(backend):
    net = _small_net()
    model = _model()
    opt = LSTMOptimizer(model.parameters(), net=net)
    params = list(model.parameters())
    by_hand = [p.detach().clone() for p in params]
    states = [net.init_state(p.numel()) for p in params]
    gen = torch.Generator().manual_seed(3)
    with pymeta.use_backend(backend):
        for _ in range(3):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            with torch.no_grad():
                for i, g in enumerate(grads):
                    u, states[i] = net(g, states[i])
                    by_hand[i] = by_hand[i] + u
    for p, q, s in zip(params, by_hand, states):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["lstm_state"], s, rtol=1e-6, atol=1e-7)
        assert opt.state[p]["step"] == 3


def test_optimizer_one_op_call_per_device_and_dtype(monkeypatch):
    from pymeta import ops
    calls = []
    real = ops.lstm_optimizer_step
    monkeypatch.setattr(ops, "lstm_optimizer_step", lambda g, *a: calls.append(g.numel()) or real(g, *a))
    model = _model()
    extra = nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = LSTMOptimizer([*model.parameters(), extra], net=_small_net())
    for p in [*model.parameters(), extra]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(calls) == [4, sum(p.numel() for p in model.parameters())]
    assert extra.dtype == torch.float64 and opt.state[extra]["lstm_state"].dtype == torch.float64


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
def test_optimizer_buckets_bound_the_fused_calls(backend, monkeypatch):
    """bucket_coords splits a step into fused calls of at most that many coordinates (a
    larger parameter alone), with the results of one call per device and dtype (bit for bit
    with the native kernels)."""
    from pymeta import ops
    calls = []
    real = ops.lstm_optimizer_step
    monkeypatch.setattr(ops, "lstm_optimizer_step",
                        lambda g, *a: calls.append(g.numel()) or real(g, *a))
    batches = _batches(4)
    with pymeta.use_backend(backend):
        runs = {}
        for bucket in (1 << 24, 40, 1):
            model = _model()  # params of 35, 7, 21, 3 coordinates
            opt = LSTMOptimizer(model.parameters(), net=_small_net(), bucket_coords=bucket)
            calls.clear()
            runs[bucket] = (_train(model, opt, batches), [p.detach().clone() for p in model.parameters()],
                            [opt.state[p]["lstm_state"].clone() for p in model.parameters()], list(calls))
    (l0, p0, s0, c0), (l1, p1, s1, c1), (l2, p2, s2, c2) = runs.values()
    assert c0 == [66] * 4 and c1 == [35, 31] * 4 and c2 == [35, 7, 21, 3] * 4
    if backend == "native":  # per-coordinate kernels: bit for bit
        assert l0 == l1 == l2
        for a, b, c in zip(p0 + s0, p1 + s1, p2 + s2):
            assert torch.equal(a, b) and torch.equal(a, c)
    else:  # the reference's matmuls block by size
        for a, b, c in zip(p0 + s0, p1 + s1, p2 + s2):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(a, c)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="bucket_coords"):
            LSTMOptimizer(_model().parameters(), net=_small_net(), bucket_coords=bad)


def test_optimizer_param_groups_and_lr_scale():
    net = _small_net()
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = LSTMOptimizer([{"params": [a]}, {"params": [b], "lr": 0.5}], net=net)
    # schedulers drive the groups' lr as for any torch optimizer
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    g = torch.randn(5)
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    torch.testing.assert_close(b - b0, 0.5 * (a - a0))
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05])
    c = nn.Parameter(torch.randn(2))
    opt.add_param_group({"params": [c], "lr": 2.0})
    c.grad = torch.ones(2)
    opt.step()
    assert opt.state[c]["step"] == 1 and opt.state[a]["step"] == 2


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
def test_optimizer_updates_bitwise_per_group_lr_and_a_repeated_parameter(backend):
    """step() adds each parameter's share of the joint update (one foreach add per lr): the
    bits of p + lr * u, per group's lr, as add_ gives them; a parameter listed twice (torch
    warns) is stepped twice, in order, never in a race."""
    net = _small_net()
    ps = [nn.Parameter(torch.randn(s)) for s in ((3, 4), (7,), (2, 3, 5))]
    q = nn.Parameter(torch.randn(6))
    grads = [torch.randn(p.shape) for p in ps] + [torch.randn(6)]
    with pymeta.use_backend(backend):
        u_q, _ = net(grads[3], net.init_state(6))
        want_q = q.detach().clone().add_(u_q, alpha=0.7).add_(u_q, alpha=0.7)
        opt = LSTMOptimizer([{"params": [ps[0], ps[2]]}, {"params": [ps[1]], "lr": 0.3}],
                            net=net)
        # (the joint call runs the parameters in group order: 0, 2, 1)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        u_perm, _ = net(torch.cat([grads[i].reshape(-1) for i in (0, 2, 1)]),
                        net.init_state(sum(p.numel() for p in ps)))
        want = [p.detach().clone() for p in ps]
        for i, lr, lo in ((0, 1.0, 0), (2, 1.0, 12), (1, 0.3, 42)):
            want[i].add_(u_perm[lo:lo + ps[i].numel()].view_as(ps[i]), alpha=lr)
        opt.step()
        for p, w in zip(ps, want):
            assert torch.equal(p.detach(), w)
        with pytest.warns(UserWarning, match="duplicate"):
            opt2 = LSTMOptimizer([{"params": [q, q], "lr": 0.7}], net=net)
        q.grad = grads[3].clone()
        opt2.step()
        assert torch.equal(q.detach(), want_q)


def test_optimizer_missing_grad_skipped_state_untouched():
    net = _small_net()
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4))
    opt = LSTMOptimizer([a, b], net=net)
    a.grad, b.grad = torch.randn(3), torch.randn(4)
    opt.step()
    sb = opt.state[b]["lstm_state"].clone()
    b_before = b.detach().clone()
    a.grad, b.grad = torch.randn(3), None
    opt.step()
    assert torch.equal(b.detach(), b_before)
    assert torch.equal(opt.state[b]["lstm_state"], sb) and opt.state[b]["step"] == 1
    assert opt.state[a]["step"] == 2
    c = nn.Parameter(torch.randn(2))
    opt.add_param_group({"params": [c]})
    opt.step()  # c never had a grad: no state at all
    assert len(opt.state[c]) == 0


def test_optimizer_sparse_grad_error():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = LSTMOptimizer(emb.parameters(), net=_small_net())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_optimizer_closure_and_bad_args():
    model = _model()
    opt = LSTMOptimizer(model.parameters(), net=_small_net())
    x = torch.randn(4, 5)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss
    assert isinstance(opt.step(closure), torch.Tensor)
    with pytest.raises(TypeError, match="LSTMOptimizerNet"):
        LSTMOptimizer(model.parameters(), net=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lr"):
        LSTMOptimizer(model.parameters(), net=_small_net(), lr=-1.0)


def test_optimizer_state_dict_roundtrip_and_bitwise_resume(tmp_path):
    batches = _batches(10)
    model = _model()
    opt = LSTMOptimizer(model.parameters(), net=_small_net())
    full = _train(model, opt, batches)

    model2 = _model()
    opt2 = LSTMOptimizer(model2.parameters(), net=_small_net())
    first = _train(model2, opt2, batches[:5])
    opt2.save(tmp_path / "opt.pt")
    torch.save(model2.state_dict(), tmp_path / "model.pt")
    sd = opt2.state_dict()
    # a plain torch.save of state_dict() loads with weights_only=True too
    torch.save(sd, tmp_path / "plain.pt")
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert plain["param_groups"] == sd["param_groups"]
    for k in sd["state"]:
        assert torch.equal(plain["state"][k]["lstm_state"], sd["state"][k]["lstm_state"])

    # a fresh model and optimizer (with a differently initialized net: the saved one is loaded)
    model3 = _model(seed=9)
    model3.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    opt3 = LSTMOptimizer(model3.parameters(), net=_small_net(seed=5))
    opt3.load(tmp_path / "opt.pt")
    sd3 = opt3.state_dict()
    assert sd3["param_groups"] == sd["param_groups"]
    for k in sd["state"]:
        assert torch.equal(sd3["state"][k]["lstm_state"], sd["state"][k]["lstm_state"])
        assert sd3["state"][k]["step"] == 5
    for k, v in sd["net"]["state_dict"].items():
        assert torch.equal(sd3["net"]["state_dict"][k], v)
    rest = _train(model3, opt3, batches[5:])
    assert first + rest == full  # bitwise: float equality of every loss
    for p, q in zip(model3.parameters(), model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model3.parameters(), model.parameters()):
        assert torch.equal(opt3.state[p]["lstm_state"], opt.state[q]["lstm_state"])


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
def test_optimizer_bf16_state(backend, tmp_path):
    """state_dtype=torch.bfloat16: float32 parameters keep a bfloat16 state (others their own
    dtype), the run stays near the float32-state run, and a saved run resumes bitwise."""
    batches = _batches(6)
    with pymeta.use_backend(backend):
        m32, m16 = _model(), _model()
        o32 = LSTMOptimizer(m32.parameters(), net=_small_net())
        o16 = LSTMOptimizer(m16.parameters(), net=_small_net(), state_dtype=torch.bfloat16)
        l32, l16 = _train(m32, o32, batches), _train(m16, o16, batches)
        assert all(o16.state[p]["lstm_state"].dtype == torch.bfloat16 for p in m16.parameters())
        assert l16 != l32  # the state is rounded ...
        assert l16 == pytest.approx(l32, rel=1e-2)  # ... by 2^-9 relative
        for p, q in zip(m16.parameters(), m32.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)

        # save after 3 batches, resume in a fresh bf16 optimizer: bitwise the straight run
        ma = _model()
        oa = LSTMOptimizer(ma.parameters(), net=_small_net(), state_dtype=torch.bfloat16)
        first = _train(ma, oa, batches[:3])
        oa.save(tmp_path / "opt.pt")
        mb = _model()
        mb.load_state_dict(ma.state_dict())
        ob = LSTMOptimizer(mb.parameters(), net=_small_net(seed=4), state_dtype=torch.bfloat16)
        ob.load(tmp_path / "opt.pt")
        assert all(ob.state[p]["lstm_state"].dtype == torch.bfloat16 for p in mb.parameters())
        assert first + _train(mb, ob, batches[3:]) == l16

        # float64 parameters keep a float64 state
        a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4, dtype=torch.float64))
        o = LSTMOptimizer([a, b], net=_small_net(), state_dtype=torch.bfloat16)
        a.grad, b.grad = torch.randn(3), torch.randn(4, dtype=torch.float64)
        o.step()
        assert o.state[a]["lstm_state"].dtype == torch.bfloat16
        assert o.state[b]["lstm_state"].dtype == torch.float64
    with pytest.raises(ValueError, match="state_dtype"):
        LSTMOptimizer(m32.parameters(), net=_small_net(), state_dtype=torch.float16)


def _held_bytes(opt):
    """Bytes of every distinct storage the optimizer keeps alive (states and cached joints)."""
    tensors = [st["lstm_state"] for st in opt.state.values() if "lstm_state" in st]
    tensors += [j for j, _ in opt._joint.values()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors}.values())


def test_optimizer_state_dict_saves_each_joint_state_once(tmp_path):
    """state_dict() copies no live state (the views of a bucket's joint buffer are saved as
    one storage); a state left on a joint that other parameters moved off is compacted by the
    step, so no stale state is ever held or saved; a state on a storage it shares with
    unrelated data (here: loaded so) is saved as a compact copy."""
    model = _model()
    params = list(model.parameters())
    opt = LSTMOptimizer(params, net=_small_net())
    _train(model, opt, _batches(2))
    sd = opt.state_dict()
    live = [opt.state[p]["lstm_state"] for p in params]
    assert all(sd["state"][i]["lstm_state"] is t for i, t in enumerate(live))
    state_bytes = sum(t.nbytes for t in live)
    assert live[0].untyped_storage().nbytes() == state_bytes  # one joint buffer, no more
    # the last parameter misses a step: its old joint would hold the others' old states
    for p in params:
        p.grad = torch.randn_like(p)
    params[-1].grad = None
    opt.step()
    assert _held_bytes(opt) == sum(opt.state[p]["lstm_state"].nbytes for p in params)
    sd = opt.state_dict()
    assert all(sd["state"][i]["lstm_state"] is opt.state[p]["lstm_state"]
               for i, p in enumerate(params))
    torch.save(sd, tmp_path / "a.pt")
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    for i, p in enumerate(params):
        assert torch.equal(loaded["state"][i]["lstm_state"], opt.state[p]["lstm_state"])
    # states that are views of a larger buffer: copied compactly into the dict
    big = torch.zeros(2 * state_bytes // 4)
    off = 0
    for i in range(4):
        t = loaded["state"][i]["lstm_state"]
        loaded["state"][i]["lstm_state"] = big[off:off + t.numel()].view_as(t).copy_(t)
        off += t.numel()
    opt2 = LSTMOptimizer(_model().parameters(), net=_small_net())
    opt2.load_state_dict(loaded)
    sd2 = opt2.state_dict()
    for i in range(4):
        t = sd2["state"][i]["lstm_state"]
        assert t.untyped_storage().nbytes() == t.nbytes
        assert torch.equal(t, opt.state[params[i]]["lstm_state"])


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
def test_optimizer_buckets_as_parameters_come_and_go(backend):
    """Buckets whose membership changes between steps (missing grads, frozen parameters, a new
    param group): the same results as one fused call per step, and no memory held for states
    that parameters have left (the cache of a bucket that no longer exists included)."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(40,), (25,), (30,), (10,), (33,), (8,)]
    schedule = [range(6), range(6), [0, 2, 4], [3, 4, 5], [4, 5], range(6), [1]]
    runs = []
    with pymeta.use_backend(backend):
        grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in schedule]
        for bucket in (1 << 24, 50):
            params = [nn.Parameter(torch.ones(s)) for s in shapes]
            opt = LSTMOptimizer(params[:5], net=_small_net(), bucket_coords=bucket)
            for t, active in enumerate(schedule):
                if t == 5:
                    opt.add_param_group({"params": [params[5]], "lr": 0.5})
                for i, p in enumerate(params):
                    p.grad = grads[t][i].clone() if i in active and (t >= 5 or i < 5) else None
                opt.step()
                assert _held_bytes(opt) == sum(opt.state[p]["lstm_state"].nbytes
                                               for p in params if "lstm_state" in opt.state[p])
            runs.append(([p.detach().clone() for p in params],
                         [opt.state[p]["lstm_state"].clone() for p in params]))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        if backend == "native":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)


def _blocked_vs_feature_major(backend, device="cpu", state_dtype=None, bucket=1 << 24, steps=4,
                              H=6):
    """The same training run with state_layout "feature_major" and "blocked": losses,
    parameters, states (blocked converted back) and the fused calls' sizes."""
    from pymeta import ops, reference
    calls = []
    real = ops.lstm_optimizer_step
    out = {}
    with pymeta.use_backend(backend):
        for layout in ("feature_major", "blocked"):
            model = _model().to(device)  # params of 35, 7, 21, 3 coordinates
            opt = LSTMOptimizer(model.parameters(), net=_small_net(H).to(device),
                                state_dtype=state_dtype, bucket_coords=bucket,
                                state_layout=layout)
            calls.clear()
            ops.lstm_optimizer_step = lambda g, *a: calls.append(g.numel()) or real(g, *a)
            try:
                losses = _train(model, opt, [(x.to(device), y.to(device))
                                             for x, y in _batches(steps)])
            finally:
                ops.lstm_optimizer_step = real
            states = []
            for p in model.parameters():
                st = opt.state[p]["lstm_state"]
                if layout == "blocked":
                    assert st.shape == ((p.numel() + 15) // 16, 4, H, 16)
                    st = reference.lstm_state_to_feature_major(st)[:, :, :p.numel()]
                states.append(st)
            out[layout] = (losses, [p.detach().clone() for p in model.parameters()], states,
                           list(calls), opt)
    return out


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("bucket", [1 << 24, 40])
def test_optimizer_blocked_layout_same_run(backend, state_dtype, bucket):
    """state_layout="blocked": each parameter padded to whole blocks of 16 in its bucket, the
    same losses, parameters and states as feature-major (bit for bit with the native kernels,
    which compute each coordinate alone); buckets count padded coordinates."""
    out = _blocked_vs_feature_major(backend, state_dtype=state_dtype, bucket=bucket)
    (l0, p0, s0, c0, _), (l1, p1, s1, c1, _) = out["feature_major"], out["blocked"]
    assert c0 == ([66] if bucket > 66 else [35, 31]) * 4
    assert c1 == ([48 + 16 + 32 + 16] if bucket > 112 else [48, 16, 32, 16]) * 4
    for a, b in zip(p0 + s0, p1 + s1):
        if backend == "native":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)
    assert (l0 == l1) if backend == "native" else l0 == pytest.approx(l1)
    with pytest.raises(ValueError, match="state_layout must be 'feature_major' or 'blocked'"):
        LSTMOptimizer(_model().parameters(), net=_small_net(), state_layout="rows")


@pytest.mark.parametrize("cuda_device", [pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("H", [6, 20])
def test_optimizer_blocked_layout_same_run_cuda(cuda_device, state_dtype, H):
    """On a GPU: the same bits as feature-major, where the op converts (H = 6) and where the
    blocked tensor-core kernels run (H = 20)."""
    out = _blocked_vs_feature_major("native", cuda_device, state_dtype, H=H)
    (l0, p0, s0, _, _), (l1, p1, s1, _, _) = out["feature_major"], out["blocked"]
    assert l0 == l1
    for a, b in zip(p0 + s0, p1 + s1):
        assert torch.equal(a, b)


def test_optimizer_blocked_state_dict_across_layouts(tmp_path):
    """A state saved in one layout loads into an optimizer of the other (converted), and the
    runs then go on identically."""
    batches = _batches(6)
    runs = {}
    for saved, loaded in (("feature_major", "blocked"), ("blocked", "feature_major"),
                          ("blocked", "blocked")):
        model = _model()
        opt = LSTMOptimizer(model.parameters(), net=_small_net(), state_layout=saved)
        _train(model, opt, batches[:3])
        opt.save(tmp_path / "opt.pt")
        opt2 = LSTMOptimizer(model.parameters(), net=_small_net(), state_layout=loaded)
        opt2.load(tmp_path / "opt.pt")
        for p in model.parameters():
            want = ((p.numel() + 15) // 16, 4, 6, 16) if loaded == "blocked" else (4, 6, p.numel())
            assert opt2.state[p]["lstm_state"].shape == want
            assert opt2.state[p]["step"] == 3
        runs[(saved, loaded)] = (_train(model, opt2, batches[3:]),
                                 [p.detach().clone() for p in model.parameters()])
    ref_model = _model()
    ref_opt = LSTMOptimizer(ref_model.parameters(), net=_small_net())
    ref = _train(ref_model, ref_opt, batches)[3:]
    for losses, params in runs.values():
        assert losses == ref
        for a, b in zip(params, ref_model.parameters()):
            assert torch.equal(a, b)


def test_optimizer_load_state_dict_checks():
    model = _model()
    opt = LSTMOptimizer(model.parameters(), net=_small_net(H=6))
    _train(model, opt, _batches(2))
    sd = opt.state_dict()
    other = LSTMOptimizer(_model().parameters(), net=_small_net(H=8))
    with pytest.raises(ValueError, match="hidden_size"):
        other.load_state_dict(sd)
    sd_no_net = {k: v for k, v in sd.items() if k != "net"}
    with pytest.raises(ValueError, match="hidden size 6 but this optimizer's net has hidden size 8"):
        other.load_state_dict(sd_no_net)
    wrong_model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))
    with pytest.raises(ValueError, match="does not fit"):
        LSTMOptimizer(wrong_model.parameters(), net=_small_net(H=6)).load_state_dict(sd)
    with pytest.raises(ValueError, match="parameter group"):
        LSTMOptimizer(list(model.parameters())[:2], net=_small_net(H=6)).load_state_dict(sd)


# ---- files: weights_only, corrupt, truncated, wrong hidden size --------------------------------

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_net_save_load_roundtrip(tmp_path):
    net = _small_net(H=7)
    net.save(tmp_path / "net.pt", trained_on="nothing")
    loaded = LSTMOptimizerNet.load(tmp_path / "net.pt")
    assert loaded.config() == net.config() and loaded.info == {"trained_on": "nothing"}
    for a, b in zip(loaded.weights(), net.weights()):
        assert torch.equal(a, b)
    other = _small_net(H=7, seed=3).load_weights(tmp_path / "net.pt")
    assert torch.equal(other.cell2.weight_hh, net.cell2.weight_hh)


def test_net_file_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = _small_net(H=7)
    good = tmp_path / "net.pt"
    net.save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(pymeta.FileFormatError, match="truncated or corrupt"):
        LSTMOptimizerNet.load(tmp_path / "trunc.pt")
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 3: len(corrupt) // 3 + 64] = b"\x00" * 64
    (tmp_path / "corrupt.pt").write_bytes(bytes(corrupt))
    with pytest.raises(pymeta.FileFormatError):
        LSTMOptimizerNet.load(tmp_path / "corrupt.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(pymeta.FileFormatError):
        LSTMOptimizerNet.load(tmp_path / "garbage.pt")
    with pytest.raises(FileNotFoundError):
        LSTMOptimizerNet.load(tmp_path / "missing.pt")
    # another hidden size: a clear error naming both sizes
    with pytest.raises(ValueError, match=r"hidden_size \(file 7, this net 8\)"):
        _small_net(H=8).load_weights(good)
    # a file of another kind
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(pymeta.FileFormatError, match="not a LSTMOptimizerNet weights file"):
        LSTMOptimizerNet.load(tmp_path / "other.pt")
    # weights that do not fit the config
    obj = torch.load(good, weights_only=True)
    obj["state_dict"]["cell2.weight_hh"] = torch.zeros(3, 3)
    obj.pop("sha256")
    torch.save(obj, tmp_path / "misshapen.pt")
    with pytest.raises(pymeta.FileFormatError, match="do not fit"):
        LSTMOptimizerNet.load(tmp_path / "misshapen.pt")


def test_files_never_unpickle_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = _small_net()
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"format": "pymeta.LSTMOptimizerNet", "config": net.config(),
                    "state_dict": net.state_dict(), "evil": _Evil()}, f)
    with pytest.raises(pymeta.FileFormatError, match="never\\s+unpickled|plain containers"):
        LSTMOptimizerNet.load(tmp_path / "evil.pt")
    opt = LSTMOptimizer([nn.Parameter(torch.randn(3))], net=net)
    with pytest.raises(pymeta.FileFormatError):
        opt.load(tmp_path / "evil.pt")
    with open(tmp_path / "evil2.pt", "wb") as f:
        pickle.dump(_Evil(), f, protocol=2)
    with pytest.raises(pymeta.FileFormatError):
        opt.load(tmp_path / "evil2.pt")
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_optimizer_file_errors(tmp_path):
    model = _model()
    opt = LSTMOptimizer(model.parameters(), net=_small_net(H=6))
    _train(model, opt, _batches(2))
    opt.save(tmp_path / "opt.pt")
    data = (tmp_path / "opt.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[:100])
    with pytest.raises(pymeta.FileFormatError, match="truncated or corrupt"):
        opt.load(tmp_path / "trunc.pt")
    other = LSTMOptimizer(_model().parameters(), net=_small_net(H=8))
    with pytest.raises(ValueError, match="hidden_size"):
        other.load(tmp_path / "opt.pt")


def test_pretrained_net_shipped_and_default():
    net = LSTMOptimizerNet.pretrained()
    assert isinstance(net, LSTMOptimizerNet) and "quadratic" in net.info.get("trained_on", "")
    opt = LSTMOptimizer([nn.Parameter(torch.randn(3))])
    assert opt.net.config() == net.config()
    assert all(torch.equal(a, b) for a, b in zip(opt.net.weights(), net.weights()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_optimizer_params_on_two_devices():
    net = _small_net()
    a = nn.Parameter(torch.randn(5))
    b = nn.Parameter(a.detach().clone().cuda())
    opt = LSTMOptimizer([a, b], net=net)
    g = torch.randn(5)
    a.grad, b.grad = g.clone(), g.cuda()
    opt.step()
    assert opt.state[b]["lstm_state"].device.type == "cuda"
    torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-5, atol=1e-6)


# ---- bad inputs: clear errors, nothing changed ---------------------------------------------

import copy
import warnings


def _same(a, b):
    """Bitwise equal tensors (dtype and shape included), or equal plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
    return a == b or (a != a and b != b)  # (NaN lr)


def _snapshot(opt):
    """Copies of everything an optimizer call could change: parameters, states (with step
    counters), the groups' settings and the net's weights."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {"params": [p.detach().clone() for p in params],
            "n_states": len(opt.state),
            "states": [{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                        for k, v in opt.state[p].items()} if p in opt.state else None
                       for p in params],
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "net": [w.detach().clone() for w in opt.net.weights()]}


def _assert_unchanged(opt, snap):
    now = _snapshot(opt)
    assert now["n_states"] == snap["n_states"]
    assert all(_same(a, b) for a, b in zip(now["params"], snap["params"]))
    for a, b in zip(now["states"], snap["states"]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    assert len(now["groups"]) == len(snap["groups"])
    for a, b in zip(now["groups"], snap["groups"]):
        assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    assert all(_same(a, b) for a, b in zip(now["net"], snap["net"]))


def _set_state(key, value):
    def f(opt, a, b):
        opt.state[b][key] = value
    return f


def _misfit_state(opt, a, b):  # hidden size 5 instead of 6, in the optimizer's layout
    opt.state[b]["lstm_state"] = (torch.zeros(4, 5, 3) if opt.state_layout == "feature_major"
                                  else torch.zeros(1, 4, 5, 16))


def _cast_state(dtype):
    def f(opt, a, b):
        opt.state[b]["lstm_state"] = opt.state[b]["lstm_state"].to(dtype)
    return f


def _del_state(key):
    def f(opt, a, b):
        del opt.state[b][key]
    return f


def _set_lr(value):
    def f(opt, a, b):
        opt.param_groups[1]["lr"] = value
    return f


def _del_lr(opt, a, b):
    del opt.param_groups[1]["lr"]


def _swap_data(opt, a, b):  # torch checks .grad on assignment, not on .data swaps
    b.data = b.data.double()


@pytest.mark.parametrize("layout", ["feature_major", "blocked"])
@pytest.mark.parametrize("spoil, exc, match", [
    (_misfit_state, ValueError, r"'lstm_state' of parameter 0 of param group 1 \(shape \[3\]\)"),
    (_cast_state(torch.complex64), TypeError, "'lstm_state' of parameter 0.*complex64"),
    (_cast_state(torch.int64), TypeError, "'lstm_state' of parameter 0.*int64"),
    (_set_state("lstm_state", [0.0] * 72), TypeError, "lstm_state.*list"),
    (_set_state("step", "x"), TypeError, "'step'"),
    (_set_state("step", True), TypeError, "'step'"),
    (_set_state("step", -1), ValueError, "'step'"),
    (_del_state("step"), TypeError, "'step'"),
    (_set_lr("x"), TypeError, "param group 1's lr"),
    (_set_lr(True), TypeError, "param group 1's lr"),
    (_set_lr(float("nan")), ValueError, "param group 1's lr"),
    (_set_lr(float("inf")), ValueError, "param group 1's lr"),
    (_set_lr(-0.5), ValueError, "param group 1's lr"),
    (_del_lr, ValueError, "param group 1 has no 'lr'"),
    (_swap_data, TypeError, r"gradient of parameter 0 of param group 1 \(shape \[3\]\)"),
], ids=["misfit_state", "complex_state", "int_state", "list_state", "step_str", "step_bool",
        "step_negative", "step_missing", "lr_str", "lr_bool", "lr_nan", "lr_inf", "lr_negative",
        "lr_missing", "grad_dtype"])
def test_optimizer_step_checks_all_before_changing_any(layout, spoil, exc, match):
    """A bad state, step counter, lr or gradient in a later bucket (or group): step() raises a
    clear error naming it, and the earlier buckets' parameters, states and step counters are
    as they were (before: the earlier buckets were stepped, then the error)."""
    net = _small_net(H=6)
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    opt = LSTMOptimizer([{"params": [a]}, {"params": [b]}], net=net, bucket_coords=3,
                        state_layout=layout)
    a.grad, b.grad = torch.randn(3), torch.randn(3)
    opt.step()
    a.grad, b.grad = torch.randn(3), torch.randn(3)
    spoil(opt, a, b)
    snap = _snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.step()
    _assert_unchanged(opt, snap)


def test_optimizer_step_refuses_complex_params_up_front():
    a, c = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = LSTMOptimizer([a, c], net=_small_net())
    a.grad, c.grad = torch.randn(3), torch.randn(3, dtype=torch.complex64)
    snap = _snapshot(opt)
    with pytest.raises(TypeError, match=r"parameter 1 of param group 0 \(shape \[3\]\) is "
                                        r"torch.complex64"):
        opt.step()
    _assert_unchanged(opt, snap)
    assert len(opt.state) == 0


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("layout", ["feature_major", "blocked"])
def test_optimizer_half_params_step_in_float32(backend, dtype, state_dtype, layout):
    """float16 / bfloat16 parameters (next to float32 ones): the net runs in float32 on the
    float32 gradient with a float32 (or bfloat16) state, and the float32 update is added into
    the parameter: bit for bit what a float32 copy of it gets from the same gradients,
    rounded to its dtype. A state_dict round trip keeps the state exactly."""
    net = _small_net(H=6)
    gen = torch.Generator().manual_seed(7)
    half = nn.Parameter(torch.randn(37, generator=gen).to(dtype))
    other = nn.Parameter(torch.randn(5, generator=gen))
    copy32 = nn.Parameter(half.detach().float())
    opt = LSTMOptimizer([other, half], net=net, state_dtype=state_dtype, state_layout=layout,
                        lr=0.7)
    ref = LSTMOptimizer([copy32], net=net, state_dtype=state_dtype, state_layout=layout,
                        lr=0.7)
    want_sdtype = torch.bfloat16 if state_dtype is not None else torch.float32
    with pymeta.use_backend(backend):
        for _ in range(4):
            g = torch.randn(37, generator=gen).to(dtype)
            half.grad, copy32.grad = g, g.float()
            other.grad = torch.randn(5, generator=gen)
            with torch.no_grad():
                copy32.copy_(half.float())  # the same start, so the same one rounding
            opt.step()
            ref.step()
            assert half.dtype == dtype
            assert torch.equal(half.detach(), copy32.detach().to(dtype))
            st, st32 = opt.state[half]["lstm_state"], ref.state[copy32]["lstm_state"]
            assert st.dtype == want_sdtype and torch.equal(st, st32)
        assert not torch.equal(half.detach().float(), torch.zeros(37))
        # round trip: the float32/bfloat16 state is not rounded to the parameter's dtype
        sd = opt.state_dict()
        opt2 = LSTMOptimizer([other, half], net=_small_net(H=6, seed=3), state_dtype=state_dtype,
                             state_layout=layout)
        opt2.load_state_dict(sd)
        assert opt2.state[half]["lstm_state"].dtype == want_sdtype
        assert torch.equal(opt2.state[half]["lstm_state"], opt.state[half]["lstm_state"])
        assert opt2.state[half]["step"] == 4 and opt2.param_groups[0]["lr"] == 0.7
        g = torch.randn(37, generator=gen).to(dtype)
        before = half.detach().clone()
        half.grad, other.grad = g, None
        opt2.step()
        after2 = half.detach().clone()
        with torch.no_grad():
            half.copy_(before)
        opt.step()
        assert torch.equal(half.detach(), after2)


def test_optimizer_lr_checked_everywhere():
    params = list(_model().parameters())
    for bad, exc in (("x", TypeError), (True, TypeError), (None, TypeError),
                     (torch.tensor(True), TypeError), (torch.tensor(float("nan")), ValueError),
                     (torch.ones(2), TypeError), (float("nan"), ValueError),
                     (float("inf"), ValueError), (-1.0, ValueError), (10 ** 400, ValueError)):
        with pytest.raises(exc, match="lr"):
            LSTMOptimizer(params, net=_small_net(), lr=bad)
        with pytest.raises(exc, match="param group's lr"):
            LSTMOptimizer([{"params": params[:2]}, {"params": params[2:], "lr": bad}],
                          net=_small_net())
        opt = LSTMOptimizer(params[:2], net=_small_net())
        with pytest.raises(exc, match="param group's lr"):
            opt.add_param_group({"params": params[2:], "lr": bad})
        assert len(opt.param_groups) == 1
    opt = LSTMOptimizer(params, net=_small_net(), lr=0)  # 0 and ints are fine
    assert opt.param_groups[0]["lr"] == 0.0
    opt = LSTMOptimizer(params, net=_small_net(), lr=torch.tensor(0.5))  # as torch's optimizers
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("spoil, exc, match", [
    (lambda sd: sd["net"].__setitem__("state_dict", 5), TypeError,
     r"saved net's weights \(state_dict\['net'\]\['state_dict'\]\) are a int"),
    (lambda sd: sd["net"].pop("state_dict"), ValueError, "saved net has no weights"),
    (lambda sd: sd["net"]["state_dict"].__setitem__("cell2.weight_hh", torch.zeros(3, 3)),
     ValueError, "do not fit.*cell2.weight_hh"),
    (lambda sd: sd["net"]["state_dict"].pop("out.bias"), ValueError, "do not fit.*out.bias"),
    (lambda sd: sd["net"]["state_dict"].__setitem__("out.bias", torch.ones(1).long()),
     TypeError, "out.bias.*int64"),
    (lambda sd: sd["net"]["state_dict"].__setitem__("out.bias", torch.ones(1).cfloat()),
     TypeError, "out.bias.*complex64"),
    (lambda sd: sd["net"]["state_dict"]["out.weight"].__setitem__((0, 1), float("nan")),
     ValueError, "NaN or inf values in out.weight"),
    (lambda sd: sd["net"]["config"].__setitem__("p", 5.0), ValueError, "saved with a net"),
    (lambda sd: sd.__setitem__("net", 5), TypeError, "'net' is a int"),
    (lambda sd: sd["state"][1].pop("step"), TypeError, "state entry 1.*'step'"),
    (lambda sd: sd["state"][1].__setitem__("step", "x"), TypeError, "state entry 1.*'step'"),
    (lambda sd: sd["state"][1].__setitem__("step", 2.0), TypeError, "state entry 1.*'step'"),
    (lambda sd: sd["state"][2].__setitem__(
        "lstm_state", sd["state"][2]["lstm_state"].to(torch.complex64)),
     TypeError, "'lstm_state' of state entry 2.*complex64"),
    (lambda sd: sd["state"][2].__setitem__(
        "lstm_state", sd["state"][2]["lstm_state"].to(torch.int32)),
     TypeError, "'lstm_state' of state entry 2.*int32"),
    (lambda sd: sd["state"][3].pop("lstm_state"), ValueError, "state entry 3.*'lstm_state'"),
    (lambda sd: sd["param_groups"][0].pop("lr"), ValueError, "saved param group 0 has no 'lr'"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", "x"), TypeError,
     "saved param group 0's lr"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", float("nan")), ValueError,
     "saved param group 0's lr"),
    (lambda sd: sd["param_groups"][0].__setitem__("params", [0, 1, 2, [3]]), ValueError,
     "distinct int ids"),
    (lambda sd: sd.__setitem__("param_groups", "x"), TypeError, "'param_groups' must be"),
    (lambda sd: sd.__setitem__("state", []), TypeError, "'state' is a list"),
], ids=["net_weights_int", "net_weights_missing", "net_weight_misshapen", "net_weight_missing",
        "net_weight_int", "net_weight_complex", "net_weight_nan", "net_config", "net_int",
        "step_missing", "step_str", "step_float", "state_complex", "state_int", "state_missing",
        "lr_missing", "lr_str", "lr_nan", "param_ids", "param_groups_str", "state_list"])
def test_optimizer_load_state_dict_checks_all_before_changing_any(spoil, exc, match):
    """Every part of a state_dict is checked before anything is loaded: the target's states,
    step counters, groups and net weights are bitwise unchanged after the error (before:
    the state was replaced, then the saved net's weights failed with a raw KeyError /
    TypeError, or a bad entry was accepted and broke the next step)."""
    model = _model()
    src = LSTMOptimizer(model.parameters(), net=_small_net(H=6), lr=0.5)
    _train(model, src, _batches(3))
    target_model = _model(seed=4)
    target = LSTMOptimizer(target_model.parameters(), net=_small_net(H=6, seed=8))
    _train(target_model, target, _batches(2, seed=6))
    sd = copy.deepcopy(src.state_dict())
    spoil(sd)
    snap = _snapshot(target)
    with pytest.raises(exc, match=match):
        target.load_state_dict(sd)
    _assert_unchanged(target, snap)
    target.load_state_dict(copy.deepcopy(src.state_dict()))  # the unspoilt one loads
    assert target.state[next(iter(target_model.parameters()))]["step"] == 3


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"p": 0}, ValueError, "p must be"), ({"p": -1}, ValueError, "p must be"),
    ({"p": float("nan")}, ValueError, "p must be"), ({"p": float("inf")}, ValueError, "p must be"),
    ({"p": True}, TypeError, "p must be"), ({"p": "10"}, TypeError, "p must be"),
    ({"out_scale": float("nan")}, ValueError, "out_scale"),
    ({"out_scale": float("-inf")}, ValueError, "out_scale"),
    ({"out_scale": False}, TypeError, "out_scale"), ({"out_scale": None}, TypeError, "out_scale"),
    ({"hidden_size": True}, TypeError, "hidden_size"),
    ({"hidden_size": 20.0}, TypeError, "hidden_size"),
    ({"hidden_size": "20"}, TypeError, "hidden_size"),
    ({"hidden_size": None}, TypeError, "hidden_size"),
    ({"hidden_size": 0}, ValueError, "hidden_size"),
    ({"hidden_size": 65}, ValueError, "hidden_size"),
    ({"preprocessing": None}, ValueError, "preprocessing"),
])
def test_net_args_checked(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LSTMOptimizerNet(**kwargs)


def test_net_args_edge_values_accepted():
    net = LSTMOptimizerNet(hidden_size=1, p=1e-3, out_scale=0)
    assert net.config() == {"hidden_size": 1, "preprocessing": "log_sign", "p": 1e-3,
                            "out_scale": 0.0}
    assert LSTMOptimizerNet(hidden_size=64, p=3).p == 3.0


def _net_file(tmp_path, name, net, config=None, weights=None, info=None):
    obj = {"format": "pymeta.LSTMOptimizerNet", "version": 1, "config": net.config(),
           "state_dict": {k: v.clone() for k, v in net.state_dict().items()}, "info": {}}
    if config:
        obj["config"].update(config)
    if weights:
        obj["state_dict"].update(weights)
    if info is not None:
        obj["info"] = info
    torch.save(obj, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("config, weights, info, match", [
    ({"p": float("nan")}, None, None, "invalid config.*p must be"),
    ({"p": 0.0}, None, None, "invalid config.*p must be"),
    ({"out_scale": float("inf")}, None, None, "invalid config.*out_scale"),
    ({"hidden_size": True}, None, None, "invalid config.*hidden_size"),
    ({"extra": 1}, None, None, "invalid config.*extra"),
    (None, {"out.bias": torch.ones(1, dtype=torch.int64)}, None, "out.bias.*int64"),
    (None, {"out.bias": torch.ones(1, dtype=torch.complex64)}, None, "out.bias.*complex64"),
    (None, {"out.bias": torch.tensor([float("nan")])}, None, "NaN or inf values in out.bias"),
    (None, {"cell1.bias_hh": torch.full((24,), float("inf"))}, None, "NaN or inf.*cell1.bias_hh"),
    (None, None, ["a", "b"], "invalid 'info' \\(a list"),
    (None, None, "notes", "invalid 'info' \\(a str"),
])
def test_net_files_with_bad_config_weights_or_info(tmp_path, config, weights, info, match):
    """load and load_weights refuse them with FileFormatError naming the field (no raw
    TypeError, no ComplexWarning), and load_weights leaves the net bitwise as it was."""
    net = _small_net(H=6)
    path = _net_file(tmp_path, "bad.pt", _small_net(H=6, seed=5), config, weights, info)
    before = [w.detach().clone() for w in net.weights()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(pymeta.FileFormatError, match=match):
            LSTMOptimizerNet.load(path)
        with pytest.raises(pymeta.FileFormatError, match=match):
            net.load_weights(path)
    assert all(_same(a, b) for a, b in zip(net.weights(), before))
    # the same file, unspoilt, loads
    good = _net_file(tmp_path, "good.pt", _small_net(H=6, seed=5))
    assert LSTMOptimizerNet.load(good).info == {}
    net.load_weights(good)
    assert not all(_same(a, b) for a, b in zip(net.weights(), before))


def test_init_state_checks():
    net = _small_net(H=5)
    assert net.init_state(0).shape == (4, 5, 0)
    assert net.init_state(0, layout="blocked").shape == (0, 4, 5, 16)
    assert net.init_state(17, layout="blocked", dtype=torch.bfloat16).shape == (2, 4, 5, 16)
    for n, exc in ((-1, ValueError), (True, TypeError), (2.0, TypeError), ("3", TypeError),
                   (None, TypeError)):
        for layout in ("feature_major", "blocked"):
            with pytest.raises(exc, match="init_state: n must be an int >= 0"):
                net.init_state(n, layout=layout)
    for dtype in (torch.int64, torch.complex64, torch.float16, torch.bool, "float32"):
        with pytest.raises(TypeError, match="init_state: dtype must be"):
            net.init_state(3, dtype=dtype)
    with pytest.raises(TypeError, match="dtype"):  # the default: the net's dtype
        LSTMOptimizerNet(5).half().init_state(3)


def test_step_checks_p_for_every_bucket_before_any():
    """The net's p must fit the math dtype of every bucket (e^-p normal: p <= 87.33 in
    float32): checked before the first bucket steps, not when the float32 bucket's op call
    refuses it after the float64 one has been stepped."""
    net = LSTMOptimizerNet(hidden_size=4, p=100.0)
    a = nn.Parameter(torch.randn(3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3))
    opt = LSTMOptimizer([a, b], net=net)
    a.grad, b.grad = torch.randn(3, dtype=torch.float64), torch.randn(3)
    before = a.detach().clone()
    with pytest.raises(ValueError, match=r"p = 100.0 is too large for float32 math, which "
                                         r"some parameters run in: p <= 87.33"):
        opt.step()
    assert torch.equal(a.detach(), before) and not opt.state.get(a)
    b.grad = None
    opt.step()  # p = 100 fits float64
    assert not torch.equal(a.detach(), before) and opt.state[a]["step"] == 1
