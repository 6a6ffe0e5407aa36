"""Quick CUDA timing of lstm_optimizer_step (native vs reference eager), forward and
forward + backward. Usage: python bench/lstm_gpu_timing.py"""
import torch

import pymeta
from pymeta import reference


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    for H in (20, 32, 64):
        for N in (100_000, 1_000_000):
            net = pymeta.LSTMOptimizerNet(H).cuda()
            grad = torch.randn(N, device="cuda")
            state = torch.randn(4, H, N, device="cuda") * 0.1
            w = [x.detach().requires_grad_() for x in net.weights()]
            row = []
            for name, f in (("native", lambda *a: torch.ops.pymeta.lstm_optimizer_step(*a, "log_sign", 10.0, 0.1)),
                            ("reference", lambda *a: reference.lstm_optimizer_step(*a, "log_sign", 10.0, 0.1))):
                with torch.no_grad():
                    fwd = timed(lambda: f(grad, state, *w))

                def fb():
                    u, s = f(grad, state, *w)
                    torch.autograd.grad(u.sum() + s.sum(), w)
                row.append(f"{name}: fwd {fwd:.3f} ms, fwd+bwd {timed(fb):.3f} ms")
            print(f"H={H} N={N}: " + " | ".join(row))


if __name__ == "__main__":
    main()
