"""Benchmarks of one LSTM-optimizer step (H = 20, N = 100k coordinates, CPU): the fused
native op vs the reference in eager mode and under torch.compile; forward, and forward +
backward (the weight gradients of a meta-training step).

    pytest bench/test_bench_lstm_optimizer.py --benchmark-enable
With --benchmark-disable (the project default) every case runs once, on a small N, as a
smoke test; torch.compile then uses the quick aot_eager backend.
"""
from __future__ import annotations

import pytest
import torch

import pymeta
from pymeta import _backend, reference

H = 20
N_BENCH = 100_000
N_SMOKE = 1_000


def _workload(n: int):
    torch.manual_seed(0)
    net = pymeta.LSTMOptimizerNet(H)
    grad = torch.randn(n) * 10.0 ** torch.randint(-8, 1, (n,)).float()
    state = torch.randn(4, H, n) * 0.1
    weights = [w.detach().clone().requires_grad_() for w in net.weights()]
    return grad, state, weights


def _native(grad, state, *weights):
    return torch.ops.pymeta.lstm_optimizer_step(grad, state, *weights, "log_sign", 10.0, 0.1)


def _reference(grad, state, *weights):
    return reference.lstm_optimizer_step(grad, state, *weights, "log_sign", 10.0, 0.1)


_compiled: dict = {}


def _impl(kind: str, smoke: bool):
    if kind == "native":
        if not _backend.NATIVE:
            pytest.skip("pymeta._C is not built")
        return _native
    if kind == "reference":
        return _reference
    backend = "aot_eager" if smoke else "inductor"
    if backend not in _compiled:
        _compiled[backend] = torch.compile(_reference, backend=backend, fullgraph=True)
    return _compiled[backend]


KINDS = ["native", "reference", "compiled_reference"]


@pytest.mark.parametrize("kind", KINDS)
def test_bench_lstm_step_forward(benchmark, kind):
    smoke = benchmark.disabled
    grad, state, weights = _workload(N_SMOKE if smoke else N_BENCH)
    fn = _impl(kind, smoke)
    weights = [w.detach() for w in weights]
    with torch.no_grad():
        fn(grad, state, *weights)  # warm-up (and compilation)
        update, new_state = benchmark(fn, grad, state, *weights)
    assert update.shape == grad.shape and new_state.shape == state.shape


@pytest.mark.parametrize("kind", KINDS)
def test_bench_lstm_step_forward_backward(benchmark, kind):
    smoke = benchmark.disabled
    grad, state, weights = _workload(N_SMOKE if smoke else N_BENCH)
    state = state.requires_grad_()
    fn = _impl(kind, smoke)

    def step():
        update, new_state = fn(grad, state, *weights)
        loss = update.sum() + new_state.sum()
        return torch.autograd.grad(loss, [state, *weights])

    step()  # warm-up (and compilation)
    grads = benchmark(step)
    assert len(grads) == 11 and all(torch.isfinite(g).all() for g in grads)
