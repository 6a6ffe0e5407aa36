"""Reproduces docs/RESULTS.md's learned-optimizer results (Andrychowicz et al. 2016) on CPU.

    python scripts/reproduce_l2l.py all          # everything below, in order (~25 min on 2 busy cores)
    python scripts/reproduce_l2l.py pretrain     # meta-train on quadratics -> pymeta/data/ (the shipped net)
    python scripts/reproduce_l2l.py quadratic    # 100 unseen quadratics: LSTM vs tuned Adam/RMSprop/SGD/NAG
    python scripts/reproduce_l2l.py digits       # meta-train on the digits MLP, then base/200 steps/40 units/ReLU
    python scripts/reproduce_l2l.py timing       # meta-iterations per second, native vs reference

Numbers go to docs/l2l_results.json (merged per stage), plots to docs/l2l_*.png; the script
prints a markdown table per stage. Every run is seeded; rerunning gives the same numbers up
to float rounding differences between thread counts and CPUs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pymeta  # noqa: E402
from pymeta.lstm_optimizer import PRETRAINED_FILE, LSTMOptimizerNet  # noqa: E402
from pymeta.meta_train import meta_train, run_learned, run_torch_optimizer  # noqa: E402
from pymeta.tasks import DigitsMLPFamily, QuadraticFamily, derive_seed  # noqa: E402

DOCS = os.path.join(ROOT, "docs")
RESULTS_JSON = os.path.join(DOCS, "l2l_results.json")
PRETRAINED_PATH = os.path.join(ROOT, "pymeta", "data", PRETRAINED_FILE)
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
TEST_SEED = 987_654_321  # unseen problems: training draws derive_seed(seed, iteration)

# The recipes (the paper: H = 20, two layers, unroll 20, horizon 100, Adam).
QUAD_TRAIN = dict(iterations=300, unroll=20, horizon=100, meta_lr=3e-3, meta_batch=16, seed=0)
DIGITS_TRAIN = dict(iterations=60, unroll=20, horizon=100, meta_lr=3e-3, meta_batch=2, seed=0)
DIGITS_EVAL_PROBLEMS = 32

BASELINES = {
    "Adam": lambda lr: (lambda p: torch.optim.Adam(p, lr=lr)),
    "RMSprop": lambda lr: (lambda p: torch.optim.RMSprop(p, lr=lr)),
    "SGD": lambda lr: (lambda p: torch.optim.SGD(p, lr=lr)),
    "NAG": lambda lr: (lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)),
}


def env() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.date.today().isoformat(), "torch": str(torch.__version__),
            "cpu": cpu, "threads": torch.get_num_threads(), "native": pymeta._backend.NATIVE,
            "python": platform.python_version()}


def merge_results(stage: str, data: dict) -> None:
    allres = {}
    if os.path.exists(RESULTS_JSON):
        with open(RESULTS_JSON) as f:
            allres = json.load(f)
    allres[stage] = {"env": env(), **data}
    with open(RESULTS_JSON, "w") as f:
        json.dump(allres, f, indent=1)


def final_metric(problem, curve: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-problem final loss: the last step's minibatch loss ("step"), or the full
    training split's loss at the final parameters ("train")."""
    if metric == "train":
        return problem.evaluate(problem.last_theta, "train")["loss"]
    return curve[-1]


def score(values: torch.Tensor) -> float:
    return float(values.mean()) if torch.isfinite(values).all() else math.inf


def compare(family, net, n_problems: int, steps: int, metric: str = "step") -> dict:
    """LSTM vs each baseline at its best lr (chosen on these same problems: the most
    favourable choice for the baselines)."""
    out = {"steps": steps, "problems": n_problems, "metric": metric, "baselines": {}}
    problem = family.sample(n_problems, TEST_SEED)
    curve = run_learned(net, problem, steps)
    out["LSTM"] = {"final": score(final_metric(problem, curve, metric)),
                   "curve": curve.mean(1).tolist()}
    if hasattr(problem, "evaluate"):
        ev = problem.evaluate(problem.last_theta, "test")
        out["LSTM"].update(test_loss=float(ev["loss"].mean()), test_acc=float(ev["acc"].mean()))
    for name, make in BASELINES.items():
        per_lr = {}
        best = None
        for lr in LRS:
            problem = family.sample(n_problems, TEST_SEED)
            curve = run_torch_optimizer(problem, steps, make(lr))
            s = score(final_metric(problem, curve, metric))
            per_lr[lr] = s
            if best is None or s < best[0]:
                best = (s, lr, curve.mean(1).tolist(), problem)
        entry = {"final": best[0], "lr": best[1], "per_lr": per_lr, "curve": best[2]}
        if hasattr(best[3], "evaluate") and math.isfinite(best[0]):
            ev = best[3].evaluate(best[3].last_theta, "test")
            entry.update(test_loss=float(ev["loss"].mean()), test_acc=float(ev["acc"].mean()))
        out["baselines"][name] = entry
    return out


