"""pymeta.distributed: K gloo ranks on 127.0.0.1 give the single-process meta-step; elastic
restart resumes from the checkpoint; a config mismatch fails fast on every rank.

Every subprocess runs with a timeout and every process group with a collective timeout, so
a broken run fails instead of hanging."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pymeta
from pymeta import distributed as pdist
from pymeta._io import safe_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
TIMEOUT = 90  # s, per launched job

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**more):
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", **more)
    return e


def launch(args, world=2, timeout=TIMEOUT, rank_args=None, **extra_env):
    """Runs ``python args`` (+ ``rank_args[r]``) as ranks 0..world-1 (plain env://
    rendezvous); returns the (returncode, output) of each rank. Kills every rank on timeout."""
    port = str(free_port())
    rank_args = rank_args or {}
    procs = [subprocess.Popen([sys.executable] + list(args) + list(rank_args.get(r, [])), cwd=ROOT,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      MASTER_PORT=port, **extra_env),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    out = []
    try:
        for p in procs:
            o, _ = p.communicate(timeout=timeout)
            out.append((p.returncode, o))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def example_args(tmp_path, *more):
    return ["-m", "pymeta.examples.distributed_maml", "--steps", "3", "--meta-batch", "6",
            "--timeout", "30",
            "--hidden", "8", "--dtype", "float64", "--lr-mode", "per_param",
            "--inner-lr", "0.05", "--meta-lr", "0.01", *more]


def single_process_maml(tmp_path, *more, steps=3, world=2):
    """The reference: one process, the whole meta-batch (every rank's tasks) per step."""
    from pymeta.examples import distributed_maml as ex
    args = ex.parse_args(example_args(tmp_path, *more)[2:])
    maml, opt = ex.build(args)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        maml.meta_loss(*ex.full_batch(args, step, world), F.mse_loss).backward()
        opt.step()
    return maml.state_dict()


def assert_same(a: dict, b: dict, tol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=lambda m: f"{k}: {m}")


def check_ok(out):
    for r, (rc, o) in enumerate(out):
        assert rc == 0, f"rank {r} failed (rc {rc}):\n{o[-3000:]}"


# ---- pure helpers (no process group) -------------------------------------------------------

def test_shard_range_covers_everything():
    for n in range(0, 12):
        for w in range(1, 5):
            ranges = [pdist.shard_range(n, r, w) for r in range(w)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
    x = torch.arange(10)
    assert torch.equal(torch.cat([pdist.shard([x], r, 3)[0] for r in range(3)]), x)
    with pytest.raises(ValueError, match="different task counts"):
        pdist.shard([x, x[:5]], 0, 2)


def test_rank_seed_distinct():
    seeds = {pdist.rank_seed(0, r, s) for r in range(4) for s in range(50)}
    assert len(seeds) == 200


def test_single_process_helpers_are_no_ops():
    assert pdist.rank_world() == (0, 1)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    total, (x,) = pdist.all_reduce_gradients([p], 5, extras=[1.5])
    assert total == 5 and x == 1.5 and torch.equal(p.grad, torch.full((3,), 2.0))


def test_meta_train_single_process_unchanged():
    """distributed=False is the old code path: same result as not passing it."""
    fam = pymeta.tasks.QuadraticFamily(dim=3)
    kw = dict(iterations=2, unroll=2, horizon=4, meta_batch=4, progress=False, dtype=torch.float64)
    torch.manual_seed(0); a = pymeta.LSTMOptimizerNet(hidden_size=8)
    torch.manual_seed(0); b = pymeta.LSTMOptimizerNet(hidden_size=8)
    ha = pymeta.meta_train(a, fam, **kw)
    hb = pymeta.meta_train(b, fam, distributed=False, **kw)
    assert ha["meta_loss"] == hb["meta_loss"]
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_problem_subset_matches_full_batch():
    fam = pymeta.tasks.QuadraticFamily(dim=3)
    full = fam.sample(5, 7, dtype=torch.float64)
    sub = full.subset(2, 4)
    theta = full.init_theta()
    torch.testing.assert_close(sub.losses(sub.init_theta()), full.losses(theta)[2:4], rtol=0, atol=0)
    # digits MLPs: the subset's initial weights and per-step minibatches are the full batch's
    fam = pymeta.tasks.DigitsMLPFamily(hidden=4)
    full = fam.sample(3, 5, dtype=torch.float64)
    sub = full.subset(1, 3).subset(1, 2)  # problem 2
    n = full.n_params
    assert torch.equal(sub.init_theta(), full.init_theta()[2 * n:3 * n])
    for step in (0, 7):
        assert torch.equal(sub.minibatch(step), full.minibatch(step)[2:3])
        torch.testing.assert_close(sub.losses(sub.init_theta(), step),
                                   full.losses(full.init_theta(), step)[2:3], rtol=1e-12, atol=0)


# ---- 2 gloo ranks --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [("--lr-mode", "per_param", "--meta-batch", "6"),
                                  ("--lr-mode", "per_layer_step", "--inner-steps", "2",
                                   "--meta-batch", "5")], ids=["per_param", "per_layer_step_uneven"])
