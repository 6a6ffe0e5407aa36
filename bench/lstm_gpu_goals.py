"""The goals table of the fused LSTM optimizer step (issue 3) on a CUDA GPU, in one run:

  forward (no_grad, float32, log_sign, H = 20) at N = 10k, 1M, 10M:
    native (tensor-core path: at H 17..20 from 34k coordinates on an H100, the staged forward
    in its sync form, a barrier per step of each group of 4 warps), native CUDA-core path (PYMETA_LSTM_MMA=0), the free-running staged
    tensor-core forward ("staged", PYMETA_LSTM_MMA_STAGED=1 PYMETA_LSTM_SYNC=0: cp.async of each
    warp's next step), the direct one ("direct", PYMETA_LSTM_MMA_STAGED=0; the default before
    the fourteenth session), each with whether it gives native's bits, native on the blocked
    state layout ("blocked": [ceil(N / 16), 4, H, 16], the direct kernel reading it; "blk
    graph": from a CUDA graph; whether it gives native's bits), native on a bfloat16 state
    ("bf16": the direct tensor-core kernel reading and writing bfloat16,
    PYMETA_LSTM_MMA_STAGED=0; "bf16 stg": the staged one, the default; "bf16 blk": blocked;
    "bf16 chk": the float32 kernel on chunks converted around it, PYMETA_LSTM_BF16_NATIVE=0), the eager nn.LSTMCell
    reference (state kept in LSTMCell's own [N, H] layout, no transposes), torch.compile of it,
    torch.optim.Adam(fused=DEV == "cuda") for scale; and the native step replayed from a CUDA graph
    (device time without Python's per-call cost). Roofline: bytes moved (32 H + 8 per
    coordinate) over the copy bandwidth measured in the same run.
  a 20-step unroll, forward + backward to the optimizer's weights, at N = 200k: native vs the
    eager LSTMCell reference, time and peak memory (what meta-training pays per truncation),
    and the native unroll replayed from a CUDA graph (its device time); the x eager ratio also
    as the median of 5 alternating native / eager pairs (the eager time is noisy).

Times are CUDA-event medians of `repeats` runs of `reps` back-to-back calls after warm-up.
Usage: python bench/lstm_gpu_goals.py [--H 20] [--no-compile]
"""
import argparse
import math
import os

import torch
from benchutil import env_switches, ms_per_call

import pymeta
from pymeta.benchmark import cuda_graph

P, OUT_SCALE = 10.0, 0.1
DEV = "cuda"  # --dry-run: "cpu" with tiny sizes, to check this script without a GPU
SIZES = (10_000, 1_000_000, 10_000_000)


def timed(fn, reps=20, repeats=5, warmup=3):
    return ms_per_call(fn, reps, repeats, warmup, DEV)


def preprocess(grad):
    big = grad.abs() >= math.exp(-P)
    safe = torch.where(big, grad.abs(), torch.ones_like(grad))
    return torch.stack([torch.where(big, safe.log() / P, torch.full_like(grad, -1.0)),
                        torch.where(big, grad.sign(), grad * math.exp(P))], dim=1)


def cell_step(net, grad, st):
    """The eager reference: nn.LSTMCell x 2 + nn.Linear, state as LSTMCell keeps it ([N, H])."""
    h1, c1 = net.cell1(preprocess(grad), (st[0], st[1]))
    h2, c2 = net.cell2(h1, (st[2], st[3]))
    return net.out(h2).squeeze(1) * OUT_SCALE, (h1, c1, h2, c2)


def native_step(net, grad, state):
    return torch.ops.pymeta.lstm_optimizer_step(grad, state, *net.weights(), "log_sign", P,
                                                OUT_SCALE)


def graph_time(fn, reps=20):
    """fn replayed from a CUDA graph (pymeta.benchmark.cuda_graph), ms per replay."""
    replay = cuda_graph(fn) if DEV == "cuda" else None
    return timed(replay, reps) if replay is not None else float("nan")


def variant(env, fn, reps):
    """fn timed with the PYMETA_LSTM_* switches `env` set, and whether its outputs then have
    the bits they have without them."""
    want = fn()
    with env_switches(env):
        ms, out = timed(fn, reps), fn()
    return ms, all(torch.equal(a, b) for a, b in zip(out, want))


def copy_bandwidth():
    x = torch.empty(1 << (28 if DEV == "cuda" else 20), device=DEV)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), reps=10)
    return 2 * x.numel() * 4 / (ms * 1e-3)  # bytes/s


