"""Where the device time goes (torch.profiler, CUDA kernels by total time), for the next
levers: the lstm_optimizer_step backward op (N = 1M, H = 20 and 32) and one eager pymeta.MAML
second-order meta-iteration on the issue's workload (Conv4-64, 32 tasks, 5 steps).
Usage: python bench/gpu_profile.py [rows] [lstm]   ("lstm": the LSTM op only)"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import pymeta  # noqa: E402
from pymeta.workloads import GPU_CONV4, build_maml, meta_iteration  # noqa: E402

ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 12


def show(title, fn, reps=3):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    print(f"\n== {title} (x{reps})")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=ROWS, max_name_column_width=70))


for H in (20, 32):
    N = 1_000_000
    net = pymeta.LSTMOptimizerNet(H).cuda()
    w = [x.detach() for x in net.weights()]
    grad = torch.randn(N, device="cuda") * 1e-3
    state = torch.randn(4, H, N, device="cuda") * 0.1
    du, ds = torch.ones(N, device="cuda"), torch.ones(4, H, N, device="cuda")
    show(f"lstm backward op H={H} N={N}", lambda: torch.ops.pymeta.lstm_optimizer_step_backward(
        du, ds, grad, state, *w, "log_sign", 10.0, 0.1))
    # the CUDA-core pass's forms (plain loops, loads ahead, plain at 6 blocks per SM: the same
    # bits) and the tensor-core pass
    for env in ("PYMETA_LSTM_BWD_AHEAD=0", "PYMETA_LSTM_BWD_AHEAD=1", "PYMETA_LSTM_BWD_WIDE=1",
                "PYMETA_LSTM_MMA_BWD=1"):
        key, value = env.split("=")
        os.environ[key] = value
        show(f"lstm backward op H={H} N={N}, {env}",
             lambda: torch.ops.pymeta.lstm_optimizer_step_backward(
                 du, ds, grad, state, *w, "log_sign", 10.0, 0.1))
        del os.environ[key]

if "lstm" not in sys.argv[2:]:
    maml, run, data = build_maml("pymeta", GPU_CONV4, False, "cuda")
    show("pymeta.MAML second order, eager", lambda: meta_iteration(maml, run, data), reps=1)
