"""GPU check of pymeta.MAML (run by hand: python bench/gpu_check_maml.py [device]): meta-gradients
native vs reference vs the per-task loop in float64, then timings of the bench config at T=8 and 32."""
import os, sys, time, statistics
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]  # this checkout's pymeta (its workloads module)
import torch, torch.nn.functional as F
import pymeta
from pymeta.workloads import CPU_CONV4, GPU_CONV4, meta_iteration, build_maml as build
IMPLS = ["pymeta", "torch_func"] + ([] if "noloop" in sys.argv[2:] else ["loop"])
print(pymeta.info())
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
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
# timing: the GPU workload: Conv4 with 64 filters, 28x28x1, 5-way 1-shot, 15 queries
# per class, 32 tasks, 5 inner steps, inner lr 0.4 (float32)
for order in ("second", "first"):
    built = {impl: build(impl, GPU_CONV4, order == "first", dev) for impl in IMPLS}
    ts = {impl: [] for impl in IMPLS}
    for b in built.values():
        for _ in range(2): meta_iteration(*b)
    sync()
    for _ in range(5):
        for impl, b in built.items():
            sync(); t = time.perf_counter(); meta_iteration(*b); sync()
            ts[impl].append(time.perf_counter() - t)
    # peak memory of one meta-iteration (pymeta vs torch.func vmap)
    if dev.startswith("cuda"):
        peak = {}
        for impl in ("pymeta", "torch_func"):
            sync(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
            meta_iteration(*built[impl]); sync()
            peak[impl] = "%.0f MiB" % ((torch.cuda.max_memory_allocated() - base) / 2**20)
        print("peak memory", order, "order:", peak)
    # pymeta eager through the generic vmap path (PYMETA_MAML_VMAP=1) instead of
    # Conv4.forward_tasks, and both paths captured in a CUDA graph (MAML.capture)
    os.environ["PYMETA_MAML_VMAP"] = "1"
    meta_iteration(*built["pymeta"]); sync()
    ts["pymeta_vmap_path"] = []
    for _ in range(5):
        sync(); t = time.perf_counter(); meta_iteration(*built["pymeta"]); sync()
        ts["pymeta_vmap_path"].append(time.perf_counter() - t)
    maml, _, data = built["pymeta"]

    def time_capture(key):
        step = maml.capture(F.cross_entropy, *data)
        for _ in range(2): step(*data)
        sync()
        ts[key] = []
        for _ in range(5):
            sync(); t = time.perf_counter(); step(*data); sync()
            ts[key].append(time.perf_counter() - t)

    try:
        time_capture("pymeta_vmap_path+cuda_graph")
    except Exception as e:
        print("capture (vmap path) failed:", type(e).__name__, str(e)[:300])
    del os.environ["PYMETA_MAML_VMAP"]
    try:
        time_capture("pymeta+cuda_graph")
        want = [p.grad.clone() for p in maml.parameters()]
        for p in maml.parameters(): p.grad = None
        maml.meta_loss(*data, F.cross_entropy).backward()
        print("graph vs eager grads, max rel err:", max(((a - p.grad).norm() / p.grad.norm()).item()
                                                       for a, p in zip(want, maml.parameters())))
    except Exception as e:  # report, don't hide the rest of the check
        print("capture failed:", type(e).__name__, str(e)[:300])
    # a lever not yet measured: cuDNN autotuning (the capture's warm-up runs pick the
    # fastest algorithm for each grouped conv shape)
    torch.backends.cudnn.benchmark = True
    try:
        time_capture("pymeta+cuda_graph+cudnn_benchmark")
    except Exception as e:
        print("capture (cudnn.benchmark) failed:", type(e).__name__, str(e)[:300])
    torch.backends.cudnn.benchmark = False
    # another lever not yet measured: channels-last activations (cuDNN's tensor-core convs
    # work in NHWC; conv, BatchNorm, max-pool and ReLU keep the format once the first conv's
    # input has it), through a stand-in for models.F whose conv2d converts its input
    import types
    import pymeta.models as models_mod
    plain_F = models_mod.F
    shim = types.SimpleNamespace(**{k: getattr(plain_F, k) for k in dir(plain_F) if not k.startswith("__")})
    shim.conv2d = lambda x, *a, **k: plain_F.conv2d(x.contiguous(memory_format=torch.channels_last), *a, **k)
    models_mod.F = shim
    try:
        time_capture("pymeta+cuda_graph+channels_last")
    except Exception as e:
        print("capture (channels_last) failed:", type(e).__name__, str(e)[:300])
    models_mod.F = plain_F
    print("maml conv4-64 T=32 steps=5", order, "order:",
          {k: "%.1f ms" % (statistics.median(v) * 1e3) for k, v in ts.items()}, flush=True)