def forward_table(H, compile_ref):
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    head = (f"{'N':>9} | {'native':>8} {'graph':>8} {'direct':>8} {'blocked':>8} {'blk graph':>9} "
            f"{'cuda-core':>9} {'staged':>8} {'bf16':>8} "
            f"{'bf16 stg':>8} {'bf16 blk':>8} {'bf16 chk':>8} | {'eager':>8} "
            f"{'compile':>8} {'adam':>7} | {'x eager':>7} {'x cmp':>6} {'x core':>6} | "
            f"{'roofline':>8} | {'err':>7}")
    print(f"forward, H={H}, float32, log_sign, ms per call")
    print(head)
    print("-" * len(head))
    cmp_fn = torch.compile(cell_step, dynamic=False) if compile_ref else None
    for N in SIZES:
        torch.manual_seed(0)
        net = pymeta.LSTMOptimizerNet(H).to(DEV)
        grad = torch.randn(N, device=DEV) * 1e-3
        state = torch.randn(4, H, N, device=DEV) * 0.1
        st = tuple(s.t().contiguous() for s in state)
        reps = 20 if N < 10_000_000 else 5
        with torch.no_grad():
            nat = timed(lambda: native_step(net, grad, state), reps)
            gr = graph_time(lambda: native_step(net, grad, state), reps)
            step = lambda: native_step(net, grad, state)  # noqa: E731
            blocked = pymeta.reference.lstm_state_to_blocked(state)
            blk = timed(lambda: native_step(net, grad, blocked), reps)
            blkg = graph_time(lambda: native_step(net, grad, blocked), reps)
            u_blk, ns_blk = native_step(net, grad, blocked)
            u_nat, ns_nat = step()
            same_blk = torch.equal(u_blk, u_nat) and torch.equal(
                pymeta.reference.lstm_state_to_feature_major(ns_blk)[:, :, :N], ns_nat)
            del blocked, u_blk, ns_blk, u_nat, ns_nat
            dir_, same_dir = variant({"PYMETA_LSTM_MMA_STAGED": "0"}, step, reps)
            stg, same_stg = variant({"PYMETA_LSTM_MMA_STAGED": "1", "PYMETA_LSTM_SYNC": "0"},
                                    step, reps)
            os.environ["PYMETA_LSTM_MMA"] = "0"
            core = timed(lambda: native_step(net, grad, state), reps)
            u_core = native_step(net, grad, state)[0]
            del os.environ["PYMETA_LSTM_MMA"]
            state16 = state.bfloat16()
            b16s = timed(lambda: native_step(net, grad, state16), reps)
            blocked16 = pymeta.reference.lstm_state_to_blocked(state16)
            b16b = timed(lambda: native_step(net, grad, blocked16), reps)
            del blocked16
            os.environ["PYMETA_LSTM_MMA_STAGED"] = "0"
            b16 = timed(lambda: native_step(net, grad, state16), reps)
            del os.environ["PYMETA_LSTM_MMA_STAGED"]
            os.environ["PYMETA_LSTM_BF16_NATIVE"] = "0"
            b16c = timed(lambda: native_step(net, grad, state16), reps)
            del os.environ["PYMETA_LSTM_BF16_NATIVE"]
            err16 = (native_step(net, grad, state16)[0]
                     - native_step(net, grad, state16.float())[0]).abs().max().item()
            del state16
            eager = timed(lambda: cell_step(net, grad, st), reps)
            u_ref = cell_step(net, grad, st)[0]
            err = (native_step(net, grad, state)[0] - u_ref).abs().max().item()
            err_core = (u_core - u_ref).abs().max().item()
            cmp = timed(lambda: cmp_fn(net, grad, st), reps) if cmp_fn else float("nan")
        prm = torch.zeros(N, device=DEV, requires_grad=True)
        prm.grad = grad.clone()
        adam = torch.optim.Adam([prm], lr=1e-3, fused=DEV == "cuda")
        ad = timed(adam.step, reps)
        floor = (32 * H + 8) * N / bw * 1e3
        print(f"{N:>9} | {nat:>8.4f} {gr:>8.4f} {dir_:>8.4f} {blk:>8.4f} {blkg:>9.4f} {core:>9.4f} "
              f"{stg:>8.4f} {b16:>8.4f} {b16s:>8.4f} "
              f"{b16b:>8.4f} {b16c:>8.4f} | {eager:>8.4f} {cmp:>8.4f} "
              f"{ad:>7.4f} | {eager / nat:>7.1f} {cmp / nat:>6.1f} {core / nat:>6.1f} | "
              f"{floor / min(nat, gr if gr == gr else nat):>8.0%} | {err:>7.1e} (cuda-core {err_core:.1e}, same bits as "
              f"native: direct {same_dir}, blocked {same_blk}, staged {same_stg}; "
              f"bf16 vs upcast {err16:.0e}; direct roofline {floor / dir_:.0%}, blocked "
              f"roofline {floor / blk:.0%}, x eager {eager / blk:.1f}; "
              f"bf16 roofline {(16 * H + 8) * N / bw * 1e3 / min(b16, b16s, b16b):.0%})",
              flush=True)
        del net, grad, state, st, prm, adam
        torch.cuda.empty_cache()


