"""`pymeta demo`: three small meta-learning experiments, end to end, on real tasks.

1. Sinusoid regression (5-shot and 10-shot): MAML, first-order MAML and Meta-SGD
   (``pymeta.MAML``) on the task distribution of MAML / Meta-SGD, against the published
   5-shot figures of Meta-SGD's Table 1.
2. The learned LSTM optimizer vs Adam, RMSprop, SGD and NAG on unseen quadratics
   (``demo_learned_optimizer``; skipped where the learned optimizer isn't in the build).
3. 5-way 1-shot and 5-shot classification of scikit-learn's handwritten digits with MAML,
   on digit classes held out from meta-training.

Each part prints a results table; plots (PNG) and ``results.json`` go to ``--out``.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pymeta
from pymeta import _checks
from pymeta.models import MLP
from pymeta.tasks import FewShotSampler, Sinusoid, digits_dataset

__all__ = ["run_demo", "demo_sinusoid", "demo_learned_optimizer", "demo_digits", "format_table"]

# Meta-SGD (Li et al. 2017), Table 1, sinusoid regression, 5-shot: MSE with 95% interval.
PUBLISHED_5SHOT = {"MAML": (1.13, 0.18), "Meta-SGD": (0.90, 0.16)}
FULL_PROTOCOL_ITERATIONS = 60_000

# The parts seed their generators with `seed` and with seed + each of these, so that the
# held-out tasks never overlap the training ones.
SEED_OFFSETS = {"sinusoid_test": 1_000_003, "quadratics_val": 2_000_003, "quadratics_test": 3_000_017,
                "digits_test": 7_000_001}
MAX_SEED = 2**64 - 1 - max(SEED_OFFSETS.values())  # torch's generators take seeds below 2**64

SINUSOID_METHODS = {  # name -> pymeta.MAML options
    "MAML": dict(lr_mode="scalar", first_order=False),
    "FOMAML": dict(lr_mode="scalar", first_order=True),
    "Meta-SGD": dict(lr_mode="per_param", first_order=False),
}


# ---- helpers ---------------------------------------------------------------------------------

def _progress(iterable, progress: bool, **kwargs):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _mean_ci(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal interval."""
    v = values.double().flatten()
    return v.mean().item(), 1.96 * v.std(unbiased=True).item() / math.sqrt(max(v.numel(), 1))


def _smooth(values: Sequence[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt, fig, path: str) -> str:
    """Lays out, writes (PNG, 110 dpi) and closes fig; returns path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def seed_problem(seed: int) -> Optional[str]:
    """Why the int `seed` can't seed the demo (every part must be able to add its offset), or None."""
    if not 0 <= seed <= MAX_SEED:
        return (f"must be an int in [0, {MAX_SEED}] (the demo also seeds with seed + up to "
                f"{max(SEED_OFFSETS.values()):_}), got {seed}")
    return None


def out_dir_problem(out: str) -> Optional[str]:
    """Why `out` can't be the demo's output folder (an existing folder, or one that can be made
    with its missing parents), or None. Touches nothing."""
    if not out or "\0" in out:
        return f"{out!r} is not a folder name"
    path = os.path.abspath(out)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            return f"{out!r} exists and is not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"folder {out!r} is not writable"
        return None
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):  # the nearest existing ancestor
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{out!r} can't be created: {parent!r} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{out!r} can't be created: folder {parent!r} is not writable"
    return None


def _check_seed(where: str, seed) -> int:
    seed = _checks.integer(where, "seed", seed)
    problem = seed_problem(seed)
    if problem:
        raise ValueError(f"{where}: seed {problem}")
    return seed


# ---- part 1: sinusoid regression -------------------------------------------------------------

