"""Host cost of inner_update's eager front: a sinusoid MAML meta-iteration (the README's
1-40-40-1 MLP, 25 tasks, 5-shot) with `pymeta.ops.inner_update` (the front: an
autograd.Function over the kernels) against the same iteration calling the registered op
`torch.ops.pymeta.inner_update` (torch's register_autograd wrapper), alternating blocks of
iterations in one process. Both run the same kernels; the difference is Python per call.
Prints the medians per configuration (ms per meta-iteration).

Run from the repository root (a script outside the tree imports the installed pymeta._C):
  PYTHONPATH=. python bench/maml_front_timing.py [--device cpu|cuda] [--rounds 20]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pymeta
from pymeta import ops
from pymeta.tasks import Sinusoid

CONFIGS = [  # (inner steps, first order, lr_mode)
    (1, False, "scalar"), (5, False, "scalar"), (5, True, "scalar"), (1, False, "per_param")]


def registered_op(params, grads, lr):
    """inner_update through torch.ops (the registered autograd formula)."""
    lr_tensors, lr_scalar = ops._split_lr(lr, len(grads))
    return torch.ops.pymeta.inner_update(list(params), list(grads), lr_tensors, lr_scalar)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--block", type=int, default=20, help="iterations per timed block")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    front = ops.inner_update
    print(f"torch {torch.__version__}, device {dev}, {args.threads} thread(s); ms per meta-iteration")
    for steps, first_order, lr_mode in CONFIGS:
        torch.manual_seed(0)
        maml = pymeta.MAML(pymeta.models.MLP(1, (40, 40), 1), inner_lr=0.01, inner_steps=steps,
                           first_order=first_order, lr_mode=lr_mode).to(dev)
        opt, tasks = torch.optim.Adam(maml.parameters(), lr=1e-3), Sinusoid(seed=0)

        def iteration():
            xs, ys, xq, yq = tasks.sample(25, 5, 5, device=dev)[:4]
            opt.zero_grad()
            maml.meta_loss(xs, ys, xq, yq, F.mse_loss).backward()
            opt.step()

        times = {"front": [], "registered": []}
        try:
            for _ in range(args.block):
                iteration()
            for r in range(args.rounds):
                order = [("front", front), ("registered", registered_op)]
                for name, fn in (order if r % 2 == 0 else order[::-1]):
                    ops.inner_update = fn  # MAML calls ops.inner_update
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(args.block):
                        iteration()
                    sync()
                    times[name].append((time.perf_counter() - t0) / args.block * 1e3)
        finally:
            ops.inner_update = front
        a, b = statistics.median(times["front"]), statistics.median(times["registered"])
        print(f"steps={steps} first_order={first_order!s:5} lr_mode={lr_mode:9}  "
              f"front {a:7.3f}  registered {b:7.3f}  saved {b - a:6.3f} ({100 * (b - a) / b:.0f}%)")


if __name__ == "__main__":
    main()