def table(title: str, res: dict) -> str:
    rows = [f"**{title}** ({res['problems']} unseen problems, {res['steps']} steps; "
            f"final loss = {'full training split' if res['metric'] == 'train' else 'last step'}, "
            f"mean over problems)", "",
            "| optimizer | best lr | final loss |" + (" test acc |" if "test_acc" in res["LSTM"] else ""),
            "|---|---|---|" + ("---|" if "test_acc" in res["LSTM"] else "")]

    def acc(e):
        return f" {e['test_acc']:.3f} |" if "test_acc" in res["LSTM"] else ""
    rows.append(f"| LSTM (learned) | - | {res['LSTM']['final']:.4g} |{acc(res['LSTM'])}")
    for name, e in res["baselines"].items():
        a = acc(e) if "test_acc" in e else (" - |" if "test_acc" in res["LSTM"] else "")
        rows.append(f"| {name} | {e['lr']:g} | {e['final']:.4g} |{a}")
    return "\n".join(rows)


def plot(panels: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (title, res) in zip(axes[0], panels):
        ax.plot(res["LSTM"]["curve"], label="LSTM (learned)", color="k", lw=2)
        for name, e in res["baselines"].items():
            c = [v if math.isfinite(v) else float("nan") for v in e["curve"]]
            ax.plot(c, label=f"{name} (lr {e['lr']:g})", lw=1)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("mean loss")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- stages ----------------------------------------------------------------------------------

def _meta_train_fresh(args, family, base_cfg: dict, checkpoint: str, quick_iterations: int):
    """A fresh LSTMOptimizerNet(20) (init seed 0) meta-trained on family with base_cfg (--quick:
    quick_iterations iterations of horizon 20), resuming from args.work/checkpoint.
    Returns (net, history, seconds of this call, the config used)."""
    cfg = dict(base_cfg)
    if args.quick:
        cfg.update(iterations=quick_iterations, horizon=20)
    torch.manual_seed(0)
    net = LSTMOptimizerNet(20)
    t = time.perf_counter()
    hist = meta_train(net, family, checkpoint=os.path.join(args.work, checkpoint),
                      progress=not args.no_progress, **cfg)
    return net, hist, time.perf_counter() - t, cfg


def stage_pretrain(args) -> None:
    net, hist, secs, cfg = _meta_train_fresh(args, QuadraticFamily(10), QUAD_TRAIN, "quad_ck.pt", 3)
    info = {"trained_on": f"random 10-d quadratics ||W theta - y||^2 (QuadraticFamily(10)); "
                          f"meta_train({', '.join(f'{k}={v}' for k, v in cfg.items())}), "
                          f"init torch.manual_seed(0)",
            "command": "python scripts/reproduce_l2l.py pretrain",
            "torch": str(torch.__version__), "date": datetime.date.today().isoformat()}
    out = PRETRAINED_PATH if not args.quick else os.path.join(args.work, "quick_net.pt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    net.save(out, **info)
    merge_results("pretrain", {"config": cfg, "seconds_this_call": secs,
                               "meta_loss": hist["meta_loss"], "final_loss": hist["final_loss"]})
    print(f"wrote {out} ({os.path.getsize(out)} bytes); meta-training {secs:.0f} s this call")


def _quad_net(args) -> LSTMOptimizerNet:
    if args.quick:
        return LSTMOptimizerNet.load(os.path.join(args.work, "quick_net.pt"))
    return LSTMOptimizerNet.load(PRETRAINED_PATH)


def stage_quadratic(args) -> None:
    net = _quad_net(args)
    res = compare(QuadraticFamily(10), net, 100 if not args.quick else 10, 100)
    merge_results("quadratic", res)
    plot([("10-d quadratics (100 unseen), trained on quadratics", res)],
         os.path.join(DOCS, "l2l_quadratic.png"))
    print(table("Quadratics", res))


def stage_digits(args) -> None:
    net, hist, secs, cfg = _meta_train_fresh(args, DigitsMLPFamily(), DIGITS_TRAIN, "digits_ck.pt", 2)
    net.save(os.path.join(args.work, "lstm_optimizer_digits.pt"),
             trained_on=f"DigitsMLPFamily() (64-20 sigmoid-10, batch 128); meta_train({cfg})")
    n = DIGITS_EVAL_PROBLEMS if not args.quick else 4
    cases = [("base: 20 sigmoid, 100 steps", DigitsMLPFamily(), 100),
             ("200 steps", DigitsMLPFamily(), 200),
             ("40 hidden units", DigitsMLPFamily(hidden=40), 100),
             ("2 hidden layers", DigitsMLPFamily(layers=2), 100),
             ("ReLU", DigitsMLPFamily(activation="relu"), 100)]
    out = {"config": cfg, "seconds_this_call": secs, "meta_loss": hist["meta_loss"], "cases": {}}
    for title, fam, steps in cases:
        res = compare(fam, net, n, steps if not args.quick else 10, metric="train")
        out["cases"][title] = res
        print(table(f"Digits MLP, {title}", res), "\n")
    merge_results("digits", out)
    plot(list(out["cases"].items()), os.path.join(DOCS, "l2l_digits.png"))


def stage_timing(args) -> None:
    """Meta-iterations per second of the training recipes, native vs reference (CPU), at 1
    and 2 threads (and --threads): the median of 3 iterations after a warm-up one."""
    res = {}
    reps = 3 if not args.quick else 1
    threads = sorted({1, 2, args.threads})
    recipes = (("quadratic", QuadraticFamily(10), QUAD_TRAIN), ("digits", DigitsMLPFamily(), DIGITS_TRAIN))
    for name, fam, cfg in recipes:
        kw = {k: v for k, v in cfg.items() if k != "iterations"}
        if args.quick:
            kw["horizon"] = 20
        for nt in threads:
            torch.set_num_threads(nt)
            r = res.setdefault(f"{name}, {nt} thread{'s' if nt > 1 else ''}", {
                "meta_batch": kw["meta_batch"], "horizon": kw["horizon"], "unroll": kw["unroll"]})
            for backend in ("native", "reference"):
                if backend == "native" and not pymeta._backend.NATIVE:
                    continue
                with pymeta.use_backend(backend):
                    torch.manual_seed(0)
                    hist = meta_train(LSTMOptimizerNet(20), fam, reps + 1, progress=False, **kw)
                secs = sorted(hist["seconds"][1:])[len(hist["seconds"][1:]) // 2]
                r[backend] = {"it_per_s": 1.0 / secs, "seconds_per_it": secs}
            if "native" in r:
                r["speedup"] = r["native"]["it_per_s"] / r["reference"]["it_per_s"]
    torch.set_num_threads(args.threads)
    try:
        res["loadavg_after"] = os.getloadavg()[0]
    except OSError:
        pass
    merge_results("timing", res)
    print("| recipe | native it/s | reference it/s | native / reference |\n|---|---|---|---|")
    for name, r in res.items():
        if not isinstance(r, dict):
            continue
        print(f"| {name} (B={r['meta_batch']}, horizon {r['horizon']}, unroll {r['unroll']}) | "
              f"{r.get('native', {}).get('it_per_s', float('nan')):.3g} | "
              f"{r['reference']['it_per_s']:.3g} | {r.get('speedup', float('nan')):.2f}x |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["all", "pretrain", "quadratic", "digits", "timing"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the published numbers used 1)")
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "l2l"),
                    help="checkpoints and other intermediate files (default out/l2l)")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run (numbers meaningless)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    global RESULTS_JSON, DOCS
    if args.quick:  # keep the real results untouched
        DOCS = args.work
        RESULTS_JSON = os.path.join(args.work, "l2l_results.json")
    stages = ["pretrain", "quadratic", "digits", "timing"] if args.stage == "all" else [args.stage]
    for s in stages:
        print(f"== {s} ==", flush=True)
        globals()[f"stage_{s}"](args)


if __name__ == "__main__":
    main()