def backward_table(H):
    """The backward op alone (per-coordinate pass + weight-gradient blocks + the ordered sum):
    the default (CUDA-core pass, with loads one unit ahead at H <= 20; tensor-core weight
    gradients) vs the tensor-core pass (PYMETA_LSTM_MMA_BWD=1), the CUDA-core weight-gradient
    tiles (PYMETA_LSTM_WG_MMA=0), the pass's plain loops (PYMETA_LSTM_BWD_AHEAD=0) and its
    loads ahead (PYMETA_LSTM_BWD_AHEAD=1), the plain loops at 6 blocks per SM
    (PYMETA_LSTM_BWD_WIDE=1), the default form with 32-bit offsets (PYMETA_LSTM_OFF32=1); and
    with a bfloat16 state, the pass reading it (the default since 2026-11-27) and the float32
    kernels on converted chunks (PYMETA_LSTM_BF16_NATIVE=0, the path before)."""
    print(f"\nbackward op, H={H}, ms per call: default | tensor-core pass | cuda-core wgrad | "
          "plain loops | loads ahead | wide | off32 | bf16 state | bf16 chunks")
    for N in SIZES[:2] + (200_000,):
        torch.manual_seed(0)
        net = pymeta.LSTMOptimizerNet(H).to(DEV)
        w = [x.detach() for x in net.weights()]
        grad = torch.randn(N, device=DEV) * 1e-3
        state = torch.randn(4, H, N, device=DEV) * 0.1
        du, ds = torch.randn(N, device=DEV), torch.randn(4, H, N, device=DEV)
        op = lambda: torch.ops.pymeta.lstm_optimizer_step_backward(  # noqa: E731
            du, ds, grad, state, *w, "log_sign", P, OUT_SCALE)
        res = []
        for env in ({}, {"PYMETA_LSTM_MMA_BWD": "1"}, {"PYMETA_LSTM_WG_MMA": "0"},
                    {"PYMETA_LSTM_BWD_AHEAD": "0"}, {"PYMETA_LSTM_BWD_AHEAD": "1"},
                    {"PYMETA_LSTM_BWD_WIDE": "1"}, {"PYMETA_LSTM_OFF32": "1"}):
            os.environ.update(env)
            res.append(timed(op))
            for k in env:
                del os.environ[k]
        s16, d16 = state.bfloat16(), ds.bfloat16()
        op16 = lambda: torch.ops.pymeta.lstm_optimizer_step_backward(  # noqa: E731
            du, d16, grad, s16, *w, "log_sign", P, OUT_SCALE)
        res.append(timed(op16))
        os.environ["PYMETA_LSTM_BF16_NATIVE"] = "0"
        res.append(timed(op16))
        del os.environ["PYMETA_LSTM_BF16_NATIVE"]
        print(f"  N={N:>9}: " + " | ".join(f"{r:.4f}" for r in res), flush=True)


