"""Benchmarks of one LSTM-optimizer step (H = 20, N = 100k coordinates): the fused native op
vs the reference in eager mode and under torch.compile, and the native op with a bfloat16
state; forward, and forward + backward (the weight gradients of a meta-training step). The workloads are pymeta.workloads', shared with
`pymeta bench`.

    pytest bench/test_bench_lstm_optimizer.py --benchmark-enable
With --benchmark-disable (the project default) every case runs once, on a small N, as a
smoke test; torch.compile then uses the quick aot_eager backend.
"""
from __future__ import annotations

import pytest
import torch

from pymeta import _backend, workloads
from benchutil import timed

N_BENCH = 100_000
N_SMOKE = 1_000
VARIANTS = {"native": "pymeta", "native_bf16_state": "pymeta", "reference": "reference",
            "compiled_reference": "torch.compile(reference)"}


def _variant(benchmark, device, kind, backward):
    if kind.startswith("native") and not _backend.NATIVE:
        pytest.skip("pymeta._C is not built")
    smoke = benchmark.disabled
    w = workloads.lstm_optimizer_workload(device, n=N_SMOKE if smoke else N_BENCH, backward=backward,
                                          compile=kind == "compiled_reference",
                                          compile_backend="aot_eager" if smoke else "inductor",
                                          state_dtype=torch.bfloat16 if "bf16" in kind else None)
    benchmark.group = w.name + f" ({device})"
    fn = timed(w.variants[VARIANTS[kind]], device)
    fn()  # warm-up (and compilation)
    return fn


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_bench_lstm_step_forward(benchmark, device, kind):
    update, new_state = benchmark(_variant(benchmark, device, kind, backward=False))
    assert update.dim() == 1 and new_state.shape == (4, 20, update.shape[0])


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_bench_lstm_step_forward_backward(benchmark, device, kind):
    grads = benchmark(_variant(benchmark, device, kind, backward=True))
    assert len(grads) == 11 and all(torch.isfinite(g).all() for g in grads)
