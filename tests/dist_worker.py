"""A worker for tests/test_distributed.py, run once per rank (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment). Modes:
    meta_train OUT      distributed pymeta.meta_train on quadratics; rank 0 saves the net
    mismatch            rank 1 uses another meta-batch size; check_config must raise
"""
import datetime
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


def main():
    torch.set_num_threads(1)
    mode = sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    try:
        if mode == "meta_train":
            net = make_net()
            hist = pymeta.meta_train(net, pymeta.tasks.QuadraticFamily(dim=3), distributed=True,
                                     checkpoint=sys.argv[3] if len(sys.argv) > 3 else None, **MT)
            if rank == 0:
                atomic_save({"net": {k: v.clone() for k, v in net.state_dict().items()},
                             "meta_loss": hist["meta_loss"], "final_loss": hist["final_loss"]},
                            sys.argv[2])
        elif mode == "mismatch":
            pdist.check_config({"meta_batch": 8 if rank == 0 else 6, "params": [[4, 4]]})
            print("NO ERROR", flush=True)
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
