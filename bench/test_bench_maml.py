"""One MAML meta-iteration (adapt + query loss + backward to the meta-parameters):
pymeta.MAML vs a per-task Python loop vs a hand-written torch.func vmap(grad). The workloads
and the three implementations are pymeta.workloads', shared with `pymeta bench`.

CI runs this file with --benchmark-disable (each case once, as a smoke test). Timing:
    pytest bench/test_bench_maml.py --benchmark-enable
"""
from __future__ import annotations

import pytest
import torch

import pymeta
from pymeta.workloads import CPU_CONV4, SINUSOID_MLP, build_maml, meta_iteration

IMPLS = ["pymeta", "torch_func", "loop"]


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_maml_conv4_cpu(benchmark, impl, order):
    module, run, data = build_maml(impl, CPU_CONV4, first_order=order == "first")
    benchmark.group = f"maml-conv4-cpu-{order}-order"
    benchmark.extra_info.update(torch=torch.__version__, backend=pymeta.get_backend(), **CPU_CONV4)
    loss = benchmark(meta_iteration, module, run, data)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_maml_sinusoid_cpu(benchmark, impl):
    module, run, data = build_maml(impl, SINUSOID_MLP, first_order=False)
    benchmark.group = "maml-sinusoid-mlp-cpu-second-order"
    loss = benchmark(meta_iteration, module, run, data)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("cfg", [CPU_CONV4, SINUSOID_MLP], ids=["conv4", "sinusoid"])
@pytest.mark.parametrize("first_order", [False, True])
def test_implementations_agree(cfg, first_order):
    """The implementations compute the same meta-gradient (smaller T for speed). torch.func's
    second order through BatchNorm is off (its batch-norm backward batching rule, see
    pytorch/functorch#534; finite differences side with the loop), so with the Conv-4 it is
    compared on first order only."""
    cfg = {**cfg, "tasks": 2, "queries": 2}
    grads = {}
    with_bn = cfg.get("model", "conv4") == "conv4"
    for impl in IMPLS if (first_order or not with_bn) else ["pymeta", "loop"]:
        module, run, data = build_maml(impl, cfg, first_order)
        meta_iteration(module, run, data)
        model = module.module if isinstance(module, pymeta.MAML) else module
        grads[impl] = [p.grad for p in model.parameters()]
    for impl, g in grads.items():
        torch.testing.assert_close(g, grads["pymeta"], rtol=1e-4, atol=1e-5, msg=lambda m: f"{impl}: {m}")
