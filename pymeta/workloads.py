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
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

import pymeta
from pymeta import _checks, ops, reference
from pymeta.models import MLP, Conv4


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
    _counts("pymeta.workloads.conv4_shapes", channels=channels, in_channels=in_channels, n_way=n_way, feat=feat)
    shapes = []
    c_in = in_channels
    for _ in range(4):
        shapes += [(channels, c_in, 3, 3), (channels,), (channels,), (channels,)]
        c_in = channels
    shapes += [(n_way, channels * feat), (n_way,)]
    return shapes


def _counts(where: str, **counts) -> None:
    """Each count an int >= 1, or an error naming it."""
    for name, v in counts.items():
        _checks.integer(where, name, v, min=1)


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
    _counts("pymeta.workloads.inner_update_workload", tasks=tasks, channels=channels)
    if lr_mode not in ("scalar", "per_tensor", "per_param"):
        raise ValueError(f"inner_update_workload: lr_mode must be scalar, per_tensor or per_param, "
                         f"not {lr_mode!r}")
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
    else:  # "per_param"
        lr = [torch.full(s, 0.4, device=dev, dtype=dtype) for s in shapes]
        lr_list = lr
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


# ---- lstm_optimizer_step -------------------------------------------------------------------

def lstm_optimizer_inputs(n: int, hidden: int = 20, device: str = "cpu", seed: int = 0,
                          dtype: torch.dtype = torch.float32):
    """(grad [n], state [4, H, n], the net's 10 weights requiring grad): gradients spread over
    nine decades as an optimizee's are, a small random state."""
    _counts("pymeta.workloads.lstm_optimizer_inputs", n=n, hidden=hidden)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = pymeta.LSTMOptimizerNet(hidden)
    grad_ = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-8, 1, (n,), generator=gen).float()
    state = torch.randn(4, hidden, n, generator=gen) * 0.1
    weights = [w.detach().to(device, dtype).requires_grad_() for w in net.weights()]
    return grad_.to(device, dtype), state.to(device, dtype), weights


def lstm_native(grad_, state, *weights):
    return torch.ops.pymeta.lstm_optimizer_step(grad_, state, *weights, "log_sign", 10.0, 0.1)


def lstm_reference(grad_, state, *weights):
    return reference.lstm_optimizer_step(grad_, state, *weights, "log_sign", 10.0, 0.1)


def lstm_optimizer_workload(device: str = "cpu", n: int = 100_000, hidden: int = 20, backward: bool = False,
                            compile: bool = True, compile_backend: str = "inductor",
                            state_dtype: torch.dtype | None = None) -> Workload:
    """One step of the coordinatewise LSTM optimizer over n coordinates (log_sign
    preprocessing): the fused op vs the reference eagerly and under torch.compile
    (fullgraph). backward=True adds the backward to the state and the 10 weights (the
    meta-training step). state_dtype=torch.bfloat16 stores the state in bfloat16 (float32
    math). Variants return the op's outputs (forward) or the gradients."""
    _counts("pymeta.workloads.lstm_optimizer_workload", n=n, hidden=hidden)
    grad_, state, weights = lstm_optimizer_inputs(n, hidden, device)
    if state_dtype is not None:
        state = state.to(state_dtype)
    if backward:
        state = state.requires_grad_()

    def make(fn):
        if not backward:
            def fwd():
                with torch.no_grad():
                    return fn(grad_, state, *weights)
            return fwd

        def fwd_bwd():
            update, new_state = fn(grad_, state, *weights)
            return torch.autograd.grad(update.sum() + new_state.float().sum(), [state, *weights])
        return fwd_bwd

    variants: dict[str, Callable[[], object]] = {}
    if pymeta._backend.NATIVE:
        variants["pymeta"] = make(lstm_native)
    variants["reference"] = make(lstm_reference)
    if compile:
        variants["torch.compile(reference)"] = make(torch.compile(lstm_reference, backend=compile_backend,
                                                                  fullgraph=True))
    esize, ssize = grad_.element_size(), state.element_size()
    fwd_bytes = 2 * esize * n + 8 * ssize * hidden * n  # read grad, state; write update, new state
    # + read the incoming gradients, write d_state (and d_grad)
    bwd_bytes = 2 * esize * n + 12 * ssize * hidden * n if backward else 0
    tag = " bf16 state" if state_dtype == torch.bfloat16 else ""
    return Workload(name=f"lstm_optimizer_step H={hidden} N={n // 1000}k{tag}{' fwd+bwd' if backward else ''}",
                    description=f"{n} coordinates, hidden {hidden}, 2 LSTM layers",
                    variants=variants, bytes=fwd_bytes + bwd_bytes, baseline="reference")


# ---- MAML meta-iteration ---------------------------------------------------------------------

