"""Peak memory and time of one MAML meta-iteration as the inner steps grow: pymeta.MAML,
pymeta.MAML(checkpoint_steps=True) and torch.func vmap(grad), second and first order.

Each measurement runs in a fresh process. CPU: the peak is the process's resident high-water
mark over one meta-iteration (reset through /proc/self/clear_refs) minus the resident memory
before it, with glibc told to return every freed block over 64 KiB to the OS, so that the
high-water mark follows live memory; that setting makes every large allocation fault in
fresh pages, so the times come from a second process with the usual setting (freed memory
kept, pymeta.benchmark.keep_freed_cpu_memory), median of 5 iterations. GPU: one process;
torch.cuda.max_memory_allocated over an iteration minus the memory allocated before it.

    PYTHONPATH=. python bench/maml_memory.py                   # the issue's workload, CPU
    PYTHONPATH=. python bench/maml_memory.py --device cuda --steps 1 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchutil import json_child

IMPLS = ("pymeta", "pymeta+checkpoint", "torch_func")


def child(impl: str, steps: int, first_order: bool, device: str, config: str, what: str) -> dict:
    import torch

    from pymeta.benchmark import PeakMemory, keep_freed_cpu_memory
    from pymeta.workloads import CPU_CONV4, GPU_CONV4, build_maml, meta_iteration

    cfg = {**(GPU_CONV4 if config == "gpu" else CPU_CONV4), "inner_steps": steps}
    module, run, data = build_maml("pymeta" if impl.startswith("pymeta") else impl, cfg,
                                   first_order, device)
    if impl == "pymeta+checkpoint":
        module.checkpoint_steps = True
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    if what in ("memory", "both"):
        meta_iteration(module, run, data)  # warm-up: lazy initialization, first allocations
        for p in module.parameters():
            p.grad = None
        with PeakMemory(device) as mem:
            meta_iteration(module, run, data)
        out["peak_mib"] = mem.bytes / 2**20
    if what in ("time", "both"):
        if device == "cpu":
            keep_freed_cpu_memory()
        times = []
        for i in range(6):
            t0 = time.perf_counter()
            meta_iteration(module, run, data)
            sync()
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
        out["ms"] = statistics.median(times) * 1e3
    return out


def _run_child(args, impl, steps, order, what, env) -> dict:
    return json_child(__file__, ["--device", args.device, "--config", args.config, "--child",
                                 impl, str(steps), order, what], env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default="gpu", choices=["gpu", "cpu"],
                    help="gpu: Conv4-64 x 32 tasks (the issue's workload); cpu: Conv4-16 x 8 tasks")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--first-order-steps", type=int, nargs="*", default=[5])
    ap.add_argument("--child", nargs=4, metavar=("IMPL", "STEPS", "ORDER", "WHAT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        impl, steps, order, what = args.child
        print(json.dumps(child(impl, int(steps), order == "first", args.device, args.config, what)))
        return
    mem_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    runs = [("second", s, impl) for s in args.steps for impl in IMPLS]
    runs += [("first", s, impl) for s in args.first_order_steps for impl in ("pymeta", "torch_func")]
    print(f"MAML meta-iteration, {args.config} config, {args.device}: peak MiB over one "
          f"iteration, median ms of 5")
    print("| order | inner steps | impl | peak MiB | ms |")
    print("|---|---|---|---|---|")
    for order, steps, impl in runs:
        try:
            if args.device == "cuda":
                r = _run_child(args, impl, steps, order, "both", os.environ)
            else:
                r = {**_run_child(args, impl, steps, order, "memory", mem_env),
                     **_run_child(args, impl, steps, order, "time", os.environ)}
        except RuntimeError as e:
            print(f"| {order} | {steps} | {impl} | failed: {e} | |", flush=True)
            continue
        print(f"| {order} | {steps} | {impl} | {r['peak_mib']:.0f} | {r['ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
