"""The `pymeta` command: info, bench --quick and demo --quick, run as a user runs them
(`python -m pymeta ...` in a fresh process, from the checkout)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pymeta
from pymeta import cli, demo

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pymeta", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"pymeta {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_info():
    out = _run("info")
    assert "pymeta: " + pymeta.__version__ in out and "native:" in out


@pytest.mark.slow
def test_bench_quick(tmp_path):
    out = _run("bench", "--quick", "--device", "cpu", "--json", str(tmp_path / "bench.json"))
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    names = {r["workload"] for r in rows}
    assert any(n.startswith("inner_update") for n in names)
    assert any(n.startswith("lstm_optimizer_step") for n in names)
    assert any(n.startswith("MAML meta-iteration") for n in names)
    assert all(r["ms"] > 0 and math.isfinite(r["ms"]) for r in rows)
    variants = {r["variant"] for r in rows}
    assert {"reference", "torch.func vmap(grad)", "per-task loop"} <= variants
    assert "x pymeta" in out


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out_dir = tmp_path / "demo"
    out = _run("demo", "--quick", "--out", str(out_dir), "--no-progress", "--seed", "1")
    r = json.loads((out_dir / "results.json").read_text())
    assert r["quick"] is True and r["seed"] == 1
    # Part 1: every method's post-adaptation MSE is finite; MAML's beats no adaptation.
    for k in ("5-shot", "10-shot"):
        for method in ("MAML", "FOMAML", "Meta-SGD"):
            e = r["sinusoid"][k][method]
            assert math.isfinite(e["post_mse"]) and e["post_ci95"] > 0
        maml = r["sinusoid"][k]["MAML"]
        assert maml["post_mse"] < maml["pre_mse"], maml
    assert r["sinusoid"]["5-shot"]["MAML"]["published_mse"] == 1.13
    assert r["sinusoid"]["5-shot"]["Meta-SGD"]["published_mse"] == 0.90
    # Part 2: the learned optimizer (shipped net) on unseen quadratics.
    lo = r["learned_optimizer"]
    assert lo != "skipped"
    learned = lo["LSTM (learned)"]
    assert learned["final_loss"] < learned["initial_loss"], learned
    for name in ("Adam", "RMSprop", "SGD", "NAG"):
        assert lo[name]["lr"] in demo.LR_GRID and lo[name]["final_loss"] < lo[name]["initial_loss"]
    # Part 3: accuracies are fractions; MAML's adapted accuracy beats chance (20%).
    for k in ("1-shot", "5-shot"):
        e = r["digits"][k]
        for learner in ("MAML", "no meta-training"):
            assert 0 <= e[learner]["pre_accuracy"] <= 1 and 0 <= e[learner]["post_accuracy"] <= 1
        assert e["MAML"]["post_accuracy"] > 0.3, e
    for name in ("sinusoid.png", "learned_optimizer.png", "digits.png", "results.json"):
        assert (out_dir / name).stat().st_size > 0
        assert str(out_dir / name) in out  # named at the end
    assert "Sinusoid regression, 5-shot" in out and "pymeta demo --iterations 60000" in out
    assert r["seconds"]["total"] < 120


def test_demo_argument_errors(capsys):
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--device", "cuda"]) == 2
        assert "no GPU" in capsys.readouterr().err
    assert cli.main(["demo", "--iterations", "0"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "tpu"])


def test_format_table():
    t = demo.format_table(["a", "bb"], [["x", 1.5], ["yy", 22]])
    assert t.splitlines() == ["a    bb", "--  ---", "x   1.5", "yy   22"]
