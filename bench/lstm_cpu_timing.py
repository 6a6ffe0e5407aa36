"""CPU timing of lstm_optimizer_step, float32, log_sign preprocessing (H = 20 by default): the
native op against the PyTorch reference, eager and under torch.compile (inductor,
dynamic=False, warmed up), at 1 and 2 threads.

Columns (wall-clock ms per call; the median of `--repeats` calls after warm-up):
  fwd       forward under no_grad
  fwd+bwd   forward with autograd, then torch.autograd.grad(update.sum() + new_state.sum(),
            [state, *weights]): what a meta-training step pays
  x cmp     torch.compile(reference) time / native time
With --lstmcell, "cell" / "cell-compile" time the issue's own baseline for the forward: two
nn.LSTMCell + nn.Linear with the state kept in LSTMCell's [N, H] layout (no transposes),
eagerly and under torch.compile (dynamic=False).
With --bf16, "native-bf16" is the native op on a bfloat16 copy of the state (bfloat16
storage, float32 math: the kernels convert), "bf16-chunks" the same with
PYMETA_LSTM_BF16_NATIVE=0 (converted in chunks around the float32 kernels).
The machine's other jobs make single calls noisy: compare medians of one run, not across runs.

Run from the repository root with PYTHONPATH=. (a script outside the tree imports the
installed pymeta._C otherwise):
  PYTHONPATH=. python bench/lstm_cpu_timing.py [--N 100000] [--threads 1 2] [--no-compile]
      [--no-backward] [--keep-freed] [--bf16] [--lstmcell]
"""
import argparse
import os
import statistics
import time

import torch

import pymeta
from pymeta import reference
from pymeta.benchmark import keep_freed_cpu_memory
from pymeta.workloads import lstm_native, lstm_optimizer_inputs, lstm_reference


def median_ms(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, nargs="+", default=[100_000])
    ap.add_argument("--H", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--keep-freed", action="store_true",
                    help="glibc keeps freed memory (outputs do not fault in fresh pages each call)")
    ap.add_argument("--bf16", action="store_true", help="also time the native op on a bf16 state")
    ap.add_argument("--lstmcell", action="store_true",
                    help="also time the nn.LSTMCell baseline (forward), eager and compiled")
    args = ap.parse_args()
    if args.keep_freed:
        print("keep_freed_cpu_memory:", keep_freed_cpu_memory())
    print(f"pymeta {pymeta.__file__}; torch {torch.__version__}; float32 log_sign H={args.H}")

    impls = [("native", lstm_native), ("eager", lstm_reference)]
    bf16 = {}  # this N's bfloat16 copies of the state

    def native_bf16(g, s, *w):  # the same call on the bf16 copy of s
        return lstm_native(g, bf16["state_g" if s.requires_grad else "state"], *w)
    def bf16_chunks(g, s, *w):
        os.environ["PYMETA_LSTM_BF16_NATIVE"] = "0"
        try:
            return native_bf16(g, s, *w)
        finally:
            del os.environ["PYMETA_LSTM_BF16_NATIVE"]
    if args.bf16:
        impls[1:1] = [("native-bf16", native_bf16), ("bf16-chunks", bf16_chunks)]
    if not args.no_compile:
        impls.append(("compile", torch.compile(lstm_reference, dynamic=False)))
    for n in args.N:
        grad_, state, weights = lstm_optimizer_inputs(n, args.H)
        state_g = state.clone().requires_grad_()
        bf16["state"], bf16["state_g"] = state.bfloat16(), state.bfloat16().requires_grad_()
        def fwd(f):
            with torch.no_grad():
                return f(grad_, state, *weights)

        def fwd_bwd(f):
            update, new_state = f(grad_, state_g, *weights)
            used = bf16["state_g"] if f in (native_bf16, bf16_chunks) else state_g
            return torch.autograd.grad(update.sum() + new_state.sum(), [used, *weights])

        if args.lstmcell:
            net = pymeta.LSTMOptimizerNet(args.H)
            with torch.no_grad():
                for mine, w in zip(net.weights(), weights):
                    mine.copy_(w)
            cell_state = tuple(x.t().contiguous() for x in state)

            def cell_step(g):
                h1, c1 = net.cell1(reference.lstm_preprocess(g, "log_sign", 10.0),
                                   (cell_state[0], cell_state[1]))
                h2, c2 = net.cell2(h1, (cell_state[2], cell_state[3]))
                return net.out(h2).squeeze(1) * 0.1, (h1, c1, h2, c2)
            cell_cmp = torch.compile(cell_step, dynamic=False)
        err = (fwd(lstm_native)[0] - fwd(lstm_reference)[0]).abs().max().item()
        for t in args.threads:
            torch.set_num_threads(t)
            res = {}
            if args.lstmcell:
                with torch.no_grad():
                    for name, f in (("cell", cell_step), ("cell-compile", cell_cmp)):
                        res[name, "fwd"] = median_ms(lambda: f(grad_), args.repeats)
            for name, f in impls:
                res[name, "fwd"] = median_ms(lambda: fwd(f), args.repeats)
                if not args.no_backward:
                    res[name, "fwd+bwd"] = median_ms(lambda: fwd_bwd(f), max(3, args.repeats // 2))
            for kind in ("fwd",) if args.no_backward else ("fwd", "fwd+bwd"):
                line = f"N={n:>7} threads={t} {kind:>7}: " + "  ".join(
                    f"{name} {res[name, kind]:8.2f}" for name, _ in impls)
                if ("compile", kind) in res:
                    line += f"  | compile/native {res['compile', kind] / res['native', kind]:5.2f}x"
                if kind == "fwd" and ("cell", kind) in res:
                    line += (f"  | cell {res['cell', kind]:8.2f}  cell-compile "
                             f"{res['cell-compile', kind]:8.2f}  cell-compile/native "
                             f"{res['cell-compile', kind] / res['native', kind]:5.2f}x")
                print(line, flush=True)
        print(f"N={n}: max |update native - reference| = {err:.2e}")


if __name__ == "__main__":
    main()
