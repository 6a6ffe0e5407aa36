"""The LSTM step's kernels once each (after one warm-up round) at H = 20, float32, for Nsight
Compute. bench/gpu_check.sh with PYMETA_NCU=1 runs the default set at N = 1M under ncu: speed
of light, occupancy, warp stall reasons of the tensor-core forward, direct and staged, the
backward's CUDA-core pass (loads ahead, plain loops, plain loops at 6 blocks per SM), its
tensor-core pass, and the weight-gradient blocks, tensor-core and CUDA-core.

  python bench/lstm_ncu.py [--N 1000000] [--launches fwd,fwd32,bwd,bwd32]

Launches (each an op call under its PYMETA_LSTM_* switches): fwd (the default forward: for
float32 at H 17..20 the staged kernel's sync form), fwd_staged (the free-running staged
kernel), fwd_direct (the direct kernel), fwd_sw8 (the sync form in barrier groups of 8 warps),
fwd32 / fwd64 (32-bit / 64-bit offsets: the default is 32-bit for a bfloat16 state at
H <= 20), fwd_direct32 (the direct kernel with 32-bit offsets, also for a bfloat16 state,
--bf16), bwd (the default backward op), bwd_cc (CUDA-core weight gradients and the pass's
plain loops), bwd32, bwd_mma (the tensor-core pass), bwd_wide.
"""
import argparse
import os

import torch

import pymeta

LAUNCHES = {
    "fwd": ("forward", {}),
    "fwd_staged": ("forward", {"PYMETA_LSTM_MMA_STAGED": "1", "PYMETA_LSTM_SYNC": "0"}),
    "fwd_direct": ("forward", {"PYMETA_LSTM_MMA_STAGED": "0"}),
    "fwd_sw8": ("forward", {"PYMETA_LSTM_SYNC_WARPS": "8"}),
    "fwd32": ("forward", {"PYMETA_LSTM_OFF32": "1"}),
    "fwd64": ("forward", {"PYMETA_LSTM_OFF32": "0"}),
    "fwd_direct32": ("forward", {"PYMETA_LSTM_MMA_STAGED": "0", "PYMETA_LSTM_OFF32": "1"}),
    "bwd": ("backward", {}),
    "bwd_cc": ("backward", {"PYMETA_LSTM_WG_MMA": "0", "PYMETA_LSTM_BWD_AHEAD": "0"}),
    "bwd32": ("backward", {"PYMETA_LSTM_OFF32": "1"}),
    "bwd_mma": ("backward", {"PYMETA_LSTM_MMA_BWD": "1"}),
    "bwd_wide": ("backward", {"PYMETA_LSTM_BWD_WIDE": "1"}),
}
DEFAULT = "fwd,fwd_staged,fwd_direct,bwd,bwd_cc,bwd_mma,bwd_wide"

ap = argparse.ArgumentParser()
ap.add_argument("--N", type=int, default=1_000_000)
ap.add_argument("--launches", default=DEFAULT)
ap.add_argument("--bf16", action="store_true", help="a bfloat16 state (the forward launches)")
args = ap.parse_args()
N, H = args.N, 20
net = pymeta.LSTMOptimizerNet(H).cuda()
w = [x.detach() for x in net.weights()]
grad = torch.randn(N, device="cuda") * 1e-3
state = torch.randn(4, H, N, device="cuda") * 0.1
fstate = state.bfloat16() if args.bf16 else state
du, ds = torch.randn(N, device="cuda"), torch.randn(4, H, N, device="cuda")
for _ in range(2):  # warm-up round, then the profiled one (pick with ncu's -k / -c / -s)
    for name in args.launches.split(","):
        op, env = LAUNCHES[name]
        os.environ.update(env)
        if op == "forward":
            torch.ops.pymeta.lstm_optimizer_step(grad, fstate, *w, "log_sign", 10.0, 0.1)
        else:
            torch.ops.pymeta.lstm_optimizer_step_backward(du, ds, grad, state, *w, "log_sign",
                                                          10.0, 0.1)
        for k in env:
            del os.environ[k]
torch.cuda.synchronize()
print("lstm_ncu.py: done")
