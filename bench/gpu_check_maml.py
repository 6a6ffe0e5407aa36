"""GPU check of pymeta.MAML (run by hand: python bench/gpu_check_maml.py [device]): meta-gradients
native vs reference vs the per-task loop in float64, then timings of the bench config at T=8 and 32."""
import os, sys, time, statistics
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]  # this checkout's pymeta (its workloads module)
import torch, torch.nn.functional as F
import pymeta
from pymeta.workloads import CPU_CONV4, GPU_CONV4, meta_iteration, build_maml as build
from variants import maml_variant
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
    # the capture above against variants (bench/variants.py): the defaults before
    # models._GroupedConv and GPU patches, each alone, channels-last, cuDNN autotuning
    for combo in (["plain_conv", "no_patches"], ["plain_conv"], ["no_patches"], ["channels_last"],
                  ["cudnn_benchmark"]):
        key = "pymeta+cuda_graph+" + "+".join(combo)
        try:
            with maml_variant(*combo):
                time_capture(key)
            # relative to the whole meta-gradient's norm (the conv biases' own gradients are
            # rounding noise: BatchNorm removes them)
            diff = sum(((a - p.grad) ** 2).sum() for a, p in zip(want, maml.parameters())) ** 0.5
            print(f"{key} vs eager grads, rel err:",
                  (diff / sum((a ** 2).sum() for a in want) ** 0.5).item())
        except Exception as e:
            print(f"capture ({key}) failed:", type(e).__name__, str(e)[:300])
    # eager with the previous defaults (F.conv2d's derivatives, the first layer a grouped conv)
    with maml_variant("plain_conv", "no_patches"):
        meta_iteration(*built["pymeta"]); sync()
        ts["pymeta+plain_conv+no_patches"] = []
        for _ in range(5):
            sync(); t = time.perf_counter(); meta_iteration(*built["pymeta"]); sync()
            ts["pymeta+plain_conv+no_patches"].append(time.perf_counter() - t)
    # How far float32 meta-gradients are from float64 ones on this workload (inner lr 0.4, 5
    # steps, BatchNorm: the variants above differ from each other by 20-35%, run 1-2 of
    # 2026-11-26): the default (TF32 convs), without TF32, and the previous defaults.
    try:
        import copy
        m64 = copy.deepcopy(maml).double()
        d64 = [d.double() if d.is_floating_point() else d for d in data]
        g64 = torch.autograd.grad(m64.meta_loss(*d64, F.cross_entropy), list(m64.parameters()))
        del m64

        def rel64(variant=(), tf32=True):
            torch.backends.cudnn.allow_tf32 = tf32
            with maml_variant(*variant):
                g = torch.autograd.grad(maml.meta_loss(*data, F.cross_entropy), list(maml.parameters()))
            torch.backends.cudnn.allow_tf32 = True
            num = sum(((a.double() - b) ** 2).sum() for a, b in zip(g, g64)) ** 0.5
            return "%.2e" % (num / sum((b ** 2).sum() for b in g64) ** 0.5).item()

        print(order, "order, float32 meta-gradient vs float64, rel err:",
              {"default (TF32 convs)": rel64(), "no TF32": rel64(tf32=False),
               "plain_conv+no_patches (TF32)": rel64(("plain_conv", "no_patches")),
               "plain_conv+no_patches, no TF32": rel64(("plain_conv", "no_patches"), False)})
    except Exception as e:
        print("float64 comparison failed:", type(e).__name__, str(e)[:300])
    print("maml conv4-64 T=32 steps=5", order, "order:",
          {k: "%.1f ms" % (statistics.median(v) * 1e3) for k, v in ts.items()}, flush=True)
