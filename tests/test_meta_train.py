"""pymeta.meta_train: learning on quadratics, bitwise resume from a checkpoint, atomic
checkpoints, detached optimizee gradients (first order, as in the paper), and native vs
reference meta-gradients."""
from __future__ import annotations

import os

import pytest
import torch

import pymeta
from pymeta.meta_train import run_learned, run_torch_optimizer, unroll
from pymeta.lstm_optimizer import LSTMOptimizerNet
from pymeta.tasks import QuadraticFamily, QuadraticProblem
from testutil import needs_native

FAM = QuadraticFamily(dim=4)
SMALL = dict(unroll=4, horizon=8, meta_batch=4, meta_lr=1e-2, progress=False)


def _net(seed=0, H=6):
    torch.manual_seed(seed)
    return LSTMOptimizerNet(H)


def _eval(net, steps=8):
    """Mean meta-loss of a fixed batch of unseen problems under the net."""
    p = FAM.sample(32, seed=10_000)
    with torch.no_grad():
        return float(run_learned(net, p, steps)[1:].mean())


def test_meta_loss_decreases_on_quadratics():
    net = _net()
    before = _eval(net)
    hist = pymeta.meta_train(net, FAM, 25, seed=0, **SMALL)
    assert set(hist) >= {"iteration", "meta_loss", "final_loss", "seconds"}
    assert len(hist["meta_loss"]) == 25 and hist["iteration"] == list(range(25))
    after = _eval(net)
    assert after < 0.7 * before, (before, after)
    first, last = hist["meta_loss"][:5], hist["meta_loss"][-5:]
    assert sum(last) < sum(first)


