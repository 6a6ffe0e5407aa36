"""Benchmark workloads shared by ``pymeta bench`` and the pytest-benchmark suites in bench/.

A workload builds its inputs once and returns named variants: zero-argument callables that
each do the same work, the pymeta op first and the baselines after (eager reference,
per-tensor loop, ``torch._foreach``, ``torch.compile``, whichever applies). ``bytes`` is the
fewest bytes the work must move through memory (each input read once, each output written
once), for the roofline floor on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import pymeta
from pymeta import ops, reference


@dataclass
class Workload:
    name: str
    description: str
    variants: dict[str, Callable[[], object]]
    bytes: int = 0
    baseline: str = ""  # the variant the speedups are relative to
    extra: dict = field(default_factory=dict)


def conv4_shapes(channels: int = 64, in_channels: int = 1, n_way: int = 5, feat: int = 1) -> list[tuple]:
    """Parameter shapes of the few-shot Conv-4: 4 x (3x3 conv + bias, BN scale and shift),
    then a linear head from channels * feat to n_way. 18 tensors."""
    shapes = []
    c_in = in_channels
    for _ in range(4):
        shapes += [(channels, c_in, 3, 3), (channels,), (channels,), (channels,)]
        c_in = channels
    shapes += [(n_way, channels * feat), (n_way,)]
    return shapes


def _native(fn):
    def run():
        with pymeta.use_backend("native"):
            return fn()
    return run


def inner_update_workload(device: str = "cpu", tasks: int = 32, channels: int = 64,
                          shared: bool = False, lr_mode: str = "scalar",
                          dtype: torch.dtype = torch.float32, backward: bool = False,
                          compile: bool = True) -> Workload:
    """One inner-loop step over the Conv-4's 18 tensors x `tasks` tasks.

    lr_mode: "scalar" (a float), "per_tensor" (a [] tensor per param, MAML++) or
    "per_param" (a tensor shaped like each param, Meta-SGD). With backward=True the variants
    also run the backward of a sum over the outputs (grads to params and rates).
    """
    dev = torch.device(device)
    shapes = conv4_shapes(channels)
    gen = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(s, generator=gen).to(dev, dtype)

    params = [rnd(*s) if shared else rnd(tasks, *s) for s in shapes]
    grads = [rnd(tasks, *s) for s in shapes]
    if lr_mode == "scalar":
        lr: object = 0.4
        lr_list = [0.4] * len(shapes)
    elif lr_mode == "per_tensor":
        lr = [torch.tensor(0.4, device=dev, dtype=dtype) for _ in shapes]
        lr_list = lr
    elif lr_mode == "per_param":
        lr = [torch.full(s, 0.4, device=dev, dtype=dtype) for s in shapes]
        lr_list = lr
    else:
        raise ValueError(f"lr_mode must be scalar, per_tensor or per_param, not {lr_mode!r}")
    numel = sum(g.numel() for g in grads)
    esize = grads[0].element_size()
    n_task = numel // tasks
    # Forward: read grads, read params (once if shared), write outputs; rates when tensors.
    fwd_bytes = esize * (2 * numel + (n_task if shared else numel)
                         + (n_task if lr_mode == "per_param" else 0))
    if backward:
        for t in params + (lr if isinstance(lr, list) else []):
            t.requires_grad_()

    def loop():
        return [p - a * g for p, g, a in zip(params, grads, lr_list)]

    def foreach():
        if lr_mode == "scalar":
            src = params if not shared else [p.expand_as(g) for p, g in zip(params, grads)]
            return torch._foreach_add(src, grads, alpha=-0.4)
        scaled = torch._foreach_mul(grads, lr_list)
        src = params if not shared else [p.expand_as(g) for p, g in zip(params, grads)]
        return torch._foreach_sub(src, scaled)

    def with_backward(fn):
        if not backward:
            return fn
        wrt = params + (lr if isinstance(lr, list) else [])

        def run():
            outs = fn()
            return torch.autograd.grad(outs, wrt, grad_outputs=grads)  # grads as upstream: any [T, S] tensors
        return run

    variants: dict[str, Callable[[], object]] = {
        "pymeta": with_backward(_native(lambda: ops.inner_update(params, grads, lr))),
        "reference": with_backward(lambda: reference.inner_update(params, grads, lr if isinstance(lr, list) else None,
                                                                  lr if isinstance(lr, float) else 0.0)),
        "per-tensor loop": with_backward(loop),
        "torch._foreach": with_backward(foreach),
    }
    if compile:
        variants["torch.compile(loop)"] = with_backward(torch.compile(loop, dynamic=False))
    name = (f"inner_update conv4x{tasks} {'shared' if shared else 'per-task'} {lr_mode}"
            f"{' fwd+bwd' if backward else ''} {str(dtype).replace('torch.', '')}")
    bwd_bytes = 0
    if backward:  # read dout (+ grads for the rates), write dgrads is not needed here: dparams, dlr
        bwd_bytes = esize * (numel + (numel if lr_mode != "scalar" else 0) + (n_task if shared else numel))
    return Workload(name=name, description=f"{numel / 1e6:.2f}M elements in {len(shapes)} tensors",
                    variants=variants, bytes=fwd_bytes + bwd_bytes, baseline="per-tensor loop")


def all_workloads(device: str, quick: bool = False) -> list[Workload]:
    """The workloads `pymeta bench` runs on `device`."""
    tasks = 8 if (quick and device == "cpu") else 32
    out = [
        inner_update_workload(device, tasks, shared=False, lr_mode="scalar"),
        inner_update_workload(device, tasks, shared=True, lr_mode="scalar"),
    ]
    if not quick:  # torch.compile only where it answers a question: compiles cost ~20 s each
        out += [
            inner_update_workload(device, tasks, shared=False, lr_mode="per_param", compile=False),
            inner_update_workload(device, tasks, shared=True, lr_mode="per_tensor", backward=True),
            inner_update_workload(device, tasks, shared=False, lr_mode="per_param", backward=True,
                                  compile=False),
        ]
    return out
