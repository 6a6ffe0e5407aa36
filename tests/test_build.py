"""The build: CUDA kernels are compiled in wherever a toolkit was found, and the README's
test command is what CI runs."""
import os
import re
import shutil
from pathlib import Path

import pytest

import pymeta
from testutil import needs_native

ROOT = Path(__file__).resolve().parents[1]


@needs_native
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on this machine")
@pytest.mark.skipif(os.environ.get("PYMETA_CUDA") == "0", reason="PYMETA_CUDA=0")
def test_cuda_kernels_compiled_where_nvcc_exists():
    info = pymeta.info()
    assert info["cuda_kernels"], "nvcc is on PATH but the CUDA kernels were not built"
    assert info["cuda_archs"]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", quick, flags=re.S)


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c.strip() for c in cmds), "each quick-start block is one command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1].strip() in ci.splitlines(), ".ci/run must run the README's test command"


def test_every_python_package_is_installed():
    """pyproject.toml lists its packages by name (setuptools then installs no others): every
    folder of pymeta with an __init__.py must be there, or a non-editable install lacks it
    (pymeta.examples, which the README runs with torchrun -m, once was)."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(d.relative_to(ROOT).parts) for d in (ROOT / "pymeta").rglob("*")
             if d.is_dir() and (d / "__init__.py").exists()} | {"pymeta"}
    assert found == listed, f"packages in the tree {sorted(found)}, in pyproject.toml {sorted(listed)}"


def test_gpu_check_keeps_to_its_time_budget(tmp_path):
    """bench/gpu_check.sh with stand-ins for the GPU tools: a step the budget leaves under 10 s
    for is skipped and named in the summary, and a running step is cut at the budget."""
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    import subprocess
    import time
    (tmp_path / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "gpu_check.sh", tmp_path / "bench" / "gpu_check.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {
        "nvidia-smi": 'echo "stand-in GPU, 0, 80 GiB"',
        "cmake": "true",
        "compute-sanitizer": 'shift 4; "$@"; echo "ERROR SUMMARY: 0 errors"',
        # pytest finishes; the goals table would run 60 s and is cut by the budget
        "py": 'case "$*" in *pytest*) echo "3 passed";; *goals*) sleep 60;; *) sleep 1;; esac',
    }
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYMETA_")}  # the defaults
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "py"),
               TORCH_CUDA_ARCH_LIST="9.0", OUT=str(tmp_path / "out"), PYMETA_BUDGET_S="30")
    t0 = time.monotonic()
    run = subprocess.run(["bash", str(tmp_path / "bench" / "gpu_check.sh")], env=env,
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    out = run.stdout
    assert "cuda tests: rc=0" in out and "3 passed" in out, out
    # 30 s - 15 s kept for the summary: the goals table is killed after ~15 s, not 60 s
    assert elapsed < 28, (elapsed, out)
    cut = out.split("cut short by the budget:", 1)
    assert len(cut) == 2 and cut[1].split("\n", 1)[0].split() == ["lstm_gpu_goals.py"], out
    summary = out.split("skipped for the budget:", 1)
    assert len(summary) == 2, out
    for step in ("memcheck", "racecheck", "synccheck", "lstm_gpu_ab.py", "pymeta"):
        assert step in summary[1].split("\n", 1)[0], out
    assert "sanitizer:  rc=124" in out, out
    assert run.returncode != 0  # skipped checks are not passes
    env["PYMETA_BUDGET_S"] = "6m"
    bad = subprocess.run(["bash", str(tmp_path / "bench" / "gpu_check.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "PYMETA_BUDGET_S must be a whole number" in bad.stdout
