"""A / B timings of the LSTM step's kernel switches (PYMETA_LSTM_*), alternating in one
process, so that a default is chosen from paired measurements rather than from one column
of a table. Each round times every variant once (CUDA-event median of 3 x 20 calls); the
rounds rotate which variant goes first. Prints per variant the median and range over the
rounds and the median of its per-round ratio to the first variant.

  python bench/lstm_gpu_ab.py --op forward --N 1e6 1e7 \\
      --variant default: --variant off32:PYMETA_LSTM_OFF32=1
  python bench/lstm_gpu_ab.py --op backward --N 2e5 1e6 --variant default: \\
      --variant off32:PYMETA_LSTM_OFF32=1

--op forward: lstm_optimizer_step (no_grad, float32 state unless --bf16); backward: the
backward op (lstm_optimizer_step_backward) on random incoming gradients. H = 20 unless --H.
LAYOUT=blocked among a variant's switches gives it the blocked state layout
[ceil(N / 16), 4, H, 16] (the same values), e.g. --variant blk:LAYOUT=blocked.
"""
import argparse
import statistics

import torch
from benchutil import env_switches, ms_per_call

import pymeta


def parse_variant(text):
    label, _, envs = text.partition(":")
    env = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
    layout = env.pop("LAYOUT", "feature_major")
    if layout not in ("feature_major", "blocked"):
        raise SystemExit(f"variant {label}: LAYOUT must be feature_major or blocked")
    return label, env, layout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=["forward", "backward"], default="forward")
    ap.add_argument("--N", type=float, nargs="+", default=[1e6])
    ap.add_argument("--H", type=int, default=20)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 state (forward only)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variant", action="append", default=[],
                    help="label:NAME=VALUE,NAME=VALUE (environment switches); label: alone "
                         "is the default")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.bf16 and args.op != "forward":
        ap.error("--bf16 is for --op forward (the backward takes a float32 state)")
    variants = [parse_variant(v) for v in (args.variant or ["default:"])]
    dev = args.device
    torch.manual_seed(0)
    net = pymeta.LSTMOptimizerNet(args.H).to(dev)
    w = [x.detach() for x in net.weights()]
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, op {args.op}, H {args.H}"
          f"{', bf16 state' if args.bf16 else ''}")
    for n in args.N:
        N = int(n)
        grad = torch.randn(N, device=dev) * torch.logspace(-8, 1, N, device=dev)
        sdt = torch.bfloat16 if args.bf16 else torch.float32
        states = {"feature_major": (torch.randn(4, args.H, N, device=dev) * 0.5).to(sdt)}
        if any(layout == "blocked" for _, _, layout in variants):
            states["blocked"] = pymeta.reference.lstm_state_to_blocked(states["feature_major"])
        du = torch.randn(N, device=dev) if args.op == "backward" else None

        def caller(state):
            if args.op == "forward":
                def call():
                    with torch.no_grad():
                        return torch.ops.pymeta.lstm_optimizer_step(grad, state, *w,
                                                                    "log_sign", 10.0, 0.1)
            else:
                ds = torch.randn(state.shape, device=dev)

                def call():
                    return torch.ops.pymeta.lstm_optimizer_step_backward(
                        du, ds, grad, state, *w, "log_sign", 10.0, 0.1)
            return call
        calls = {layout: caller(st) for layout, st in states.items()}
        times = {label: [] for label, _, _ in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for label, env, layout in order:
                with env_switches(env):
                    times[label].append(ms_per_call(calls[layout], reps=20, repeats=3,
                                                    warmup=2, device=dev))
        base = times[variants[0][0]]
        print(f"N = {N}:")
        for label, _, _ in variants:
            t = times[label]
            ratio = statistics.median(a / b for a, b in zip(t, base))
            print(f"  {label:>10}: median {statistics.median(t):.4f} ms (range {min(t):.4f}-"
                  f"{max(t):.4f}), x{ratio:.3f} of {variants[0][0]}", flush=True)


if __name__ == "__main__":
    main()