def test_maml_two_ranks_equal_single_process(tmp_path, mode):
    out_file = tmp_path / "final.pt"
    out = launch(example_args(tmp_path, "--out", str(out_file), *mode))
    check_ok(out)
    dist_state = safe_load(out_file, "result")["maml"]
    assert_same(dist_state, single_process_maml(tmp_path, *mode))
    rates = "param_lrs" if "per_param" in mode else "step_lrs"
    assert any(k.startswith(rates) for k in dist_state)  # the learnable rates too


def test_meta_train_two_ranks_equal_single_process(tmp_path):
    """2 ranks, resumed once from their checkpoint after iteration 1, equal one process."""
    out_file = tmp_path / "net.pt"
    out = launch([WORKER, "meta_train", str(out_file), str(tmp_path / "mt_ckpt.pt")])
    check_ok(out)
    res = safe_load(out_file, "result")
    # one bucketed all-reduce per unroll (iteration 1: horizon 4 / unroll 2), plus the
    # config check's all_gather (not an all_reduce)
    assert res["all_reduce_calls_iteration_1"] == 2
    assert res["all_reduce_calls_resumed"] == 2  # run 2 resumed: it ran iteration 2 only
    b = res["buckets"]
    assert b["total"] == 4 and abs(b["loss"] - (3 * 10 + 1 * 20) / 4) < 1e-12
    # float64 [5, 20, 4] in 100-byte buckets: [5], [20], [4]; float32 [3]: 4 all_reduces
    assert b["calls"] == 4
    for i, g in enumerate(b["grads"]):
        want = (3 * (i + 1) + 1 * 2 * (i + 1)) / 4 if i < 3 else 0.0
        torch.testing.assert_close(g, torch.full_like(g, want), rtol=1e-7, atol=0)
    sys.path.insert(0, os.path.dirname(WORKER))
    import dist_worker
    net = dist_worker.make_net()
    hist = pymeta.meta_train(net, pymeta.tasks.QuadraticFamily(dim=3), **dist_worker.MT)
    assert_same(res["net"], net.state_dict())
    torch.testing.assert_close(torch.tensor(res["meta_loss"]), torch.tensor(hist["meta_loss"]),
                               rtol=1e-10, atol=1e-12)


def test_config_mismatch_fails_fast_on_all_ranks(tmp_path):
    """Rank 1 of the example is given --meta-batch 4 (rank 0: 6): both ranks raise at the
    start, naming the key, instead of hanging in an all_reduce of mismatched sizes."""
    out = launch(example_args(tmp_path), rank_args={1: ["--meta-batch", "4"]}, timeout=60)
    for r, (rc, o) in enumerate(out):
        assert rc != 0, f"rank {r} did not fail:\n{o}"
        assert "ConfigMismatchError" in o and "rank 1 differs from rank 0 in ['meta_batch']" in o, o
        assert "meta_batch=4 (rank 0: 6)" in o, o
        assert "step 0" not in o  # failed before any meta-step


def test_elastic_restart_resumes_from_checkpoint(tmp_path):
    """torchrun --max-restarts=1: rank 1 SIGKILLs itself at step 2 (once); torchrun restarts
    both ranks, they resume from the step-2 checkpoint and end where an uninterrupted run
    (= the single process on the whole meta-batch) ends."""
    out_file, ckpt, marker = tmp_path / "final.pt", tmp_path / "ckpt.pt", tmp_path / "killed"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
           "--monitor-interval=0.2",
           *example_args(tmp_path, "--out", str(out_file), "--checkpoint", str(ckpt))]
    r = subprocess.run(cmd, cwd=ROOT, env=env(PYMETA_EXAMPLE_KILL_AT_STEP="2",
                                             PYMETA_EXAMPLE_KILL_MARKER=str(marker)),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-4000:]
    assert marker.exists(), "rank 1 was never killed"
    assert "resumed from" in r.stdout and "at step 2" in r.stdout, r.stdout[-4000:]
    res = safe_load(out_file, "result")
    assert res["steps_run"] == 1  # the restarted ranks ran only step 2
    assert_same(res["maml"], single_process_maml(tmp_path))


