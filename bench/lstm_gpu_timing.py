"""CUDA timing of lstm_optimizer_step, float32, log_sign preprocessing: the native op against
the PyTorch reference (eager, and with --compile also torch.compile of it).

Columns (device time per call, ms, from CUDA events around `reps` back-to-back calls after
warm-up; the median of `repeats` such runs):
  fwd       forward only, under no_grad
  staged    the same with PYMETA_LSTM_MMA_STAGED=1 (the staged tensor-core forward; where it
            doesn't apply, H > 32, the same kernel as fwd)
  bwd op    the native backward op alone (pymeta::lstm_optimizer_step_backward: per-coordinate
            kernel + weight-gradient blocks + the fixed-order sum), no autograd
  cc wg     the same with PYMETA_LSTM_WG_MMA=0 (the CUDA-core weight-gradient tiles instead of
            the tensor-core ones, the default for float32 at H <= 32)
  fwd+bwd   forward with autograd, then torch.autograd.grad(update.sum() + new_state.sum(),
            weights): what a meta-training step pays
  x fwd / x f+b   reference eager time / native time
  err       max |update_native - update_reference| (a sanity check of the run)
Inputs are not flushed from L2 between calls (N = 100k at H = 20 fits in the H100's 50 MB L2).

Usage: python bench/lstm_gpu_timing.py [--compile] [--reps 20] [--repeats 5] [--H 20 32 64]
       [--N 100000 1000000]
"""
import argparse
import os

import torch
from benchutil import ms_per_call

import pymeta
from pymeta import reference

P, OUT_SCALE, PRE = 10.0, 0.1, "log_sign"


def timed(fn, reps, repeats, warmup=3):
    return ms_per_call(fn, reps, repeats, warmup)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--H", type=int, nargs="+", default=[20, 32, 64])
    ap.add_argument("--N", type=int, nargs="+", default=[100_000, 1_000_000])
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "float32", PRE)

    native = lambda *a: torch.ops.pymeta.lstm_optimizer_step(*a, PRE, P, OUT_SCALE)  # noqa: E731
    ref = lambda *a: reference.lstm_optimizer_step(*a, PRE, P, OUT_SCALE)  # noqa: E731
    impls = [("native", native), ("reference", ref)]
    if args.compile:
        impls.append(("compiled", torch.compile(ref, dynamic=False)))

    head = f"{'H':>3} {'N':>8} | {'native fwd':>10} {'staged':>8} {'bwd op':>8} {'cc wg':>8} {'fwd+bwd':>8} | " \
           f"{'ref fwd':>8} {'fwd+bwd':>8} |"
    if args.compile:
        head += f" {'cmp fwd':>8} {'fwd+bwd':>8} |"
    head += f" {'x fwd':>6} {'x f+b':>6} | {'err':>8}"
    print(head)
    print("-" * len(head))
    for H in args.H:
        for N in args.N:
            torch.manual_seed(0)
            net = pymeta.LSTMOptimizerNet(H).cuda()
            grad = torch.randn(N, device="cuda") * 1e-3
            state = torch.randn(4, H, N, device="cuda") * 0.1
            w = [x.detach().requires_grad_() for x in net.weights()]
            res = {}
            for name, f in impls:
                with torch.no_grad():
                    fwd = timed(lambda: f(grad, state, *w), args.reps, args.repeats)

                def fb():
                    u, s = f(grad, state, *w)
                    torch.autograd.grad(u.sum() + s.sum(), w)

                res[name] = (fwd, timed(fb, args.reps, args.repeats))
            os.environ["PYMETA_LSTM_MMA_STAGED"] = "1"
            with torch.no_grad():
                stg = timed(lambda: native(grad, state, *w), args.reps, args.repeats)
            del os.environ["PYMETA_LSTM_MMA_STAGED"]
            du = torch.ones(N, device="cuda")
            ds = torch.ones(4, H, N, device="cuda")
            wd = [x.detach() for x in w]
            bwd_op = timed(lambda: torch.ops.pymeta.lstm_optimizer_step_backward(
                du, ds, grad, state, *wd, PRE, P, OUT_SCALE), args.reps, args.repeats)
            os.environ["PYMETA_LSTM_WG_MMA"] = "0"
            bwd_wg = timed(lambda: torch.ops.pymeta.lstm_optimizer_step_backward(
                du, ds, grad, state, *wd, PRE, P, OUT_SCALE), args.reps, args.repeats)
            del os.environ["PYMETA_LSTM_WG_MMA"]
            with torch.no_grad():
                err = (native(grad, state, *wd)[0] - ref(grad, state, *wd)[0]).abs().max().item()
            nf, nfb = res["native"]
            rf, rfb = res["reference"]
            line = (f"{H:>3} {N:>8} | {nf:>10.3f} {stg:>8.3f} {bwd_op:>8.3f} {bwd_wg:>8.3f} {nfb:>8.3f} | "
                    f"{rf:>8.3f} {rfb:>8.3f} |")
            if args.compile:
                cf, cfb = res["compiled"]
                line += f" {cf:>8.3f} {cfb:>8.3f} |"
            line += f" {rf / nf:>6.1f} {rfb / nfb:>6.1f} | {err:>8.1e}"
            print(line, flush=True)
            del net, grad, state, w, wd, du, ds
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