def _strip(h):
    return {k: v for k, v in h.items() if k != "seconds"}


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    ck = tmp_path / "ck.pt"
    full_net = _net()
    full = pymeta.meta_train(full_net, FAM, 5, seed=3, **SMALL)

    part = pymeta.meta_train(_net(), FAM, 2, seed=3, checkpoint=ck, **SMALL)
    assert os.path.exists(ck) and _strip(part) == {k: v[:2] for k, v in _strip(full).items()}
    resumed_net = _net(seed=7)  # the weights come from the checkpoint
    resumed = pymeta.meta_train(resumed_net, FAM, 5, seed=3, checkpoint=ck, **SMALL)
    assert _strip(resumed) == _strip(full)
    for a, b in zip(resumed_net.parameters(), full_net.parameters()):
        assert torch.equal(a, b)
    # already done: returns the history without training
    again = pymeta.meta_train(_net(), FAM, 5, seed=3, checkpoint=ck, **SMALL)
    assert _strip(again) == _strip(full)
    # a checkpoint of another run is refused
    with pytest.raises(ValueError, match="another run"):
        pymeta.meta_train(_net(), FAM, 6, seed=4, checkpoint=ck, **SMALL)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    ck = tmp_path / "ck.pt"
    pymeta.meta_train(_net(), FAM, 2, seed=0, checkpoint=ck, checkpoint_every=1, **SMALL)
    good = ck.read_bytes()
    from pymeta import _io

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):  # writes half a file, then "crashes"
        real_save(obj, f, *a, **k)
        f.seek(0)
        f.truncate(100)
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(_io.torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        pymeta.meta_train(_net(), FAM, 4, seed=0, checkpoint=ck, checkpoint_every=1, **SMALL)
    monkeypatch.undo()
    assert ck.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # no temporary file left behind
    # the old checkpoint is still valid: resuming from it works
    hist = pymeta.meta_train(_net(), FAM, 3, seed=0, checkpoint=ck, **SMALL)
    assert hist["iteration"] == [0, 1, 2]
    # and a damaged one is reported clearly
    (tmp_path / "bad.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(pymeta.FileFormatError, match="truncated or corrupt"):
        pymeta.meta_train(_net(), FAM, 3, seed=0, checkpoint=tmp_path / "bad.pt", **SMALL)


def test_lstm_inputs_are_detached_and_match_a_manual_first_order_unroll():
    torch.manual_seed(0)
    net = _net().double()
    prob = FAM.sample(3, seed=1, dtype=torch.float64)
    theta0 = prob.init_theta()
    seen = []

    def check(g):
        seen.append(g)
        assert g.grad_fn is None and not g.requires_grad
    loss, theta, state, _ = unroll(net, prob, theta0, net.init_state(prob.numel), 0, 5,
                                      on_grad=check)
    assert len(seen) == 5
    grads = torch.autograd.grad(loss, list(net.parameters()))

    # by hand: analytic gradients 2 W^T (W theta - y), as constants
    W, y = prob.W, prob.y
    th = theta0.view(3, 4)
    st = net.init_state(prob.numel)
    total = 0
    for _ in range(5):
        r = torch.bmm(W, th.detach().unsqueeze(2)).squeeze(2) - y
        g = 2 * torch.bmm(W.transpose(1, 2), r.unsqueeze(2)).squeeze(2)
        u, st = net(g.reshape(-1), st)
        th = th + u.view(3, 4)
        total = total + ((torch.bmm(W, th.unsqueeze(2)).squeeze(2) - y) ** 2).sum(1).mean()
    torch.testing.assert_close(loss, total, rtol=1e-12, atol=1e-12)
    manual = torch.autograd.grad(total, list(net.parameters()))
    for a, b in zip(grads, manual):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a second-order unroll would differ: the first-order choice is visible
    assert theta.requires_grad and state.requires_grad


class _ScaledQuadratic(QuadraticProblem):
    """A subclass with a loss of its own: the closed form must step aside."""

    def _losses(self, params, step):
        return 3.0 * super()._losses(params, step) + params[0].pow(4).sum(1)


class _PublicLosses(pymeta.tasks.OptimizeeProblem):
    """Overrides the public losses() only."""

    def __init__(self, inner):
        self.inner, self.batch, self.shapes = inner, inner.batch, inner.shapes
        self.device, self.dtype, self.theta0 = inner.device, inner.dtype, inner.theta0

    def losses(self, theta, step=0):
        return self.inner.losses(theta, step) + theta.view(self.batch, -1).sin().sum(1)


class _DuckProblem:
    """Not an OptimizeeProblem: only what meta_train's unroll reads."""

    def __init__(self, inner):
        self.inner, self.numel = inner, inner.numel

    def init_theta(self):
        return self.inner.init_theta()

    def losses(self, theta, step=0):
        return self.inner.losses(theta, step).cos() + theta.view(self.inner.batch, -1).pow(2).sum(1)


def _assert_unroll_matches_by_hand(net, prob, losses_fn, theta0, numel, steps):
    """unroll's meta-loss and meta-gradient against the first-order unroll by hand through
    autograd of losses_fn (grads are constants to the net)."""
    loss, *_ = unroll(net, prob, theta0, net.init_state(numel), 0, steps)
    th, st, total = theta0, net.init_state(numel), 0
    for t in range(steps):
        leaf = th.detach().requires_grad_()
        (g,) = torch.autograd.grad(losses_fn(leaf, t).sum(), leaf)
        u, st = net(g, st)
        th = th + u
        total = total + losses_fn(th, t + 1).mean()
    torch.testing.assert_close(loss, total, rtol=1e-12, atol=1e-12)
    w = list(net.parameters())
    for a, b in zip(torch.autograd.grad(loss, w), torch.autograd.grad(total, w)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["subclass_losses", "public_losses", "duck"])
def test_unroll_uses_the_problems_own_loss(kind):
    """Problems whose loss is not the quadratic's own (a subclass's _losses, an override of
    losses(), an object that is no OptimizeeProblem) get the meta-gradient of their loss."""
    torch.manual_seed(0)
    net = _net().double()
    base = FAM.sample(3, seed=4, dtype=torch.float64)
    prob = {"subclass_losses": lambda: _ScaledQuadratic(base.W, base.y, base.theta0),
            "public_losses": lambda: _PublicLosses(base), "duck": lambda: _DuckProblem(base)}[kind]()
    _assert_unroll_matches_by_hand(net, prob, prob.losses, base.init_theta() + 0.2, base.numel, 4)


def _loss_graph_unroll(net, prob, theta0, steps, clip=None):
    """The unroll as it was built before _MetaLossTerm: each step's loss graph kept."""
    th = theta0.detach().requires_grad_()
    st, total = net.init_state(prob.numel), 0
    loss = prob.losses(th, 0)
    for t in range(steps):
        (g,) = torch.autograd.grad(loss.sum(), th, retain_graph=t > 0)
        u, st = net(g if clip is None else g.clamp(-clip, clip), st)
        th = th + u
        loss = prob.losses(th, t + 1)
        total = total + loss.mean()
    return total


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_unroll_higher_derivatives_forward_mode_and_on_grad_edits():
    """The meta-loss terms keep the loss's second derivatives for a recorded backward
    (Hessian-vector products w.r.t. the net), give forward-mode AD the reverse-mode value,
    and an on_grad that clips in place changes what the net is fed, not the meta-loss."""
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    net = _net(H=4).double()
    w = list(net.parameters())
    prob = FAM.sample(3, seed=6, dtype=torch.float64)
    theta0 = prob.init_theta() + 0.1
    vs = [torch.randn_like(x) for x in w]

    def hvp(loss):
        g = torch.autograd.grad(loss, w, create_graph=True)
        return torch.autograd.grad(sum((a * v).sum() for a, v in zip(g, vs)), w)
    new, *_ = unroll(net, prob, theta0, net.init_state(prob.numel), 0, 3)
    d_rev = sum((a * v).sum() for a, v in zip(torch.autograd.grad(new, w, retain_graph=True), vs))
    for a, b in zip(hvp(new), hvp(_loss_graph_unroll(net, prob, theta0, 3))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(x.detach(), v) for (k, x), v in zip(net.named_parameters(), vs)}
        with torch.nn.utils.stateless._reparametrize_module(net, duals):
            fwd, *_ = unroll(net, prob, theta0, net.init_state(prob.numel), 0, 3)
        d_fwd = fwAD.unpack_dual(fwd).tangent
    torch.testing.assert_close(d_fwd, d_rev, rtol=1e-9, atol=1e-12)

    clipped, *_ = unroll(net, prob, theta0, net.init_state(prob.numel), 0, 3,
                         on_grad=lambda g: g.clamp_(-0.1, 0.1))
    want = _loss_graph_unroll(net, prob, theta0, 3, clip=0.1)
    torch.testing.assert_close(clipped, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(clipped, w), torch.autograd.grad(want, w)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_quadratic_closed_form_steps_aside_for_an_instance_loss():
    torch.manual_seed(0)
    net = _net().double()
    prob = FAM.sample(2, seed=7, dtype=torch.float64)
    plain = prob.losses
    prob.losses = lambda theta, step=0: plain(theta, step) + theta.view(2, -1).pow(2).sum(1)
    _assert_unroll_matches_by_hand(net, prob, prob.losses, prob.init_theta() + 0.2, prob.numel, 3)


@needs_native
def test_native_and_reference_meta_gradients_agree():
    torch.manual_seed(0)
    net = LSTMOptimizerNet(20).double()
    prob = FAM.sample(8, seed=2, dtype=torch.float64)
    out = {}
    for backend in ("native", "reference"):
        with pymeta.use_backend(backend):
            loss, *_ = unroll(net, prob, prob.init_theta(), net.init_state(prob.numel), 0, 6)
            out[backend] = (loss, torch.autograd.grad(loss, list(net.parameters())))
    torch.testing.assert_close(out["native"][0], out["reference"][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(out["native"][1], out["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_meta_train_digits_mlp_smoke():
    from pymeta.tasks import DigitsMLPFamily
    hist = pymeta.meta_train(_net(), DigitsMLPFamily(hidden=5, batch_size=16), 1, unroll=2,
                             horizon=4, meta_batch=2, progress=False)
    assert len(hist["meta_loss"]) == 1 and hist["meta_loss"][0] > 0


def test_meta_train_bf16_state(tmp_path, monkeypatch):
    """state_dtype=torch.bfloat16: the net sees bfloat16 states, the run resumes bitwise from
    its checkpoint, stays near the float32-state run, and a float32-state checkpoint is
    another run."""
    seen = set()
    real = LSTMOptimizerNet.forward

    def spy(self, grad, state):
        seen.add(state.dtype)
        return real(self, grad, state)
    monkeypatch.setattr(LSTMOptimizerNet, "forward", spy)
    ck = tmp_path / "ck.pt"
    bf16 = dict(SMALL, state_dtype=torch.bfloat16)
    full = pymeta.meta_train(_net(), FAM, 4, seed=3, **bf16)
    assert seen == {torch.bfloat16}
    pymeta.meta_train(_net(), FAM, 2, seed=3, checkpoint=ck, **bf16)
    resumed = pymeta.meta_train(_net(seed=7), FAM, 4, seed=3, checkpoint=ck, **bf16)
    assert _strip(resumed) == _strip(full)
    f32 = pymeta.meta_train(_net(), FAM, 4, seed=3, **SMALL)
    same = pymeta.meta_train(_net(), FAM, 4, seed=3, state_dtype=torch.float32, **SMALL)
    assert _strip(same) == _strip(f32)  # state_dtype=dtype: the default spelled out
    assert f32["meta_loss"] != full["meta_loss"]
    assert full["meta_loss"] == pytest.approx(f32["meta_loss"], rel=0.05)
    with pytest.raises(ValueError, match="another run"):
        pymeta.meta_train(_net(), FAM, 5, seed=3, checkpoint=ck, **SMALL)
    with pytest.raises(ValueError, match="state_dtype"):
        pymeta.meta_train(_net(), FAM, 1, state_dtype=torch.bfloat16, dtype=torch.float64,
                          progress=False)


def test_meta_train_argument_errors():
    with pytest.raises(TypeError, match="LSTMOptimizerNet"):
        pymeta.meta_train(torch.nn.Linear(2, 2), FAM, 1)
    with pytest.raises(ValueError, match="unroll"):
        pymeta.meta_train(_net(), FAM, 1, unroll=0)


def test_run_torch_optimizer_matches_per_problem_runs():
    fam = QuadraticFamily(3)
    batch = fam.sample(4, seed=5)
    L = run_torch_optimizer(batch, 10, lambda p: torch.optim.Adam(p, lr=0.1))
    assert L.shape == (11, 4)
    # the same as running each problem alone
    from pymeta.tasks import QuadraticProblem
    for b in range(4):
        one = QuadraticProblem(batch.W[b:b + 1], batch.y[b:b + 1], batch.theta0.view(4, 3)[b])
        Lb = run_torch_optimizer(one, 10, lambda p: torch.optim.Adam(p, lr=0.1))
        torch.testing.assert_close(Lb[:, 0], L[:, b])


# ---- bad inputs: a clear error, and the net untouched ------------------------------------------

TINY = dict(unroll=2, horizon=4, meta_batch=2, progress=False)


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _assert_untouched(net, snap, dtype=torch.float32, device="cpu"):
    for k, v in net.state_dict().items():
        assert v.dtype == dtype and v.device == torch.device(device), k
        assert torch.equal(v, snap[k]), k  # bitwise (no NaNs in a fresh net)


class _NoSample:
    sample = 3  # not callable


@pytest.mark.parametrize("kw, exc, name", [
    (dict(dtype=torch.float16), ValueError, "dtype"),
    (dict(dtype=torch.bfloat16), ValueError, "dtype"),
    (dict(dtype=torch.int32), ValueError, "dtype"),
    (dict(dtype=None), TypeError, "dtype"),
    (dict(dtype="float32"), TypeError, "dtype"),
    (dict(device="meta"), ValueError, "device"),
    (dict(device="nope"), ValueError, "device"),
    (dict(device=True), TypeError, "device"),
    (dict(device=1.5), ValueError, "device"),
    (dict(checkpoint=5), TypeError, "checkpoint"),
    (dict(checkpoint=b"ck.pt"), TypeError, "checkpoint"),
    (dict(checkpoint=""), ValueError, "checkpoint"),
    (dict(meta_lr=float("inf")), ValueError, "meta_lr"),
    (dict(meta_lr=float("nan")), ValueError, "meta_lr"),
    (dict(meta_lr=0.0), ValueError, "meta_lr"),
    (dict(meta_lr=-1e-3), ValueError, "meta_lr"),
    (dict(meta_lr=True), TypeError, "meta_lr"),
    (dict(meta_lr="1e-3"), TypeError, "meta_lr"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(seed="0"), TypeError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(family=None), TypeError, "family"),
    (dict(family=_NoSample()), TypeError, "family"),
    (dict(iterations=-1), ValueError, "iterations"),
    (dict(state_dtype=torch.float16), ValueError, "state_dtype"),
    (dict(distributed="yes"), TypeError, "distributed"),
], ids=lambda v: repr(v) if not isinstance(v, (dict, type)) else None)
@pytest.mark.parametrize("distributed", [False, True], ids=["single", "distributed"])
def test_meta_train_bad_argument_raises_before_touching_the_net(kw, exc, name, distributed):
    """distributed=True without a process group takes the distributed branch as one rank: it
    shares the same up-front checks."""
    net = _net()
    snap = _snapshot(net)
    args = dict(dict(family=FAM, iterations=2, distributed=distributed), **TINY)
    args.update(kw)
    with pytest.raises(exc, match=rf"^pymeta\.meta_train: {name}\b"):  # ours, naming it
        pymeta.meta_train(net, **args)
    _assert_untouched(net, snap)


def test_meta_train_device_checks(tmp_path):
    net = _net()
    snap = _snapshot(net)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device.*CUDA is not available"):
            pymeta.meta_train(net, FAM, 1, device="cuda", **TINY)
    else:
        with pytest.raises(ValueError, match="device.*CUDA devices"):
            pymeta.meta_train(net, FAM, 1, device=f"cuda:{torch.cuda.device_count()}", **TINY)
    with pytest.raises(ValueError, match="net's weights are on the meta device"):
        pymeta.meta_train(_net().to("meta"), FAM, 1, **TINY)
    # a checkpoint path whose folder is missing, or a folder, fails now, not at the first save
    with pytest.raises(ValueError, match="checkpoint.*does not exist"):
        pymeta.meta_train(net, FAM, 1, checkpoint=tmp_path / "no" / "ck.pt", **TINY)
    with pytest.raises(ValueError, match="checkpoint.*directory"):
        pymeta.meta_train(net, FAM, 1, checkpoint=tmp_path, **TINY)
    _assert_untouched(net, snap)


def test_meta_train_accepted_arguments():
    """numpy ints and floats are ints and reals; device as a str; a run is unchanged."""
    import numpy as np
    a, b = _net(), _net()
    ha = pymeta.meta_train(a, FAM, 1, seed=3, meta_lr=1e-2, **TINY)
    hb = pymeta.meta_train(b, FAM, 1, seed=np.int64(3), meta_lr=np.float64(1e-2), device="cpu",
                           **TINY)
    assert _strip(ha) == _strip(hb)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """A float32 checkpoint after 2 iterations of a tiny run, and its loaded contents."""
    from pymeta._io import safe_load
    path = tmp_path_factory.mktemp("ck") / "ck.pt"
    pymeta.meta_train(_net(), FAM, 2, seed=1, checkpoint=path, **TINY)
    return path, safe_load(path, "checkpoint")


def test_config_mismatch_with_another_dtype_leaves_the_net_float32(tmp_path, good_checkpoint):
    path, _ = good_checkpoint
    net = _net(seed=7)
    snap = _snapshot(net)
    with pytest.raises(ValueError, match="another run.*dtype"):
        pymeta.meta_train(net, FAM, 3, seed=1, checkpoint=path, dtype=torch.float64, **TINY)
    _assert_untouched(net, snap)
    with pytest.raises(ValueError, match="iterations=1"):  # the file has done 2 already
        pymeta.meta_train(net, FAM, 1, seed=1, checkpoint=path, **TINY)
    _assert_untouched(net, snap)


def _adam_with(ck, **state0):
    adam = {"state": dict(ck["adam"]["state"]), "param_groups": ck["adam"]["param_groups"]}
    adam["state"][0] = {**adam["state"][0], **state0}
    return adam


def _corruptions(ck):
    """(field the error must name, the changed entries) for one corrupt checkpoint each."""
    net_sd, hist = ck["net"], ck["history"]
    k0 = next(iter(net_sd))
    return [
        ("version", {"version": 2}),
        ("config", {"config": [1, 2]}),
        ("iteration", {"iteration": "x"}),
        ("iteration", {"iteration": -3}),
        ("iteration", {"iteration": True}),
        ("iteration", {"iteration": 2.0}),
        ("history", {"history": [1, 2]}),
        ("history", {"history": {k: v for k, v in hist.items() if k != "skipped"}}),
        ("history", {"history": {**hist, "meta_loss": hist["meta_loss"][:1]}}),
        ("history", {"history": {**hist, "seconds": ["a", "b"]}}),
        ("history", {"history": {**hist, "iteration": [0, 0]}}),
        ("net", {"net": "weights"}),
        ("net", {"net": {**net_sd, k0: net_sd[k0].to(torch.complex64)}}),
        ("net", {"net": {**net_sd, k0: net_sd[k0].to(torch.int32)}}),
        ("net", {"net": {**net_sd, k0: torch.full_like(net_sd[k0], float("nan"))}}),
        ("net", {"net": {**net_sd, k0: net_sd[k0].to_sparse()}}),
        ("net", {"net": {**net_sd, k0: net_sd[k0][:1]}}),
        ("net", {"net": {k: v for k, v in net_sd.items() if k != k0}}),
        ("net", {"net": {**net_sd, "extra": net_sd[k0]}}),
        ("adam", {"adam": "x"}),
        ("adam", {"adam": {"state": {}, "param_groups": []}}),
        ("adam", {"adam": {**ck["adam"], "param_groups": [
            {**ck["adam"]["param_groups"][0], "params": [0, 1]}]}}),
        ("adam", {"adam": {**ck["adam"], "param_groups": [
            {**ck["adam"]["param_groups"][0], "lr": 1.0}]}}),
        ("adam", {"adam": _adam_with(ck, exp_avg=torch.zeros(3))}),
        ("adam", {"adam": _adam_with(ck, exp_avg_sq=None)}),
        ("adam", {"adam": _adam_with(ck, step=torch.tensor(-1.0))}),
        ("adam", {"adam": {**ck["adam"], "state": {**ck["adam"]["state"], 99: {}}}}),
    ]


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("distributed", [False, True], ids=["single", "distributed"])
def test_corrupt_checkpoint_is_refused_before_anything_is_loaded(tmp_path, good_checkpoint,
                                                                distributed):
    """Each corrupt entry raises a FileFormatError naming the file and the entry; the net
    keeps its weights and dtype. (Written by torch.save: a file without a checksum, which
    safe_load accepts, and the checksum cannot hash a sparse tensor.)"""
    _, ck = good_checkpoint
    bad = tmp_path / "bad.pt"
    cases = _corruptions(ck)
    assert len(cases) >= 20
    for field, change in cases:
        torch.save({**ck, **change}, bad)
        before = bad.read_bytes()
        net = _net(seed=7)
        snap = _snapshot(net)
        with pytest.raises(pymeta.FileFormatError) as info:
            pymeta.meta_train(net, FAM, 3, seed=1, checkpoint=bad, distributed=distributed,
                              **TINY)
        msg = str(info.value)
        assert str(bad) in msg and repr(field) in msg, (field, msg)
        _assert_untouched(net, snap)
        assert bad.read_bytes() == before  # nor the file
    # the untouched checkpoint still resumes
    torch.save(ck, bad)
    hist = pymeta.meta_train(_net(seed=7), FAM, 3, seed=1, checkpoint=bad,
                             distributed=distributed, **TINY)
    assert hist["iteration"] == [0, 1, 2]


@pytest.mark.parametrize("steps, exc", [(-1, ValueError), (1.5, TypeError), ("2", TypeError),
                                        (None, TypeError), (True, TypeError)])
def test_run_functions_check_steps(steps, exc):
    p = FAM.sample(2, seed=0)
    with pytest.raises(exc, match="^pymeta.run_learned: steps"):
        run_learned(_net(), p, steps)
    with pytest.raises(exc, match="^pymeta.run_torch_optimizer: steps"):
        run_torch_optimizer(p, steps, lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert not hasattr(p, "last_theta")


def test_run_functions_check_their_arguments():
    p = FAM.sample(2, seed=0)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    with pytest.raises(TypeError, match="^pymeta.run_learned: net"):
        run_learned(torch.nn.Linear(2, 2), p, 2)
    with pytest.raises(ValueError, match="^pymeta.run_learned: net"):
        run_learned(_net().to("meta"), p, 2)
    for who in (lambda q: run_learned(_net(), q, 2), lambda q: run_torch_optimizer(q, 2, sgd)):
        with pytest.raises(TypeError, match=r"^pymeta\.run_\w+: problem"):
            who(FAM)  # the family, not a sampled problem
        with pytest.raises(TypeError, match=r"^pymeta\.run_\w+: problem"):
            who(None)
    with pytest.raises(TypeError, match="^pymeta.run_torch_optimizer: make_optimizer"):
        run_torch_optimizer(p, 2, torch.optim.SGD([torch.zeros(1, requires_grad=True)]))
    with pytest.raises(TypeError, match="^pymeta.run_torch_optimizer: make_optimizer"):
        run_torch_optimizer(p, 2, lambda ps: ps)
    assert not hasattr(p, "last_theta")
    # steps=0: the initial losses only
    assert run_learned(_net(), p, 0).shape == (1, 2)
    assert run_torch_optimizer(p, 0, sgd).shape == (1, 2)


def test_meta_train_checks_p_against_dtype_before_converting():
    """A float64 net with p = 100 (fine in float64) asked to train in float32 (p <= 87.33):
    refused before the net is converted, not by the first op call after it."""
    net = LSTMOptimizerNet(hidden_size=6, p=100.0).double()
    snap = _snapshot(net)
    with pytest.raises(ValueError, match=r"^pymeta\.meta_train: the net's p = 100.0 is too "
                                         r"large for dtype=torch.float32: p <= 87.33"):
        pymeta.meta_train(net, FAM, 1, dtype=torch.float32, **TINY)
    _assert_untouched(net, snap, dtype=torch.float64)
