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