# Omniglot-sized Conv-4 (16 filters), 5-way 1-shot, 15 queries per class: the CPU config.
CPU_CONV4 = dict(model="conv4", in_channels=1, hidden=16, n_way=5, image_size=28, shots=1, queries=15,
                 tasks=8, inner_steps=2, inner_lr=0.4)
# The MAML paper's Omniglot Conv-4 (64 filters), 32 tasks, 5 inner steps: the GPU config.
GPU_CONV4 = {**CPU_CONV4, "hidden": 64, "tasks": 32, "inner_steps": 5}
# The sinusoid regression of MAML / Meta-SGD: 1-40-40-1 MLP, 25 tasks, 10-shot.
SINUSOID_MLP = dict(model="mlp", tasks=25, shots=10, queries=10, inner_steps=1, inner_lr=0.01)


def make_maml_inputs(cfg: dict, device: str = "cpu", seed: int = 0):
    """(model, (x_support, y_support, x_query, y_query)) for a MAML config; random data of
    the config's shapes (classification: labels 0..n_way-1)."""
    keys = ["tasks", "shots", "queries"]
    if cfg.get("model", "conv4") != "mlp":
        keys += ["in_channels", "hidden", "n_way", "image_size"]
    _counts("pymeta.workloads.make_maml_inputs", **{f"cfg[{k!r}]": cfg.get(k) for k in keys})
    torch.manual_seed(seed)
    T, k, q = cfg["tasks"], cfg["shots"], cfg["queries"]
    if cfg.get("model", "conv4") == "mlp":
        model = MLP(1, (40, 40), 1).to(device)
        x = torch.rand(T, k + q, 1, device=device) * 10 - 5
        y = torch.sin(x)
        return model, (x[:, :k], y[:, :k], x[:, k:], y[:, k:])
    model = Conv4(cfg["in_channels"], hidden=cfg["hidden"], n_way=cfg["n_way"],
                  image_size=cfg["image_size"]).to(device)
    n, s = cfg["n_way"], cfg["image_size"]
    xs = torch.randn(T, n * k, cfg["in_channels"], s, s, device=device)
    xq = torch.randn(T, n * q, cfg["in_channels"], s, s, device=device)
    ys = torch.arange(n, device=device).repeat_interleave(k).expand(T, -1).contiguous()
    yq = torch.arange(n, device=device).repeat_interleave(q).expand(T, -1).contiguous()
    return model, (xs, ys, xq, yq)


def _maml_loss_fn(cfg: dict):
    return F.mse_loss if cfg.get("model", "conv4") == "mlp" else F.cross_entropy


def _bn_batch_stats(model):
    # functional_call overrides that make BatchNorm use batch statistics, running stats untouched
    return {f"{m}.{b}": None for m, mod in model.named_modules() if isinstance(mod, _BatchNorm)
            for b in ("running_mean", "running_var", "num_batches_tracked")}


def pymeta_meta_loss(maml, loss_fn=F.cross_entropy):
    def run(xs, ys, xq, yq):
        return maml.meta_loss(xs, ys, xq, yq, loss_fn)
    return run


def loop_meta_loss(model, steps, lr, first_order, loss_fn=F.cross_entropy):
    """Per task: autograd.grad inner steps (create_graph for second order)."""
    bn = _bn_batch_stats(model)

    def run(xs, ys, xq, yq):
        meta = dict(model.named_parameters())
        total = 0.0
        for t in range(xs.shape[0]):
            p = meta
            for _ in range(steps):
                loss = loss_fn(functional_call(model, {**p, **bn}, (xs[t],)), ys[t])
                g = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
                p = {n: v - lr * gi for (n, v), gi in zip(p.items(), g)}
            total = total + loss_fn(functional_call(model, {**p, **bn}, (xq[t],)), yq[t])
        return total / xs.shape[0]
    return run


def torchfunc_meta_loss(model, steps, lr, first_order, loss_fn=F.cross_entropy):
    """vmap over tasks of (torch.func.grad inner steps, then the query loss)."""
    bn = _bn_batch_stats(model)

    def task_loss(p, x, y):
        return loss_fn(functional_call(model, {**p, **bn}, (x,)), y)

    def task_meta_loss(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = grad(task_loss)(p, xs, ys)
            p = {n: v - lr * (g[n].detach() if first_order else g[n]) for n, v in p.items()}
        return task_loss(p, xq, yq)

    def run(xs, ys, xq, yq):
        meta = dict(model.named_parameters())
        return vmap(task_meta_loss, in_dims=(None, 0, 0, 0, 0))(meta, xs, ys, xq, yq).mean()
    return run


MAML_IMPLS = {"pymeta": "pymeta", "torch_func": "torch.func vmap(grad)", "loop": "per-task loop"}


def build_maml(impl: str, cfg: dict, first_order: bool, device: str = "cpu"):
    """(module, run, data) for one implementation ("pymeta", "torch_func", "loop"):
    ``run(*data)`` is the meta-loss; module's parameters get the meta-gradients."""
    if impl not in MAML_IMPLS:
        raise ValueError(f"build_maml: impl must be one of {list(MAML_IMPLS)}, not {impl!r}")
    _counts("pymeta.workloads.build_maml", **{"cfg['inner_steps']": cfg.get("inner_steps")})
    model, data = make_maml_inputs(cfg, device)
    steps, lr, loss_fn = cfg["inner_steps"], cfg["inner_lr"], _maml_loss_fn(cfg)
    if impl == "pymeta":
        maml = pymeta.MAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order)
        return maml, pymeta_meta_loss(maml, loss_fn), data
    fn = loop_meta_loss if impl == "loop" else torchfunc_meta_loss
    return model, fn(model, steps, lr, first_order, loss_fn), data


