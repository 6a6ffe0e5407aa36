"""Memory and time of the LSTM optimizer with a float32 and a bfloat16 recurrent state.

optimizer (default): pymeta.LSTMOptimizer on an MLP of --params float32 coordinates (Linear
layers of width --width), random gradients, in each state layout of --layouts (feature_major,
blocked). Each configuration runs in a fresh process:
  state MiB   the optimizer's state after the steps (sum of the lstm_state tensors)
  resident    memory held between steps over the parameters and gradients (the state, and
              the joint buffer it lives in)
  step peak   the high-water mark during one step minus the memory before it (the step's
              transient: outputs, conversion chunks)
  ms          median time of a step (5 steps after 2 warm-ups)
--unroll: meta-training, a 20-step unroll of the native op on a separable quadratic of
--params coordinates (optimizee gradients detached), forward + backward to the net's weights:
  peak        the high-water mark over one unroll minus the memory before it (every step's
              input state is kept for the backward)
  ms          median time of an unroll (3 after 1 warm-up)
CPU: resident memory from /proc/self/status (VmRSS, VmHWM reset through clear_refs) with glibc
returning freed blocks over 64 KiB, so that the high-water mark follows live memory; the time
comes from a second process with freed memory kept. GPU: torch.cuda memory_allocated and
max_memory_allocated, one process.

    PYTHONPATH=. python bench/lstm_state_memory.py [--device cpu] [--params 4000000] [--unroll]
        [--bucket COORDS]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchutil import json_child


def _median_ms(fn, sync, runs: int, warmup: int) -> float:
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def child(state_dtype: str, device: str, n: int, width: int, what: str, unroll: bool,
          bucket: int, layout: str = "feature_major") -> dict:
    import torch
    from torch import nn

    import pymeta
    from pymeta.benchmark import PeakMemory, keep_freed_cpu_memory

    torch.manual_seed(0)
    sdtype = torch.bfloat16 if state_dtype == "bf16" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    net = pymeta.LSTMOptimizerNet(20).to(device)
    out = {}
    if unroll:
        a = torch.rand(n, device=device) + 0.5
        b = torch.randn(n, device=device)
        theta0 = torch.randn(n, device=device)
        weights = list(net.parameters())

        def work():  # 20 steps, the meta-loss's gradient w.r.t. the net's weights
            theta, state, loss = theta0, net.init_state(n, dtype=sdtype), 0.0
            for _ in range(20):
                u, state = net((a * (theta - b)).detach(), state)
                theta = theta + u
                loss = loss + 0.5 * (a * (theta - b) ** 2).sum()
            return torch.autograd.grad(loss, weights)
        runs, warmup = 3, 1
    else:
        layers = max(1, n // (width * width))
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = pymeta.LSTMOptimizer(params, net=net, state_dtype=sdtype, bucket_coords=bucket,
                                   state_layout=layout)
        out["coords"] = sum(p.numel() for p in params)
        work, runs, warmup = opt.step, 5, 2
    if what == "time":
        if device == "cpu":
            keep_freed_cpu_memory()
        out["ms"] = _median_ms(work, sync, runs, warmup)
        return out
    with PeakMemory(device) as held:  # the model, its gradients, the net before: base
        work()
        work()  # the joint state of the first step is replaced: steady state from here
    with PeakMemory(device) as step:
        work()
    if not unroll:
        out["state_mib"] = sum(opt.state[p]["lstm_state"].nbytes for p in params) / 2**20
        out["resident_mib"] = (step.before - held.before) / 2**20
    out["peak_mib"] = step.bytes / 2**20
    return out


def _run(args, state_dtype, what, env, layout="feature_major") -> dict:
    return json_child(__file__, ["--device", args.device, "--params", str(args.params),
                                 "--width", str(args.width), "--bucket", str(args.bucket),
                                 "--layouts", layout]
                      + (["--unroll"] if args.unroll else []) + ["--child", state_dtype, what],
                      env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--params", type=int, default=4_000_000)
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--unroll", action="store_true", help="the 20-step meta-training unroll")
    ap.add_argument("--bucket", type=int, default=1 << 24,
                    help="LSTMOptimizer(bucket_coords=...): coordinates per fused call")
    ap.add_argument("--layouts", nargs="+", default=["feature_major", "blocked"],
                    choices=["feature_major", "blocked"],
                    help="LSTMOptimizer(state_layout=...) rows (the optimizer only)")
    ap.add_argument("--child", nargs=2, metavar=("STATE_DTYPE", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.device, args.params, args.width,
                               args.child[1], args.unroll, args.bucket, args.layouts[0])))
        return
    mem_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    if args.unroll:
        print(f"20-step unroll of the native op (H = 20), forward + backward to the net's "
              f"weights, {args.device}, {args.params} coordinates; MiB")
        print("| state | peak over the unroll | ms per unroll |\n|---|---|---|")
    else:
        print(f"pymeta.LSTMOptimizer (H = 20, bucket_coords={args.bucket}), {args.device}, an MLP "
              f"of ~{args.params} float32 coordinates; MiB")
        print("| state | layout | coordinates | state MiB | resident | step peak | ms per step |\n"
              "|---|---|---|---|---|---|---|")
    for sd in ("float32", "bf16"):
        for layout in (["feature_major"] if args.unroll else args.layouts):
            env = mem_env if args.device == "cpu" else os.environ
            r = {**_run(args, sd, "memory", env, layout), **_run(args, sd, "time", os.environ, layout)}
            cells = ([r["peak_mib"]] if args.unroll else
                     [layout, r["coords"], r["state_mib"], r["resident_mib"], r["peak_mib"]]) + \
                [r["ms"]]
            print(f"| {sd} | " + " | ".join(f"{c:.0f}" if isinstance(c, float) else str(c)
                                            for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
