"""CPU timing of one MAML meta-iteration (adapt, query loss, backward to the meta-parameters):
pymeta.MAML against a hand-written torch.func vmap(grad), interleaved (one iteration of each
in turn), so that the machine's drift hits both alike. Prints the medians and the ratio.

Run from the repository root (a script outside the tree imports the installed pymeta._C):
  PYTHONPATH=. python bench/maml_cpu_timing.py [--config cpu|gpu] [--order second first]
      [--iters 11]
cpu: Conv4-16, 28x28x1, 5-way 1-shot, 15 queries, 8 tasks, 2 inner steps (the issue's CPU
example); gpu: Conv4-64, 32 tasks, 5 inner steps (the issue's GPU workload, seconds here).
"""
import argparse
import statistics
import time

import torch

from pymeta.benchmark import keep_freed_cpu_memory
from pymeta.workloads import CPU_CONV4, GPU_CONV4, build_maml, meta_iteration

IMPLS = ("pymeta", "torch_func")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--order", nargs="+", default=["second", "first"], choices=["second", "first"])
    ap.add_argument("--iters", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    keep_freed_cpu_memory()  # every iteration's large tensors reuse the heap's pages
    cfg = CPU_CONV4 if args.config == "cpu" else GPU_CONV4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, config {cfg}")
    for order in args.order:
        built = {impl: build_maml(impl, cfg, order == "first") for impl in IMPLS}
        times = {impl: [] for impl in IMPLS}
        for i in range(args.warmup + args.iters):
            for impl, (module, run, data) in built.items():
                t0 = time.perf_counter()
                meta_iteration(module, run, data)
                if i >= args.warmup:
                    times[impl].append(time.perf_counter() - t0)
        med = {impl: statistics.median(v) * 1e3 for impl, v in times.items()}
        print(f"{order} order: pymeta {med['pymeta']:.1f} ms, torch.func {med['torch_func']:.1f} ms, "
              f"torch.func / pymeta {med['torch_func'] / med['pymeta']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
