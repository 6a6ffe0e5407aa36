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


def _popen(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "pymeta", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _run(*args, timeout=300):
    proc = _popen(*args, timeout=timeout)
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
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "tpu"])


def _parse_error(capsys, *argv) -> str:
    """argparse's error for argv: exit status 2 and the message on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_demo(monkeypatch):
    """Fails the test if the demo starts: bad arguments must be refused before it."""
    def started(**kwargs):
        raise AssertionError("the demo ran")
    monkeypatch.setattr(demo, "run_demo", started)


def test_demo_bad_arguments_exit_2_before_anything_runs(tmp_path, capsys, no_demo):
    file = tmp_path / "file"
    file.write_text("x")
    err = _parse_error(capsys, "demo", "--out", str(file))
    assert "argument --out" in err and "exists and is not a folder" in err
    err = _parse_error(capsys, "demo", "--out", str(file / "sub"))
    assert "argument --out" in err and "is not a folder" in err
    out = tmp_path / "new" / "demo"
    for seed in ("18446744073709551616", "18446744073704551615", str(demo.MAX_SEED + 1), "-1"):
        err = _parse_error(capsys, "demo", "--out", str(out), "--seed", seed)
        assert f"argument --seed: must be an int in [0, {demo.MAX_SEED}]" in err, err
    assert "argument --seed: invalid int value: '1.5'" in _parse_error(capsys, "demo", "--seed", "1.5")
    assert "argument --iterations: must be an int >= 1" in _parse_error(capsys, "demo", "--iterations", "0")
    assert not (tmp_path / "new").exists()  # nothing was created


def test_demo_seed_range_fits_every_part():
    # The demo seeds generators with seed + each offset: the largest accepted seed still fits.
    torch.Generator().manual_seed(demo.MAX_SEED + max(demo.SEED_OFFSETS.values()))
    assert demo.seed_problem(0) is None and demo.seed_problem(demo.MAX_SEED) is None
    assert demo.seed_problem(demo.MAX_SEED + 1) and demo.seed_problem(-1)
    source = Path(demo.__file__).read_text()
    assert "seed + SEED_OFFSETS[" in source and "seed + 7_000_001" not in source


def test_cli_bad_arguments_in_a_fresh_process(tmp_path):
    # As a user runs it: an argparse message, status 2, no traceback, at once.
    file = tmp_path / "file"
    file.write_text("x")
    out = tmp_path / "demo"
    for args in (["demo", "--out", str(file)], ["demo", "--out", str(out), "--seed", "18446744073709551616"],
                 ["bench", "--json", str(tmp_path)]):
        proc = _popen(*args, timeout=120)
        assert proc.returncode == 2, proc
        assert "error: argument --" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_run_demo_checks_its_arguments_first(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    out = tmp_path / "new"
    bad = [(dict(out=str(file)), ValueError, "out .* exists and is not a folder"),
           (dict(out=str(file / "sub")), ValueError, "out .* is not a folder"),
           (dict(out=""), ValueError, "out '' is not a folder name"),
           (dict(out=3), TypeError, "out must be a folder path"),
           (dict(seed=2**64), ValueError, r"seed must be an int in \[0, "),
           (dict(seed=demo.MAX_SEED + 1), ValueError, "seed must be"),
           (dict(seed=-1), ValueError, "seed must be"),
           (dict(seed=1.0), TypeError, "seed must be an int"),
           (dict(iterations=0), ValueError, "iterations must be an int >= 1"),
           (dict(threads_cpu=-1), ValueError, "threads_cpu must be an int >= 0"),
           (dict(quick="yes"), TypeError, "quick must be a bool"),
           (dict(device="tpu"), ValueError, "device must be 'cpu' or 'cuda'"),
           (dict(device="meta"), ValueError, "device must be 'cpu' or 'cuda'")]
    for kwargs, error, match in bad:
        with pytest.raises(error, match="pymeta.demo.run_demo: " + match):
            demo.run_demo(**{"out": str(out), "progress": False, **kwargs})
    assert not out.exists()
    with pytest.raises(ValueError, match="pymeta.demo.demo_digits: seed must be"):
        demo.demo_digits(seed=2**64 - 1)


def test_bench_json_is_checked_before_the_benchmark(tmp_path, capsys, monkeypatch):
    from pymeta import workloads

    def started(*args, **kwargs):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr(workloads, "all_workloads", started)
    assert "argument --json: " in _parse_error(capsys, "bench", "--json", str(tmp_path))
    assert "is a folder" in _parse_error(capsys, "bench", "--json", str(tmp_path))
    err = _parse_error(capsys, "bench", "--json", str(tmp_path / "missing" / "b.json"))
    assert "argument --json: folder" in err and "does not exist" in err
    assert cli._json_file(str(tmp_path / "b.json")) == str(tmp_path / "b.json")
    assert not (tmp_path / "b.json").exists()


def test_time_fn_and_workloads_check_their_counts():
    from pymeta import benchmark, workloads

    calls = []
    assert benchmark.time_fn(lambda: calls.append(1), "cpu", min_time=0, warmup=0, max_reps=1) >= 0
    assert len(calls) == 1
    for kwargs, error, match in [(dict(max_reps=0), ValueError, "max_reps must be an int >= 1"),
                                 (dict(max_reps=2.0), TypeError, "max_reps must be an int"),
                                 (dict(warmup=-1), ValueError, "warmup must be an int >= 0"),
                                 (dict(min_time=float("nan")), ValueError, "min_time must be >= 0"),
                                 (dict(min_time=-1), ValueError, "min_time must be >= 0")]:
        with pytest.raises(error, match="pymeta.benchmark.time_fn: " + match):
            benchmark.time_fn(lambda: calls.append(1), "cpu", **kwargs)
    assert len(calls) == 1  # refused before any call
    with pytest.raises(ValueError, match="inner_update_workload: tasks must be an int >= 1, got 0"):
        workloads.inner_update_workload(tasks=0)
    with pytest.raises(TypeError, match="inner_update_workload: channels must be an int"):
        workloads.inner_update_workload(channels=True)
    with pytest.raises(ValueError, match="lr_mode must be"):
        workloads.inner_update_workload(lr_mode="per_task")
    with pytest.raises(ValueError, match="lstm_optimizer_workload: n must be an int >= 1"):
        workloads.lstm_optimizer_workload(n=0)
    with pytest.raises(ValueError, match=r"make_maml_inputs: cfg\['tasks'\] must be an int >= 1"):
        workloads.make_maml_inputs({**workloads.CPU_CONV4, "tasks": 0})
    with pytest.raises(ValueError, match="impls must be one or more of"):
        workloads.maml_workload(impls=())
    with pytest.raises(ValueError, match="has no variants"):
        benchmark.run_workload(workloads.Workload("w", "nothing", {}), "cpu")


def test_format_table():
    t = demo.format_table(["a", "bb"], [["x", 1.5], ["yy", 22]])
    assert t.splitlines() == ["a    bb", "--  ---", "x   1.5", "yy   22"]