def unroll_table(H, N=200_000, T=20):
    torch.manual_seed(0)
    net = pymeta.LSTMOptimizerNet(H).to(DEV)
    a = torch.rand(N, device=DEV) + 0.5
    b = torch.randn(N, device=DEV)
    theta0 = torch.randn(N, device=DEV)
    weights = list(net.parameters())

    def run(native, state_dtype=None):
        theta = theta0.clone()
        state = net.init_state(N, device=DEV, dtype=state_dtype) if native else \
            tuple(torch.zeros(N, H, device=DEV) for _ in range(4))
        loss = 0.0
        for _ in range(T):
            g = (a * (theta - b)).detach()  # second derivatives of the optimizee dropped
            if native:
                u, state = net(g, state)
            else:
                u, state = cell_step(net, g, state)
            theta = theta + u
            loss = loss + 0.5 * (a * (theta - b) ** 2).sum()
        return torch.autograd.grad(loss, weights)

    out = {}
    variants = {"cuda-core": {"PYMETA_LSTM_MMA": "0", "PYMETA_LSTM_WG_MMA": "0"},
                "cc-wgrad": {"PYMETA_LSTM_WG_MMA": "0"}, "plain": {"PYMETA_LSTM_BWD_AHEAD": "0"},
                "mma-bwd": {"PYMETA_LSTM_MMA_BWD": "1"}, "wide": {"PYMETA_LSTM_BWD_WIDE": "1"},
                "off32": {"PYMETA_LSTM_OFF32": "1"}, "direct": {"PYMETA_LSTM_MMA_STAGED": "0"}}
    for name, native in (("native", True), ("cuda-core", True), ("bf16", True),
                         ("cc-wgrad", True), ("plain", True), ("mma-bwd", True), ("wide", True),
                         ("off32", True), ("direct", True), ("eager", False)):
        os.environ.update(variants.get(name, {}))
        sd = torch.bfloat16 if name == "bf16" else None
        with pymeta.use_backend("native" if native else "reference"):
            grads = run(native, sd)
            ms = timed(lambda: run(native, sd), reps=3, repeats=5, warmup=1)
            peak = float("nan")
            if DEV == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                run(native, sd)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        out[name] = (ms, peak, grads)
        for k in variants.get(name, {}):
            del os.environ[k]
    err = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
              for x, y in zip(out["native"][2], out["eager"][2]))
    print(f"\n{T}-step unroll, forward + backward to the optimizer's weights, N={N}, H={H}:")
    print(f"  native {out['native'][0]:.3f} ms, peak {out['native'][1]:.0f} MiB | eager LSTMCell "
          f"{out['eager'][0]:.3f} ms, peak {out['eager'][1]:.0f} MiB | x {out['eager'][0] / out['native'][0]:.2f}, "
          f"memory {out['native'][1] / out['eager'][1]:.2f} of eager | meta-grad rel err {err:.1e}",
          flush=True)
    err_cc = max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
                 for x, y in zip(out["cc-wgrad"][2], out["eager"][2]))
    print(f"  (native with the CUDA-core kernels: {out['cuda-core'][0]:.3f} ms; bf16 state "
          f"{out['bf16'][0]:.3f} ms, peak {out['bf16'][1]:.0f} MiB; CUDA-core weight "
          f"gradients {out['cc-wgrad'][0]:.3f} ms, meta-grad rel err {err_cc:.1e}; the pass's "
          f"plain loops {out['plain'][0]:.3f} ms; tensor-core pass {out['mma-bwd'][0]:.3f} ms; "
          f"wide CUDA-core pass {out['wide'][0]:.3f} ms; 32-bit offsets {out['off32'][0]:.3f} ms, "
          f"same meta-gradient bits {all(torch.equal(a, b) for a, b in zip(out['off32'][2], out['native'][2]))}; "
          f"the direct forward {out['direct'][0]:.3f} ms, same bits "
          f"{all(torch.equal(a, b) for a, b in zip(out['direct'][2], out['native'][2]))})")
    # The eager reference moved by 16-24% between passes and runs (bench/RESULTS.md, runs
    # 11-13), so the ratio is also taken from alternating pairs: native, eager, native, ...
    pairs = []
    for _ in range(5):
        with pymeta.use_backend("native"):
            a = timed(lambda: run(True), reps=3, repeats=1, warmup=0)
        with pymeta.use_backend("reference"):
            b = timed(lambda: run(False), reps=3, repeats=1, warmup=0)
        pairs.append(b / a)
    pairs.sort()
    print(f"  x eager from 5 alternating pairs: median {pairs[2]:.2f} (range {pairs[0]:.2f}-"
          f"{pairs[-1]:.2f})", flush=True)
    if DEV == "cuda":  # the unroll's device time: its host work (autograd, launches) removed
        with pymeta.use_backend("native"):
            replay = cuda_graph(lambda: run(True))
            if replay is None:
                print("  native unroll in a CUDA graph: capture failed")
            else:
                ms = timed(replay, reps=3, repeats=3, warmup=1)
                print(f"  native unroll replayed from a CUDA graph: {ms:.3f} ms "
                      f"(x {out['eager'][0] / ms:.2f} eager)", flush=True)
            for name in ("cc-wgrad", "plain", "mma-bwd", "wide", "off32", "direct"):
                os.environ.update(variants[name])
                replay = cuda_graph(lambda: run(True))
                if replay is not None:
                    ms = timed(replay, reps=3, repeats=3, warmup=1)
                    print(f"  ... {name} ({' '.join(f'{k}={v}' for k, v in variants[name].items())}): "
                          f"{ms:.3f} ms (x {out['eager'][0] / ms:.2f} eager)", flush=True)
                for k in variants[name]:
                    del os.environ[k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--H", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = ap.parse_args()
    global DEV, SIZES
    if args.dry_run:
        DEV, SIZES = "cpu", (1000, 3000)
    print(torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch", torch.__version__)
    forward_table(args.H, not args.no_compile)
    backward_table(args.H)
    unroll_table(args.H, N=200_000 if DEV == "cuda" else 2000)


if __name__ == "__main__":
    main()
