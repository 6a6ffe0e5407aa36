"""The LSTM step's kernels once each at N = 1M, H = 20, float32, for Nsight Compute
(bench/gpu_check.sh with PYMETA_NCU=1 runs it under ncu: speed of light, occupancy, warp
stall reasons of the tensor-core forward, direct and staged, the backward's CUDA-core pass (loads
ahead, plain loops, plain loops at 6 blocks per SM), its tensor-core pass, and the
weight-gradient blocks, tensor-core and CUDA-core)."""
import os

import torch

import pymeta

N, H = 1_000_000, 20
net = pymeta.LSTMOptimizerNet(H).cuda()
w = [x.detach() for x in net.weights()]
grad = torch.randn(N, device="cuda") * 1e-3
state = torch.randn(4, H, N, device="cuda") * 0.1
du, ds = torch.randn(N, device="cuda"), torch.randn(4, H, N, device="cuda")
for _ in range(2):  # warm-up (ncu skips nothing: the -c and -k filters pick the launches)
    torch.ops.pymeta.lstm_optimizer_step(grad, state, *w, "log_sign", 10.0, 0.1)
    os.environ["PYMETA_LSTM_MMA_STAGED"] = "1"
    torch.ops.pymeta.lstm_optimizer_step(grad, state, *w, "log_sign", 10.0, 0.1)
    del os.environ["PYMETA_LSTM_MMA_STAGED"]
    torch.ops.pymeta.lstm_optimizer_step_backward(du, ds, grad, state, *w, "log_sign", 10.0, 0.1)
    os.environ["PYMETA_LSTM_WG_MMA"] = "0"  # the CUDA-core weight-gradient tiles
    os.environ["PYMETA_LSTM_BWD_AHEAD"] = "0"  # and the pass's plain loops
    torch.ops.pymeta.lstm_optimizer_step_backward(du, ds, grad, state, *w, "log_sign", 10.0, 0.1)
    del os.environ["PYMETA_LSTM_WG_MMA"], os.environ["PYMETA_LSTM_BWD_AHEAD"]
    for key in ("PYMETA_LSTM_MMA_BWD", "PYMETA_LSTM_BWD_WIDE"):  # the tensor-core pass, and
        os.environ[key] = "1"                                   # the pass at 6 blocks per SM
        torch.ops.pymeta.lstm_optimizer_step_backward(du, ds, grad, state, *w, "log_sign", 10.0,
                                                      0.1)
        del os.environ[key]
torch.cuda.synchronize()
print("lstm_ncu.py: done")
