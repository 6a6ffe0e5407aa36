"""GPU check of pymeta.MAML: meta-gradients native vs reference vs loop, and timings (run by hand)."""
import sys, time, statistics; sys.path.insert(0, "bench")
import torch, torch.nn.functional as F
import pymeta
from test_bench_maml import *
print(pymeta.info())
dev = "cuda"
# correctness on GPU: native vs reference vs loop meta-gradients (float64, small)
cfg = {**CPU_CONV4, "tasks": 3, "queries": 2}
for fo in (False, True):
    res = {}
    for name, ctx in [("native", "native"), ("reference", "reference")]:
        with pymeta.use_backend(ctx):
            m, run, data = build("pymeta", cfg, fo, dev)
            m.double(); data = [d.double() if d.is_floating_point() else d for d in data]
            meta_iteration(m, run, data)
            res[name] = [p.grad for p in m.module.parameters()]
    m, run, data = build("loop", cfg, fo, dev)
    m.double(); data = [d.double() if d.is_floating_point() else d for d in data]
    meta_iteration(m, run, data); res["loop"] = [p.grad for p in m.parameters()]
    for k in res:
        err = max((a - b).abs().max().item() for a, b in zip(res[k], res["loop"]))
        print("first_order" if fo else "second_order", k, "max abs err vs loop", err)
# timing: CPU bench config on GPU, plus a bigger T
for T in (8, 32):
    for order in ("second", "first"):
        c = {**CPU_CONV4, "tasks": T}
        built = {impl: build(impl, c, order == "first", dev) for impl in IMPLS}
        ts = {impl: [] for impl in IMPLS}
        for b in built.values():
            for _ in range(3): meta_iteration(*b)
        torch.cuda.synchronize()
        for _ in range(10):
            for impl, b in built.items():
                torch.cuda.synchronize(); t = time.perf_counter(); meta_iteration(*b); torch.cuda.synchronize()
                ts[impl].append(time.perf_counter() - t)
        print(T, order, {k: "%.1f ms" % (statistics.median(v) * 1e3) for k, v in ts.items()}, flush=True)
