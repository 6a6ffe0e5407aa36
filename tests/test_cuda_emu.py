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


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_lstm_cuda_thread_code_matches_header_math():
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "lstm_emu")
        subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Wno-unknown-pragmas",
                        "-I", os.path.join(ROOT, "csrc", "include"),
                        "-I", os.path.join(ROOT, "csrc", "cuda"),
                        os.path.join(ROOT, "tests", "cuda_emu", "lstm_emu.cpp"), "-o", exe],
                       check=True)
        out = subprocess.run([exe], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "all equal" in out.stdout


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_lstm_tensor_core_warp_code_matches_header_math():
    """The tensor-core forward (csrc/cuda/lstm_optimizer_mma.cuh) run by 32 host threads as one
    warp, with mma.sync m16n8k8 TF32 and shfl.xor emulated from the PTX fragment layouts."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "lstm_mma_emu")
        subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas",
                        "-I", os.path.join(ROOT, "csrc", "include"),
                        "-I", os.path.join(ROOT, "csrc", "cuda"),
                        os.path.join(ROOT, "tests", "cuda_emu", "lstm_mma_emu.cpp"), "-o", exe],
                       check=True)
        out = subprocess.run([exe], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "all equal" in out.stdout
