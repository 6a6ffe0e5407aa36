"""One MAML meta-iteration (adapt + query loss + backward to the meta-parameters):
pymeta.MAML vs a per-task Python loop vs a hand-written torch.func vmap(grad).

CI runs this file with --benchmark-disable (each case once, as a smoke test). Timing:
    pytest bench/test_bench_maml.py --benchmark-enable
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

import pymeta
from pymeta.models import Conv4

# ---- workloads ---------------------------------------------------------------------------
# CPU config: Omniglot-sized Conv4 (16 filters), 5-way 1-shot, 15 queries per class.
CPU_CONV4 = dict(in_channels=1, hidden=16, n_way=5, image_size=28, shots=1, queries=15,
                 tasks=8, inner_steps=2, inner_lr=0.4)


def make_workload(cfg, device="cpu", seed=0):
    """Returns (model, (x_support, y_support, x_query, y_query)) for the config."""
    torch.manual_seed(seed)
    model = Conv4(cfg["in_channels"], hidden=cfg["hidden"], n_way=cfg["n_way"],
                  image_size=cfg["image_size"]).to(device)
    T, n, s = cfg["tasks"], cfg["n_way"], cfg["image_size"]
    k, q = cfg["shots"], cfg["queries"]
    xs = torch.randn(T, n * k, cfg["in_channels"], s, s, device=device)
    xq = torch.randn(T, n * q, cfg["in_channels"], s, s, device=device)
    ys = torch.arange(n, device=device).repeat_interleave(k).expand(T, -1).contiguous()
    yq = torch.arange(n, device=device).repeat_interleave(q).expand(T, -1).contiguous()
    return model, (xs, ys, xq, yq)


def _bn_batch_stats(model):
    # functional_call overrides that make BatchNorm use batch statistics, running stats untouched
    return {f"{m}.{b}": None for m, mod in model.named_modules() if isinstance(mod, _BatchNorm)
            for b in ("running_mean", "running_var", "num_batches_tracked")}


# ---- the three implementations: each returns the meta-loss, whose backward is timed too ----

def pymeta_meta_loss(maml):
    def run(xs, ys, xq, yq):
        return maml.meta_loss(xs, ys, xq, yq, F.cross_entropy)
    return run


def loop_meta_loss(model, steps, lr, first_order):
    """Per task: autograd.grad inner steps (create_graph for second order)."""
    bn = _bn_batch_stats(model)

    def run(xs, ys, xq, yq):
        meta = dict(model.named_parameters())
        total = 0.0
        for t in range(xs.shape[0]):
            p = meta
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(model, {**p, **bn}, (xs[t],)), ys[t])
                g = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
                p = {n: v - lr * gi for (n, v), gi in zip(p.items(), g)}
            total = total + F.cross_entropy(functional_call(model, {**p, **bn}, (xq[t],)), yq[t])
        return total / xs.shape[0]
    return run


def torchfunc_meta_loss(model, steps, lr, first_order):
    """vmap over tasks of (torch.func.grad inner steps, then the query loss)."""
    bn = _bn_batch_stats(model)

    def task_loss(p, x, y):
        return F.cross_entropy(functional_call(model, {**p, **bn}, (x,)), y)

    def task_meta_loss(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = grad(task_loss)(p, xs, ys)
            p = {n: v - lr * (g[n].detach() if first_order else g[n]) for n, v in p.items()}
        return task_loss(p, xq, yq)

    def run(xs, ys, xq, yq):
        meta = dict(model.named_parameters())
        return vmap(task_meta_loss, in_dims=(None, 0, 0, 0, 0))(meta, xs, ys, xq, yq).mean()
    return run


def build(impl, cfg, first_order, device="cpu"):
    model, data = make_workload(cfg, device)
    steps, lr = cfg["inner_steps"], cfg["inner_lr"]
    if impl == "pymeta":
        maml = pymeta.MAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order)
        return maml, pymeta_meta_loss(maml), data
    fn = loop_meta_loss if impl == "loop" else torchfunc_meta_loss
    return model, fn(model, steps, lr, first_order), data


def meta_iteration(module, run, data):
    for p in module.parameters():
        p.grad = None
    loss = run(*data)
    loss.backward()
    return loss


# ---- benchmarks --------------------------------------------------------------------------

IMPLS = ["pymeta", "torch_func", "loop"]


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_maml_conv4_cpu(benchmark, impl, order):
    torch.manual_seed(0)
    module, run, data = build(impl, CPU_CONV4, first_order=order == "first")
    benchmark.group = f"maml-conv4-cpu-{order}-order"
    benchmark.extra_info.update(torch=torch.__version__, backend=pymeta.get_backend(), **CPU_CONV4)
    loss = benchmark(meta_iteration, module, run, data)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("first_order", [False, True])
def test_implementations_agree(first_order):
    """The implementations compute the same meta-gradient (smaller T for speed). torch.func's
    second order through BatchNorm is off (its batch-norm backward batching rule, see
    pytorch/functorch#534; finite differences side with the loop), so it is compared on first
    order only."""
    cfg = {**CPU_CONV4, "tasks": 2, "queries": 2}
    grads = {}
    for impl in IMPLS if first_order else ["pymeta", "loop"]:
        module, run, data = build(impl, cfg, first_order)
        meta_iteration(module, run, data)
        model = module.module if isinstance(module, pymeta.MAML) else module
        grads[impl] = [p.grad for p in model.parameters()]
    for impl, g in grads.items():
        torch.testing.assert_close(g, grads["pymeta"], rtol=1e-4, atol=1e-5, msg=lambda m: f"{impl}: {m}")
