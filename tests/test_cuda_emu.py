"""The CUDA kernels' per-thread (and per-warp) code of lstm_optimizer_step, run on the host: builds
tests/cuda_emu/lstm_emu.cpp with the host C++ compiler and runs it. It stages the weights,
runs the forward and backward threads and every weight-gradient block the way the kernels do,
and compares with the header's per-coordinate math. Needs no GPU (and no nvcc)."""
import os
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("PYMETA_EMU_CXX") or shutil.which("g++") or shutil.which("c++")


def _build_and_run(source: str, std: str, *extra_flags: str, timeout: int = 120) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "emu")
        subprocess.run([CXX, f"-std={std}", "-O1", *extra_flags, "-Wall", "-Wno-unknown-pragmas",
                        "-I", os.path.join(ROOT, "csrc", "include"),
                        "-I", os.path.join(ROOT, "csrc", "cuda"),
                        os.path.join(ROOT, "tests", "cuda_emu", source), "-o", exe], check=True)
        out = subprocess.run([exe], capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "all equal" in out.stdout


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_lstm_cuda_thread_code_matches_header_math():
    _build_and_run("lstm_emu.cpp", "c++17")


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_lstm_tensor_core_warp_code_matches_header_math():
    """The tensor-core forward and backward (csrc/cuda/lstm_optimizer_mma.cuh) run by 32 host
    threads as one warp, with mma.sync m16n8k8 TF32 and shfl.xor emulated from the PTX
    fragment layouts; the tensor-core weight gradients run by 256 host threads as one block
    of 8 warps (block barrier, __syncthreads_or, cp.async landing at once or at the wait)."""
    _build_and_run("lstm_mma_emu.cpp", "c++20", "-pthread", timeout=450)