def meta_iteration(module, run, data):
    """One meta-iteration: zero the grads, the meta-loss, its backward."""
    for p in module.parameters():
        p.grad = None
    loss = run(*data)
    loss.backward()
    return loss


def maml_workload(device: str = "cpu", cfg: dict = CPU_CONV4, first_order: bool = False,
                  impls=tuple(MAML_IMPLS)) -> Workload:
    """One MAML meta-iteration (adapt, query loss, backward to the meta-parameters):
    pymeta.MAML vs a hand-written torch.func vmap(grad) vs a per-task Python loop."""
    impls = tuple(impls)
    if not impls or any(i not in MAML_IMPLS for i in impls):
        raise ValueError(f"maml_workload: impls must be one or more of {list(MAML_IMPLS)}, not {impls!r}")
    variants: dict[str, Callable[[], object]] = {}
    for impl in impls:
        module, run, data = build_maml(impl, cfg, first_order, device)
        variants[MAML_IMPLS[impl]] = (lambda m=module, r=run, d=data: meta_iteration(m, r, d))
    if cfg.get("model", "conv4") == "mlp":
        what = f"sinusoid MLP 1-40-40-1 x{cfg['tasks']} tasks, {cfg['shots']}-shot"
    else:
        what = f"conv4({cfg['hidden']}) x{cfg['tasks']} tasks, {cfg['n_way']}-way {cfg['shots']}-shot"
    order = "first-order" if first_order else "second-order"
    return Workload(name=f"MAML meta-iteration {what}, {cfg['inner_steps']} step(s), {order}",
                    description=f"{cfg['queries']} queries{' per class' if 'n_way' in cfg else ''}",
                    variants=variants, baseline=MAML_IMPLS["loop"])


# ---- what `pymeta bench` runs ------------------------------------------------------------------

def all_workloads(device: str, quick: bool = False) -> list[Workload]:
    """The workloads `pymeta bench` runs on `device`. --quick on a CPU: about a minute."""
    cpu = device == "cpu"
    tasks = 8 if (quick and cpu) else 32
    out = [
        inner_update_workload(device, tasks, shared=False, lr_mode="scalar", compile=not quick),
        inner_update_workload(device, tasks, shared=True, lr_mode="scalar"),
    ]
    if not quick:  # torch.compile only where it answers a question: compiles cost ~20 s each
        out += [
            inner_update_workload(device, tasks, shared=False, lr_mode="per_param", compile=False),
            inner_update_workload(device, tasks, shared=True, lr_mode="per_tensor", backward=True),
            inner_update_workload(device, tasks, shared=False, lr_mode="per_param", backward=True,
                                  compile=False),
        ]
    # The LSTM optimizer step: one size in --quick (with torch.compile), several otherwise.
    if quick:
        out += [lstm_optimizer_workload(device, n=10_000 if cpu else 100_000),
                lstm_optimizer_workload(device, n=10_000 if cpu else 100_000, backward=True, compile=False)]
    else:
        sizes = (10_000, 100_000) if cpu else (100_000, 1_000_000)
        for n in sizes:
            out.append(lstm_optimizer_workload(device, n=n, compile=n == sizes[-1]))
            out.append(lstm_optimizer_workload(device, n=n, backward=True, compile=n == sizes[-1]))
        for backward in (False, True):  # the state stored in bfloat16, at the larger size
            out.append(lstm_optimizer_workload(device, n=sizes[-1], backward=backward,
                                               compile=False, state_dtype=torch.bfloat16))
    # The MAML meta-iteration.
    conv4 = CPU_CONV4 if cpu else GPU_CONV4
    if quick:
        out += [maml_workload(device, {**conv4, "tasks": 4} if cpu else conv4),
                maml_workload(device, SINUSOID_MLP)]
    else:
        out += [maml_workload(device, conv4), maml_workload(device, conv4, first_order=True),
                maml_workload(device, {**conv4, "tasks": conv4["tasks"] * 4}),
                maml_workload(device, SINUSOID_MLP), maml_workload(device, SINUSOID_MLP, first_order=True)]
    return out