def test_maml_meta_step_single_process_is_a_plain_step():
    """Without a process group, maml_meta_step (sharded or not) is zero_grad, backward, step."""
    from pymeta.examples import distributed_maml as ex
    args = ex.parse_args(["--hidden", "8", "--dtype", "float64", "--meta-batch", "4"])
    batch = ex.full_batch(args, 0, 1)
    states = []
    for how in ("plain", "sharded", "full"):
        maml, opt = ex.build(args)
        if how == "plain":
            opt.zero_grad()
            F_loss = maml.meta_loss(*batch, F.mse_loss)
            F_loss.backward()
            opt.step()
        else:
            loss = pdist.maml_meta_step(maml, opt, batch, F.mse_loss, sharded=how == "sharded")
            assert abs(loss - float(F_loss.detach())) < 1e-12
        states.append(maml.state_dict())
    assert_same(states[0], states[1], tol=0)
    assert_same(states[0], states[2], tol=0)


# ---- bad inputs: a clear error naming the argument, nothing changed ---------------------------

@pytest.mark.parametrize("args,exc,name", [
    ((2.5, 0, 2), TypeError, "n"), ((10, 0.5, 2), TypeError, "rank"),
    ((float("nan"), 0, 1), TypeError, "n"), ((10, True, 2), TypeError, "rank"),
    ((10, 0, 2.0), TypeError, "world"), ((10, 0, 0), ValueError, "world"),
    ((-1, 0, 1), ValueError, "n"), ((10, -1, 2), ValueError, "rank"),
    ((10, 2, 2), ValueError, r"rank 2 is not in \[0, world\)"),
])
def test_shard_range_bad_arguments_are_named(args, exc, name):
    with pytest.raises(exc, match=rf"shard_range: {name}"):
        pdist.shard_range(*args)


def test_shard_range_takes_numpy_ints():
    import numpy as np
    assert pdist.shard_range(np.int64(10), np.int32(1), np.int64(2)) == (5, 10)


def test_shard_bad_arguments_are_named():
    x = torch.arange(10)
    with pytest.raises(ValueError, match="shard: tensors is empty"):
        pdist.shard([], 0, 2)
    with pytest.raises(ValueError, match=r"shard: tensors\[1\] is a 0-d tensor"):
        pdist.shard([x, torch.tensor(3.0)], 0, 2)
    with pytest.raises(TypeError, match=r"shard: tensors\[0\] must be a Tensor"):
        pdist.shard([[1, 2]], 0, 2)
    with pytest.raises(TypeError, match="shard: tensors must be a sequence"):
        pdist.shard(x, 0, 2)
    with pytest.raises(TypeError, match="shard: rank"):
        pdist.shard([x], 0.5, 2)
    with pytest.raises(ValueError, match="shard: world"):
        pdist.shard([x], 0, 0)


@pytest.mark.parametrize("args,exc,name", [
    ((1.5, 0, 0), TypeError, "seed"), ((True, 0, 0), TypeError, "seed"),
    (("3", 0, 0), TypeError, "seed"), ((-1, 0, 0), ValueError, "seed"),
    ((0, 1.0, 0), TypeError, "rank"), ((0, -2, 0), ValueError, "rank"),
    ((0, 0, False), TypeError, "step"), ((0, 0, -1), ValueError, "step"),
])
def test_rank_seed_bad_arguments_are_named(args, exc, name):
    with pytest.raises(exc, match=f"rank_seed: {name}"):
        pdist.rank_seed(*args)


def test_rank_seed_takes_numpy_ints():
    import numpy as np
    assert pdist.rank_seed(np.int64(3), np.int32(1), 2) == pdist.rank_seed(3, 1, 2)


@pytest.mark.parametrize("meta_batch,exc", [(2.5, TypeError), (True, TypeError), (-3, ValueError),
                                            (0, ValueError), ("4", TypeError)])
def test_maml_config_bad_meta_batch_is_named(meta_batch, exc):
    maml = pymeta.MAML(pymeta.models.MLP(1, (4,), 1))
    with pytest.raises(exc, match="maml_config: meta_batch"):
        pdist.maml_config(maml, meta_batch)
    assert pdist.maml_config(maml, 4)["meta_batch"] == 4


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(count=float("nan")), ValueError, "count"), (dict(count=-1), ValueError, "count"),
    (dict(count=True), TypeError, "count"), (dict(count="5"), TypeError, "count"),
    (dict(count=5, extras=["1.5"]), TypeError, r"extras\[0\]"),
    (dict(count=5, bucket_bytes=0), ValueError, "bucket_bytes"),
])
def test_all_reduce_gradients_bad_arguments_are_named(kwargs, exc, name):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    with pytest.raises(exc, match=f"all_reduce_gradients: {name}"):
        pdist.all_reduce_gradients([p], **kwargs)
    assert torch.equal(p.grad, torch.full((3,), 2.0))


