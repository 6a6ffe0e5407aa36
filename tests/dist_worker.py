"""A worker for tests/test_distributed.py, run once per rank (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment). Modes:
    meta_train OUT      distributed pymeta.meta_train on quadratics; rank 0 saves the net
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist

import pymeta
from pymeta import distributed as pdist
from pymeta._io import atomic_save

MT = dict(iterations=2, unroll=2, horizon=4, meta_lr=1e-2, meta_batch=6, seed=3, progress=False,
          dtype=torch.float64)


def make_net():
    torch.manual_seed(0)
    return pymeta.LSTMOptimizerNet(hidden_size=8)


def count_all_reduce():
    """Counts the calls of dist.all_reduce (as pymeta.distributed makes them)."""
    calls = [0]
    real = dist.all_reduce

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)
    dist.all_reduce = counted
    return calls


def check_buckets(rank):
    """all_reduce_gradients with 100-byte buckets, mixed dtypes, a None grad and uneven
    counts (3 on rank 0, 1 on rank 1): the weighted mean, one all_reduce per bucket."""
    calls = count_all_reduce()
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in
              [(5, torch.float64), (20, torch.float64), (3, torch.float32), (4, torch.float64)]]
    for i, p in enumerate(params[:3]):
        p.grad = torch.full_like(p, float(rank + 1) * (i + 1))  # rank 0: i+1, rank 1: 2(i+1)
    count = 3 if rank == 0 else 1
    total, (loss,) = pdist.all_reduce_gradients(params, count, extras=[10.0 * (rank + 1)],
                                                bucket_bytes=100)
    return {"total": total, "loss": loss, "calls": calls[0],
            "grads": [p.grad.clone() for p in params]}


def main():
    torch.set_num_threads(1)
    mode = sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    try:
        if mode == "meta_train":
            calls = count_all_reduce()
            fam = pymeta.tasks.QuadraticFamily(dim=3)
            # run 1 stops after iteration 1 (checkpoint written by rank 0); run 2, a fresh
            # net, resumes from the checkpoint up to MT["iterations"]
            pymeta.meta_train(make_net(), fam, distributed=True, checkpoint=sys.argv[3],
                              **{**MT, "iterations": 1})
            calls_first = calls[0]
            net = make_net()
            hist = pymeta.meta_train(net, fam, distributed=True, checkpoint=sys.argv[3], **MT)
            calls_second = calls[0] - calls_first
            buckets = check_buckets(rank)
            if rank == 0:
                atomic_save({"net": {k: v.clone() for k, v in net.state_dict().items()},
                             "meta_loss": hist["meta_loss"], "final_loss": hist["final_loss"],
                             "all_reduce_calls_iteration_1": calls_first,
                             "all_reduce_calls_resumed": calls_second, "buckets": buckets},
                            sys.argv[2])
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        dist.destroy_process_group()
    # Done, and the results are saved: skip the interpreter's teardown. About 1 run in 20 the
    # process aborted there ("terminate called without an active exception", no Python frame
    # on the stack; seen with the code of the session before 2026-11-26's third as well: 2 of
    # 40 runs), a C++ thread still joinable at exit, not a failure of the work.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