def demo_sinusoid(device: str = "cpu", quick: bool = False, seed: int = 0, out_dir: Optional[str] = None,
                  iterations: Optional[int] = None, progress: bool = True,
                  shots: Sequence[int] = (5, 10), eval_tasks: int = 600) -> dict:
    """MAML, FOMAML and Meta-SGD on sinusoids: meta-train each, then adapt to ``eval_tasks``
    held-out tasks (one inner step on K points) and measure the MSE on 100 query points."""
    seed = _check_seed("pymeta.demo.demo_sinusoid", seed)
    iterations = iterations or (300 if quick else 2500)
    meta_batch, inner_lr, meta_lr, queries_eval = 25, 0.01, 1e-3, 100
    config = dict(iterations=iterations, meta_batch=meta_batch, inner_lr=inner_lr, inner_steps=1,
                  meta_lr=meta_lr, net="MLP 1-40-40-1 ReLU", eval_tasks=eval_tasks,
                  eval_queries_per_task=queries_eval, amplitude=[0.1, 5.0], phase=[0.0, math.pi],
                  x_range=[-5.0, 5.0], full_protocol_iterations=FULL_PROTOCOL_ITERATIONS)
    results: dict = {"config": config}
    curves: Dict[str, List[float]] = {}
    examples: dict = {}
    for K in shots:
        # One set of held-out tasks per K, the same for every method.
        test = Sinusoid(seed=seed + SEED_OFFSETS["sinusoid_test"]).sample(eval_tasks, K, queries_eval,
                                                                          device=device)
        rows, res_k = [], {}
        for name, opts in SINUSOID_METHODS.items():
            torch.manual_seed(seed)
            maml = pymeta.MAML(MLP(1, (40, 40), 1), inner_lr=inner_lr, **opts).to(device)
            opt = torch.optim.Adam(maml.parameters(), lr=meta_lr)
            tasks = Sinusoid(seed=seed)
            losses = []
            t0 = time.perf_counter()
            for _ in _progress(range(iterations), progress, desc=f"sinusoid {K}-shot {name}"):
                b = tasks.sample(meta_batch, K, K, device=device)
                loss = maml.meta_loss(b.x_support, b.y_support, b.x_query, b.y_query, F.mse_loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            train_s = time.perf_counter() - t0
            with torch.no_grad():
                pre = ((maml.module(test.x_query) - test.y_query) ** 2).mean(dim=(1, 2))
                adapted = maml.adapt(test.x_support, test.y_support, F.mse_loss)
                post = ((maml.predict(adapted, test.x_query) - test.y_query) ** 2).mean(dim=(1, 2))
            pre_m, pre_ci = _mean_ci(pre)
            post_m, post_ci = _mean_ci(post)
            entry = dict(pre_mse=pre_m, pre_ci95=pre_ci, post_mse=post_m, post_ci95=post_ci,
                         train_seconds=train_s, final_train_loss=sum(losses[-50:]) / len(losses[-50:]))
            pub = PUBLISHED_5SHOT.get(name) if K == 5 else None
            if pub:
                entry.update(published_mse=pub[0], published_ci95=pub[1])
            res_k[name] = entry
            curves[f"{K}-shot {name}"] = losses
            rows.append([name, f"{pre_m:.2f} ± {pre_ci:.2f}", f"{post_m:.2f} ± {post_ci:.2f}",
                         f"{pub[0]:.2f} ± {pub[1]:.2f}" if pub else "-", f"{train_s:.0f} s"])
            if K == shots[0] and out_dir:
                with torch.no_grad():
                    xs = torch.linspace(-5, 5, 200, device=device).view(1, 200, 1)
                    one = {k: v[:1] for k, v in adapted.items()}
                    examples[name] = dict(pre=maml.module(xs[0]).flatten().cpu(),
                                          post=maml.predict(one, xs).flatten().cpu())
                    examples["task"] = dict(x=test.x_support[0].flatten().cpu(), y=test.y_support[0].flatten().cpu(),
                                            amplitude=test.amplitude[0].cpu(), phase=test.phase[0].cpu())
        results[f"{K}-shot"] = res_k
        print(f"\nSinusoid regression, {K}-shot, one inner step: MSE on {eval_tasks} held-out tasks "
              f"(mean ± 95% interval), after {iterations} meta-iterations of {meta_batch} tasks")
        print(format_table(["method", "before adaptation", "after adaptation",
                            "published (Meta-SGD Table 1)" if K == 5 else "published", "meta-train"], rows))
    print(f"Note: this run meta-trains {iterations} iterations per method; the papers train "
          f"{FULL_PROTOCOL_ITERATIONS // 1000}k-70k. The errors here are measured on {queries_eval} query "
          f"points per task, which may differ in detail from the papers' evaluation: compare the "
          f"columns loosely. Full protocol (roughly an hour on one CPU core): "
          f"pymeta demo --iterations {FULL_PROTOCOL_ITERATIONS}")
    if out_dir:
        path = os.path.join(out_dir, "sinusoid.png")
        _plot_sinusoid(path, curves, examples, shots[0])
        results["plot"] = path
    return results


def _plot_sinusoid(path: str, curves: Dict[str, List[float]], examples: dict, K: int) -> None:
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, losses in curves.items():
        a.plot(_smooth(losses, max(1, len(losses) // 30)), label=name)
    a.set(xlabel="meta-iteration", ylabel="query MSE after adaptation (moving average)",
          yscale="log", title="Meta-training")
    a.legend(fontsize=8)
    xs = torch.linspace(-5, 5, 200)
    task = examples["task"]
    b.plot(xs, Sinusoid.function(xs, task["amplitude"], task["phase"]), "k-", lw=2, label="true function")
    b.plot(task["x"], task["y"], "k^", ms=9, label=f"{K} support points")
    if "MAML" in examples:
        b.plot(xs, examples["MAML"]["pre"], ":", color="tab:blue", label="MAML before adaptation")
    for name, color in (("MAML", "tab:blue"), ("FOMAML", "tab:orange"), ("Meta-SGD", "tab:green")):
        if name in examples:
            b.plot(xs, examples[name]["post"], "--", color=color, label=f"{name}, one step")
    b.set(xlabel="x", ylabel="y", title=f"A held-out task, {K}-shot")
    b.legend(fontsize=8)
    _save_figure(plt, fig, path)


# ---- part 2: the learned LSTM optimizer (isolated: needs pymeta.LSTMOptimizer) --------------

LEARNED_OPTIMIZER_SKIPPED = "skipped: learned optimizer not available in this build"


def _quadratic_problems(n: int, dim: int, seed: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """n unseen problems of ``pymeta.tasks.QuadraticFamily`` (f(θ) = ||Wθ - y||², W, y ~ N(0, 1),
    the quadratics of Andrychowicz et al. 2016, from the distribution the net was trained on),
    drawn from a seed that training never uses. Returns W [n, dim, dim], y [n, dim], θ0 [n, dim]."""
    from pymeta.tasks import QuadraticFamily

    prob = QuadraticFamily(dim=dim).sample(n, seed=seed, device=device)
    return prob.W, prob.y, prob.theta0.view(n, dim)


def _optimize(make_opt: Callable, W: Tensor, y: Tensor, theta0: Tensor, steps: int) -> Tensor:
    """Runs an optimizer on every problem at once (one [n, dim] parameter; the problems are
    independent and every optimizer here acts per coordinate). Returns the mean loss after
    0..steps steps, shape [steps + 1]."""
    theta = theta0.clone().requires_grad_()
    opt = make_opt([theta])
    curve = []
    for _ in range(steps):
        losses = ((W @ theta.unsqueeze(-1)).squeeze(-1) - y).pow(2).sum(-1)
        curve.append(losses.detach().mean())
        opt.zero_grad()
        losses.sum().backward()
        opt.step()
    with torch.no_grad():
        curve.append(((W @ theta.unsqueeze(-1)).squeeze(-1) - y).pow(2).sum(-1).mean())
    return torch.stack(curve).cpu()


BASELINE_OPTIMIZERS = {
    "Adam": lambda lr: (lambda ps: torch.optim.Adam(ps, lr=lr)),
    "RMSprop": lambda lr: (lambda ps: torch.optim.RMSprop(ps, lr=lr)),
    "SGD": lambda lr: (lambda ps: torch.optim.SGD(ps, lr=lr)),
    "NAG": lambda lr: (lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True)),
}
LR_GRID = [10 ** (e / 2) for e in range(-8, 2)]  # 1e-4 .. ~3.2


def demo_learned_optimizer(device: str = "cpu", quick: bool = False, seed: int = 0,
                           out_dir: Optional[str] = None, progress: bool = True,
                           iterations: Optional[int] = None, problems: int = 100):
    """Compares the learned LSTM optimizer on unseen quadratics with Adam, RMSprop, SGD and
    NAG, each at the learning rate of LR_GRID that is best on a separate set of quadratics.
    The net is the shipped pretrained one, or, with ``iterations``, one meta-trained here on
    ``pymeta.tasks.QuadraticFamily`` with ``pymeta.meta_train``. Returns the results, or
    ``"skipped"`` where the learned optimizer is not in this build."""
    seed = _check_seed("pymeta.demo.demo_learned_optimizer", seed)
    try:
        from pymeta import LSTMOptimizer, LSTMOptimizerNet, meta_train
        from pymeta.tasks import QuadraticFamily
    except ImportError:
        print(f"\nLearned LSTM optimizer vs hand-designed optimizers on quadratics\n{LEARNED_OPTIMIZER_SKIPPED}")
        return "skipped"
    dim, horizon, unroll = 10, 100, 20
    t0 = time.perf_counter()
    history = None
    if iterations:  # meta-train a fresh net (the paper's recipe) instead of the shipped one
        torch.manual_seed(seed)
        net = LSTMOptimizerNet(hidden_size=20).to(device)
        history = meta_train(net, QuadraticFamily(dim=dim), iterations, unroll=unroll,
                             horizon=horizon, meta_lr=3e-3, meta_batch=16, seed=seed,
                             progress=progress, device=device)
        source = f"meta-trained here for {iterations} iterations"
    else:
        net = LSTMOptimizerNet.pretrained().to(device)
        source = ("the shipped pretrained net (meta-trained on 10-d quadratics by "
                  "`python scripts/reproduce_l2l.py pretrain`)")
    train_s = time.perf_counter() - t0
    val = _quadratic_problems(problems, dim, seed + SEED_OFFSETS["quadratics_val"], device)
    test = _quadratic_problems(problems, dim, seed + SEED_OFFSETS["quadratics_test"], device)
    curves = {"LSTM (learned)": _optimize(lambda ps: LSTMOptimizer(ps, net=net), *test, horizon)}
    best_lr = {}
    for name, make in _progress(BASELINE_OPTIMIZERS.items(), progress, desc="learning-rate search"):
        finals = {lr: _optimize(make(lr), *val, horizon)[-1].item() for lr in LR_GRID}
        lr = min(LR_GRID, key=lambda r: finals[r] if math.isfinite(finals[r]) else math.inf)
        best_lr[name] = lr
        curves[name] = _optimize(make(lr), *test, horizon)
    results = {"config": dict(dim=dim, horizon=horizon, unroll=unroll, iterations=iterations,
                              net=source, test_problems=problems, lr_grid=LR_GRID,
                              train_seconds=train_s),
               "meta_train_history": ({k: v for k, v in history.items() if k in ("meta_loss", "final_loss")}
                                      if isinstance(history, dict) else None)}
    rows = []
    for name, c in curves.items():
        results[name] = dict(initial_loss=c[0].item(), final_loss=c[-1].item(), curve=c.tolist(),
                             **({"lr": best_lr[name]} if name in best_lr else {}))
        rows.append([name, f"{best_lr[name]:.2g}" if name in best_lr else "learned",
                     f"{c[0].item():.3g}", f"{c[-1].item():.3g}"])
    print(f"\nLearned LSTM optimizer vs hand-designed optimizers: mean loss over {problems} unseen "
          f"10-d quadratics ||Wθ - y||², {horizon} steps; the LSTM is {source}; each baseline "
          f"at its best learning rate on separate quadratics")
    print(format_table(["optimizer", "learning rate", "initial loss", f"loss after {horizon} steps"], rows))
    if out_dir:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, c in curves.items():
            ax.plot(c, lw=2.5 if name.startswith("LSTM") else 1.5,
                    label=name + (f" (lr {best_lr[name]:.2g})" if name in best_lr else ""))
        ax.set(xlabel="step", ylabel="mean loss", yscale="log", title="Unseen quadratics")
        ax.legend()
        results["plot"] = _save_figure(plt, fig, os.path.join(out_dir, "learned_optimizer.png"))
    return results


# ---- part 3: few-shot classification of digits -----------------------------------------------

DIGITS_TRAIN_CLASSES = [0, 1, 2, 3, 4]   # x 4 rotations = 20 meta-training classes
DIGITS_TEST_CLASSES = [5, 6, 7, 8, 9]    # held out, upright


class DigitsConvNet(nn.Module):
    """A small convnet for 8x8 digits: 2 x [3x3 conv (padding 1), ReLU, 2x2 max-pool], then a
    linear ``head``: [B, 1, 8, 8] -> [B, n_way]. (No BatchNorm: with 1-shot tasks of 5 images
    the per-task batch statistics are too noisy.)"""

    def __init__(self, n_way: int = 5, channels: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(channels * 4, n_way)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).float().mean(-1)  # per task


def _nearest_neighbour(e) -> Tensor:
    """Per-task accuracy of 1-nearest-neighbour on raw pixels (nearest support image)."""
    d = torch.cdist(e.x_query.flatten(2), e.x_support.flatten(2))
    return _accuracy(F.one_hot(e.y_support.gather(1, d.argmin(-1)), e.y_support.max().item() + 1), e.y_query)


def demo_digits(device: str = "cpu", quick: bool = False, seed: int = 0, out_dir: Optional[str] = None,
                progress: bool = True, iterations: Optional[int] = None, eval_tasks: Optional[int] = None,
                shots: Sequence[int] = (1, 5)) -> dict:
    """5-way K-shot MAML on scikit-learn's digits: meta-train on digits 0-4, each rotated by
    0/90/180/270 degrees into a class of its own (20 classes, the Omniglot convention), test
    on 5-way tasks of the held-out digits 5-9. With 5 held-out digits every test task has the
    same five classes, with a random assignment of labels and random support and query
    examples, so the learner must adapt from the K shots to tell which label is which digit."""
    seed = _check_seed("pymeta.demo.demo_digits", seed)
    x, y = digits_dataset()
    iterations = iterations or (50 if quick else 400)
    eval_tasks = eval_tasks or (100 if quick else 600)
    n_way, queries_train, queries_eval, meta_batch, inner_lr, inner_steps, meta_lr = 5, 5, 15, 16, 0.4, 2, 1e-3
    config = dict(iterations=iterations, n_way=n_way, queries_per_class_train=queries_train,
                  queries_per_class_eval=queries_eval, meta_batch=meta_batch, inner_lr=inner_lr,
                  inner_steps=inner_steps, meta_lr=meta_lr,
                  net="2 x [conv 3x3 32, ReLU, max-pool 2] + linear head, on 8x8 pixels",
                  train_classes=f"digits {DIGITS_TRAIN_CLASSES} x rotations 0/90/180/270 (20 classes)",
                  test_classes=f"digits {DIGITS_TEST_CLASSES}, upright (held out)", eval_tasks=eval_tasks)
    results: dict = {"config": config}
    rows, curves = [], {}
    for K in shots:
        train = FewShotSampler(x, y, n_way, K, queries_train, classes=DIGITS_TRAIN_CLASSES, rotations=True,
                               seed=seed, device=device)
        test = FewShotSampler(x, y, n_way, K, queries_eval, classes=DIGITS_TEST_CLASSES,
                              seed=seed + SEED_OFFSETS["digits_test"], device=device)
        torch.manual_seed(seed)
        maml = pymeta.MAML(DigitsConvNet(n_way), inner_lr=inner_lr, inner_steps=inner_steps).to(device)
        torch.manual_seed(seed)
        untrained = pymeta.MAML(DigitsConvNet(n_way), inner_lr=inner_lr, inner_steps=inner_steps).to(device)
        opt = torch.optim.Adam(maml.parameters(), lr=meta_lr)
        accs = []
        t0 = time.perf_counter()
        for _ in _progress(range(iterations), progress, desc=f"digits 5-way {K}-shot MAML"):
            e = train.sample(meta_batch)
            adapted = maml.adapt(e.x_support, e.y_support, F.cross_entropy)
            logits = maml.predict(adapted, e.x_query)
            loss = F.cross_entropy(logits.flatten(0, 1), e.y_query.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            accs.append(_accuracy(logits.detach(), e.y_query).mean().item())
        train_s = time.perf_counter() - t0
        curves[f"{K}-shot"] = accs
        e = test.sample(eval_tasks)
        entry = {}
        with torch.no_grad():
            for label, m in (("MAML", maml), ("no meta-training", untrained)):
                pre = _accuracy(m.module(e.x_query.flatten(0, 1)).view(eval_tasks, -1, n_way), e.y_query)
                post = _accuracy(m.predict(m.adapt(e.x_support, e.y_support, F.cross_entropy), e.x_query),
                                 e.y_query)
                (pre_m, pre_ci), (post_m, post_ci) = _mean_ci(pre), _mean_ci(post)
                entry[label] = dict(pre_accuracy=pre_m, pre_ci95=pre_ci, post_accuracy=post_m, post_ci95=post_ci)
                rows.append([f"5-way {K}-shot", label, f"{100 * pre_m:.1f} ± {100 * pre_ci:.1f}",
                             f"{100 * post_m:.1f} ± {100 * post_ci:.1f}",
                             f"{train_s:.0f} s" if label == "MAML" else "-"])
            nn_m, nn_ci = _mean_ci(_nearest_neighbour(e))
        entry["1-NN pixels"] = dict(accuracy=nn_m, ci95=nn_ci)
        rows.append([f"5-way {K}-shot", "1-NN on pixels", "-", f"{100 * nn_m:.1f} ± {100 * nn_ci:.1f}", "-"])
        entry["train_seconds"] = train_s
        results[f"{K}-shot"] = entry
    print(f"\nFew-shot classification of scikit-learn's digits: accuracy (%) on {eval_tasks} 5-way test tasks "
          f"of the held-out digits 5-9 (mean ± 95% interval; chance 20%), {inner_steps} inner steps, "
          f"after {iterations} meta-iterations of {meta_batch} tasks on digits 0-4 x 4 rotations")
    print(format_table(["task", "learner", "before adaptation", "after adaptation", "meta-train"], rows))
    print("'no meta-training': the same convnet from its random init, adapted by the same inner steps; "
          "'1-NN on pixels': nearest support image.")
    if out_dir:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, a in curves.items():
            ax.plot(_smooth([100 * v for v in a], max(1, len(a) // 30)), label=f"5-way {name}")
        ax.set(xlabel="meta-iteration", ylabel="query accuracy after adaptation, % (moving average)",
               title="MAML on digits 0-4 x 4 rotations (meta-training tasks)")
        ax.legend()
        results["plot"] = _save_figure(plt, fig, os.path.join(out_dir, "digits.png"))
    return results


# ---- the whole demo --------------------------------------------------------------------------

def run_demo(device: str = "cpu", out: str = "pymeta-demo", quick: bool = False, seed: int = 0,
             iterations: Optional[int] = None, progress: bool = True, threads_cpu: Optional[int] = 1) -> dict:
    """Runs the three parts; writes the plots and results.json under ``out`` (created with its
    parents; results.json is rewritten after each part); returns the results. ``seed``: an
    int in [0, MAX_SEED]. ``iterations`` sets the sinusoid meta-iterations (default 2500; 300
    with quick). On the CPU the demo runs with ``threads_cpu`` threads (None or 0: torch's setting).
    Every argument is checked before anything runs or is created."""
    device, out, seed, iterations, threads_cpu = _check_run_demo_args(device, out, quick, seed, iterations,
                                                                      progress, threads_cpu)
    quick, progress = bool(quick), bool(progress)  # (NumPy bools: results.json takes bool)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    if device == "cpu" and threads_cpu:
        # The demo's ops are tiny (microseconds): extra threads only add synchronisation, and
        # on a loaded machine a waiting thread stalls every op (25x slower seen on 2 busy cores).
        torch.set_num_threads(threads_cpu)
    t_start = time.perf_counter()
    info = pymeta.info()
    print(f"pymeta {info['pymeta']} demo, torch {info['torch']}, device {device}"
          f"{' (quick)' if quick else ''}, seed {seed}, native kernels: {info['native']}, "
          f"{torch.get_num_threads()} CPU thread(s)")
    results: dict = {"pymeta": info["pymeta"], "torch": info["torch"], "device": device, "quick": quick,
                     "seed": seed, "native": info["native"]}
    timings = {}
    try:
        for key, title, fn, kw in (
                ("sinusoid", "Part 1/3: sinusoid regression (MAML, FOMAML, Meta-SGD)", demo_sinusoid,
                 dict(iterations=iterations)),
                ("learned_optimizer", "Part 2/3: the learned LSTM optimizer on quadratics",
                 demo_learned_optimizer, {}),
                ("digits", "Part 3/3: 5-way few-shot classification of digits (MAML)", demo_digits, {})):
            print(f"\n=== {title} ===", flush=True)
            t0 = time.perf_counter()
            results[key] = fn(device=device, quick=quick, seed=seed, out_dir=out, progress=progress, **kw)
            timings[key] = time.perf_counter() - t0
            results["seconds"] = dict(timings)
            _write_json(path, results)  # a failure in a later part keeps this one's results
    finally:
        torch.set_num_threads(threads)
    results["seconds"] = {**timings, "total": time.perf_counter() - t_start}
    _write_json(path, results)
    files = [r["plot"] for r in results.values() if isinstance(r, dict) and "plot" in r] + [path]
    print(f"\nDone in {results['seconds']['total']:.0f} s. Wrote:")
    for p in files:
        print(f"  {p}")
    return results


def _write_json(path: str, results: dict) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def _check_run_demo_args(device, out, quick, seed, iterations, progress, threads_cpu) -> tuple:
    """run_demo's arguments checked (TypeError / ValueError naming the bad one); returns
    device, out, seed, iterations and threads_cpu as Python's str and int (results.json
    records them)."""
    where = "pymeta.demo.run_demo"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{where}: device must be a str or torch.device, not {type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{where}: device must be 'cpu' or 'cuda', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where}: device {device!r} but no GPU is available")
    out = os.fspath(out) if isinstance(out, os.PathLike) else out
    if not isinstance(out, str):
        raise TypeError(f"{where}: out must be a folder path (a str or os.PathLike), not {type(out).__name__} "
                        f"{out!r}")
    problem = out_dir_problem(out)
    if problem:
        raise ValueError(f"{where}: out {problem}")
    for name, flag in (("quick", quick), ("progress", progress)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{where}: {name} must be a bool, not {type(flag).__name__} {flag!r}")
    seed = _check_seed(where, seed)
    if iterations is not None:
        iterations = _checks.integer(where, "iterations", iterations, min=1)
    if threads_cpu is not None:  # (0, like None, keeps torch's setting, as it always did)
        threads_cpu = _checks.integer(where, "threads_cpu", threads_cpu, min=0) or None
    return str(dev), out, seed, iterations, threads_cpu
