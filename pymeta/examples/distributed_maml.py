"""Distributed MAML meta-training on sinusoid tasks: each rank adapts its share of the
meta-batch, the meta-gradients are all-reduced (task-weighted, bucketed), checkpoints are
written by rank 0 and read by every rank.

One node, 2 processes (gloo on CPUs, NCCL on GPUs)::

    torchrun --nproc_per_node=2 -m pymeta.examples.distributed_maml --steps 20 \\
        --checkpoint /tmp/maml_ckpt.pt

Elastic: with ``--max-restarts=1`` a failed rank makes torchrun restart both; they resume
from the last checkpoint (``--checkpoint-every`` steps) and finish with the same parameters
as an uninterrupted run::

    torchrun --nproc_per_node=2 --max-restarts=1 -m pymeta.examples.distributed_maml \\
        --checkpoint /tmp/maml_ckpt.pt

Several nodes (run on every node; NODE_RANK = 0..N-1, MASTER_ADDR = node 0's address; the
checkpoint must be on a file system that every node sees)::

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 --rdzv-id=maml1 \\
        --max-restarts=3 -m pymeta.examples.distributed_maml --checkpoint /shared/maml_ckpt.pt

Rank r's tasks at step s are drawn from ``rank_seed(seed, r, s)`` (no two ranks draw the
same tasks); ``full_batch`` builds the union, which a single process can train on to get the
same parameters (what tests/test_distributed.py checks).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import List

import torch
import torch.nn.functional as F

import pymeta
from pymeta import distributed as pdist
from pymeta._io import atomic_save
from pymeta.models import MLP
from pymeta.tasks import Sinusoid

CKPT_FORMAT = "pymeta.examples.distributed_maml"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--meta-batch", type=int, default=int(os.environ.get("PYMETA_EXAMPLE_META_BATCH", 8)))
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--hidden", type=int, default=40)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--lr-mode", default="per_param", choices=["scalar", "per_layer_step", "per_param"])
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--out", default=None, help="rank 0 writes the final parameters here")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--timeout", type=float, default=60.0, help="collective timeout (s)")
    return p.parse_args(argv)


def build(args):
    torch.manual_seed(args.seed)
    model = MLP(1, (args.hidden, args.hidden), 1).to(DTYPES[args.dtype])
    maml = pymeta.MAML(model, inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                       lr_mode=args.lr_mode)
    opt = torch.optim.Adam(maml.parameters(), lr=args.meta_lr)
    return maml, opt


def rank_batch(args, step: int, rank: int, world: int):
    """Rank ``rank``'s tasks at ``step``: its share of the meta-batch, seeded per rank."""
    lo, hi = pdist.shard_range(args.meta_batch, rank, world)
    g = torch.Generator().manual_seed(pdist.rank_seed(args.seed, rank, step))
    t = Sinusoid().sample(hi - lo, args.shots, args.queries, dtype=DTYPES[args.dtype], generator=g)
    return t.x_support, t.y_support, t.x_query, t.y_query


def full_batch(args, step: int, world: int) -> List[torch.Tensor]:
    """The whole meta-batch at ``step`` of a run on ``world`` ranks (every rank's tasks)."""
    parts = [rank_batch(args, step, r, world) for r in range(world)]
    return [torch.cat(ts) for ts in zip(*parts)]


def _maybe_die(step: int, rank: int) -> None:
    """Test hook: PYMETA_EXAMPLE_KILL_AT_STEP=k and PYMETA_EXAMPLE_KILL_MARKER=path make rank 1
    SIGKILL itself at the start of step k, once (the marker file remembers)."""
    at, marker = os.environ.get("PYMETA_EXAMPLE_KILL_AT_STEP"), os.environ.get("PYMETA_EXAMPLE_KILL_MARKER")
    if at is None or marker is None or rank != 1 or step != int(at) or os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"killed rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    rank, world = pdist.init(timeout_s=args.timeout)
    maml, opt = build(args)
    pdist.check_config(pdist.maml_config(maml, args.meta_batch, seed=args.seed,
                                         shots=args.shots, queries=args.queries,
                                         dtype=args.dtype, world=world))
    start, losses = 0, []
    if args.checkpoint:
        ck = pdist.load_checkpoint(args.checkpoint, "MAML checkpoint", CKPT_FORMAT)
        if ck is not None:
            maml.load_state_dict(ck["maml"])
            opt.load_state_dict(ck["adam"])
            start, losses = int(ck["step"]), list(ck["losses"])
            if rank == 0:
                print(f"[rank 0] resumed from {args.checkpoint} at step {start}", flush=True)
    t0 = time.perf_counter()
    for step in range(start, args.steps):
        _maybe_die(step, rank)
        loss = pdist.maml_meta_step(maml, opt, rank_batch(args, step, rank, world), F.mse_loss)
        losses.append(loss)
        if rank == 0:
            print(f"[rank 0] step {step} meta-loss {loss:.6f}", flush=True)
        if args.checkpoint and ((step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps):
            pdist.save_checkpoint({"format": CKPT_FORMAT, "step": step + 1,
                                   "maml": {k: v.detach().cpu().clone() for k, v in maml.state_dict().items()},
                                   "adam": opt.state_dict(), "losses": losses}, args.checkpoint)
    seconds = time.perf_counter() - t0
    result = {"format": CKPT_FORMAT + ".result", "world": world, "seconds": seconds,
              "steps_run": args.steps - start, "losses": losses,
              "maml": {k: v.detach().cpu().clone() for k, v in maml.state_dict().items()}}
    if args.out and rank == 0:
        atomic_save(result, args.out)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # Done, and the results are saved: skip the interpreter's teardown. About 1 run in 20 a
    # rank aborted there ("terminate called without an active exception": a C++ thread of the
    # process group still joinable at exit; tests/dist_worker.py does the same), which turned
    # a finished run's exit status into SIGABRT. On an error, main() raises before this line.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
