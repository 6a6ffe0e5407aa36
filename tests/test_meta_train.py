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
from pymeta.tasks import QuadraticFamily
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