class _Thing:
    pass


@pytest.mark.parametrize("bad,exc,name", [
    ({"lr": __import__("numpy").float64(0.5)}, TypeError, r"obj\['lr'\] is a numpy.float64"),
    ({"w": __import__("numpy").ones(2)}, TypeError, r"obj\['w'\] is a numpy.ndarray"),
    ({"a": [1, {"b": _Thing()}]}, TypeError, r"obj\['a'\]\[1\]\['b'\] is a .*_Thing"),
    ({"s": {1, 2}}, TypeError, r"obj\['s'\] is a builtins.set"),
    ({_Thing(): 1}, TypeError, r"a key of obj is a .*_Thing"),
    ({"sha256": "x"}, ValueError, "'sha256'"),
])
def test_save_checkpoint_refuses_what_load_cannot_read(tmp_path, bad, exc, name):
    """The good checkpoint stays byte-identical; no temporary file is left behind."""
    path = tmp_path / "ckpt.pt"
    pdist.save_checkpoint({"format": "t", "step": 1, "w": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(exc, match=name):
        pdist.save_checkpoint({"format": "t", "step": 2, **bad}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]
    assert pdist.load_checkpoint(path, kind="t")["step"] == 1


def test_save_checkpoint_refuses_a_non_dict_and_a_cycle(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(TypeError, match="obj must be a dict"):
        pdist.save_checkpoint([1, 2], path)
    loop = []
    loop.append(loop)
    with pytest.raises(ValueError, match=r"obj\['l'\]\[0\] contains itself"):
        pdist.save_checkpoint({"l": loop}, path)
    assert not path.exists()


def test_save_checkpoint_round_trips_what_it_takes(tmp_path):
    """What the checks allow, load_checkpoint reads back: optimizer and module state,
    nested containers, every plain scalar type, dtypes and devices."""
    import collections
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    obj = {"format": "t", "net": net.state_dict(), "adam": opt.state_dict(),
           "scalars": [None, True, 3, 2 ** 70, 0.5, float("nan"), 1 + 2j, "s", b"b"],
           "nested": {"t": (1, [2.0]), 3: collections.OrderedDict(a=torch.zeros(1)),
                      "size": torch.Size([2, 3])},
           "dtype": torch.float64, "device": torch.device("cpu"),
           "param": torch.nn.Parameter(torch.ones(2))}
    path = tmp_path / "ckpt.pt"
    pdist.save_checkpoint(obj, path)
    back = pdist.load_checkpoint(path, kind="t")
    assert back["dtype"] == torch.float64 and back["nested"]["size"] == torch.Size([2, 3])
    assert back["scalars"][:5] == obj["scalars"][:5] and back["scalars"][6:] == obj["scalars"][6:]
    assert torch.equal(back["net"]["weight"], net.weight.detach())


@pytest.mark.parametrize("timeout_s,exc", [(0, ValueError), (float("nan"), ValueError),
                                           ("60", TypeError)])
def test_init_bad_timeout_is_named(timeout_s, exc):
    with pytest.raises(exc, match="init: timeout_s"):
        pdist.init(timeout_s=timeout_s)


def test_review_fixes_checkpoint_types_and_tensor_extras(tmp_path):
    """bytearray and torch.layout load back with weights_only, so save_checkpoint takes them;
    a set does not survive the checksum (its printed order may differ), so it is refused;
    all_reduce_gradients takes a one-element tensor as an extra and as count, as before."""
    path = tmp_path / "ck.pt"
    pdist.save_checkpoint({"b": bytearray(b"xy"), "layout": torch.strided}, path)
    back = pdist.load_checkpoint(path)
    assert back["b"] == bytearray(b"xy") and back["layout"] is torch.strided
    with pytest.raises(TypeError, match=r"obj\['s'\] is a builtins.set"):
        pdist.save_checkpoint({"s": {1, 2}}, path)
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 2.0)
    count, (loss,) = pdist.all_reduce_gradients([w], torch.tensor(3), extras=[torch.tensor(0.5)])
    assert loss == pytest.approx(0.5)
