"""Runs every CUDA kernel of pymeta once on awkward sizes, for compute-sanitizer
(bench/gpu_check.sh): vectorized and scalar paths, several launches, empty tensors,
every rate form, forward and backward.
  python bench/sanitize.py                # every kernel
  python bench/sanitize.py staged wgrad   # only the cp.async kernels: the staged forward and
                                          # the tensor-core weight gradients (for racecheck)
  python bench/sanitize.py sync           # only the barrier-synchronized kernels (synccheck)
  python bench/sanitize.py blocked        # only the blocked layout's staged kernel (racecheck)"""
import os
import sys

import torch

import pymeta
from pymeta import ops

dev = "cuda"


def inner_update():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        shapes = [(64, 3, 3, 3), (5,), (), (0,), (7, 13), (1024,), (4099,)] + [(i % 37,) for i in range(60)]
        T = 5
        params = [torch.randn(s, device=dev, dtype=dtype, requires_grad=True) if i % 2 else
                  torch.randn(T, *s, device=dev, dtype=dtype, requires_grad=True) for i, s in enumerate(shapes)]
        grads = [torch.randn(T, *s, device=dev, dtype=dtype) for s in shapes]
        for lr in (0.3,
                   [torch.rand((), device=dev, dtype=dtype, requires_grad=True) for _ in shapes],
                   [torch.rand(s, device=dev, dtype=dtype, requires_grad=True) for s in shapes]):
            outs = ops.inner_update(params, grads, lr)
            wrt = params + (lr if isinstance(lr, list) else [])
            torch.autograd.grad(sum(o.float().sum() for o in outs), wrt)
        # Misaligned views: storage offset 1 forces the scalar path.
        base = torch.randn(T * 100 + 1, device=dev, dtype=dtype)
        ops.inner_update([base[1:101]], [base[1:].view(T, 100)], 0.1)


def lstm():
    # lstm_optimizer_step: forward and backward, odd N, both dtypes; float32 H <= 32 takes the
    # tensor-core forward (H 7, 20, 32), H = 64 the CUDA-core kernels.
    for dtype in (torch.float32, torch.float64):
        for H in ((7, 20, 32, 64) if dtype == torch.float32 else (20, 64)):
            net = pymeta.LSTMOptimizerNet(H).to(dev, dtype)
            N = 5003
            grad = torch.randn(N, device=dev, dtype=dtype, requires_grad=True)
            state = (torch.randn(4, H, N, device=dev, dtype=dtype) * 0.1).requires_grad_()
            upd, new_state = net(grad, state)
            torch.autograd.grad(upd.sum() + new_state.sum(), [grad, state] + list(net.parameters()))
    # the opt-in tensor-core backward pass (two blocks per SM at H <= 20, one above)
    os.environ["PYMETA_LSTM_MMA_BWD"] = "1"
    for H in (7, 20, 32):
        net = pymeta.LSTMOptimizerNet(H).to(dev)
        N = 5003
        state = (torch.randn(4, H, N, device=dev) * 0.1).requires_grad_()
        upd, new_state = net(torch.randn(N, device=dev), state)
        torch.autograd.grad(upd.sum() + new_state.sum(), [state] + list(net.parameters()))
    del os.environ["PYMETA_LSTM_MMA_BWD"]
    # the 32-bit offsets of the tensor-core forward (opt-in for float32; the default for
    # bfloat16), float32 and (direct) bfloat16
    os.environ["PYMETA_LSTM_OFF32"] = "1"
    os.environ["PYMETA_LSTM_MMA_STAGED"] = "0"
    for H in (7, 20, 32):
        net = pymeta.LSTMOptimizerNet(H).to(dev)
        N = 5003
        state = torch.randn(4, H, N, device=dev) * 0.1
        with torch.no_grad():
            net(torch.randn(N, device=dev), state)
            net(torch.randn(N, device=dev), state.bfloat16())
    del os.environ["PYMETA_LSTM_OFF32"], os.environ["PYMETA_LSTM_MMA_STAGED"]
    # a bfloat16 state: the tensor-core forward reads and writes bfloat16 (H <= 32; H = 64
    # converts in chunks), and so does the backward's CUDA-core pass (backward_smem_bf16_kernel,
    # each HP: 16, 20, 24, 32, 64; its shadow rows after the workspace rows). 64-bit offsets
    # here (32-bit ones, the default at H <= 20, ran above)
    os.environ["PYMETA_LSTM_OFF32"] = "0"
    for H, N in ((7, 5003), (20, 5003), (20, 5004), (23, 5003), (32, 5004), (64, 5003)):
        # (N % 4 == 0: the tensor-core weight gradients copy the shadow rows 16 bytes at a time)
        net = pymeta.LSTMOptimizerNet(H).to(dev)
        state = (torch.randn(4, H, N, device=dev) * 0.1).bfloat16().requires_grad_()
        upd, new_state = net(torch.randn(N, device=dev), state)
        torch.autograd.grad(upd.sum() + new_state.float().sum(), [state] + list(net.parameters()))
    del os.environ["PYMETA_LSTM_OFF32"]


def sync():
    # the staged forward's sync form (forward_mma_staged_sync_kernel, H 17..20: float32, the
    # default; bfloat16, PYMETA_LSTM_SYNC=1) in barrier groups of 4 warps (the default), the
    # whole block, 8, 3 (a smaller last group) and 2 warps (barrier ids up to 8): one step with
    # idle warps and groups (N = 40), a partial last step (5003: 4-byte copies for float32),
    # several steps per warp (100_000)
    os.environ["PYMETA_LSTM_SYNC"] = "1"
    os.environ["PYMETA_LSTM_MMA_STAGED"] = "1"
    for warps in ("", "16", "8", "3", "2"):
        os.environ["PYMETA_LSTM_SYNC_WARPS"] = warps
        for H in (17, 20):
            net = pymeta.LSTMOptimizerNet(H).to(dev)
            for N in (40, 5003, 100_000):
                for dtype in (torch.float32, torch.bfloat16):
                    state = (torch.randn(4, H, N, device=dev) * 0.1).to(dtype)
                    with torch.no_grad():
                        net(torch.randn(N, device=dev), state)
    for key in ("PYMETA_LSTM_SYNC", "PYMETA_LSTM_MMA_STAGED", "PYMETA_LSTM_SYNC_WARPS"):
        del os.environ[key]


def staged():
    # the staged tensor-core forward (PYMETA_LSTM_MMA_STAGED=1; the default for bfloat16): 16-byte copies (N a
    # multiple of 4, or 8 for bfloat16), 4-byte copies (N odd, or a state at a storage offset
    # of one element: float32), a tail step past N; N = 100k gives each warp several steps
    # (both buffers refilled). Tensors of exactly their size, so a read past N shows.
    for H in (7, 20, 32):
        net = pymeta.LSTMOptimizerNet(H).to(dev)
        for N, kind in ((100_003, "f32"), (100_000, "f32"), (100_008, "bf16"), (77, "f32"),
                        (5000, "offset")):
            if kind == "offset":
                state = (torch.randn(4 * H * N + 1, device=dev) * 0.1)[1:].view(4, H, N)
            else:
                state = torch.randn(4, H, N, device=dev) * 0.1
            with torch.no_grad():
                net(torch.randn(N, device=dev), state.bfloat16() if kind == "bf16" else state)


def blocked(forms=("direct", "staged", "sync")):
    # the blocked state layout [ceil(N / 16), 4, H, 16] (kBlk; H 17..20 and 32): the direct
    # kernel (PYMETA_LSTM_BLK_STAGED=0), the staged one (=1, H 17..20; its default where
    # 16-byte copies apply) and its float32 sync form; a partial last block (N = 40, 5003:
    # padding coordinates read and written), several steps per warp (100_000, H = 20 only:
    # the sanitizers' slowest case); float32 and bfloat16 state. Tensors of exactly their
    # size, so a read or write past the last block shows.
    envs = {"direct": {"PYMETA_LSTM_BLK_STAGED": "0"}, "staged": {"PYMETA_LSTM_BLK_STAGED": "1"},
            "sync": {"PYMETA_LSTM_BLK_STAGED": "1", "PYMETA_LSTM_SYNC": "1"}}
    for form in forms:
        env = envs[form]
        os.environ.update(env)
        for H in ((17, 20, 32) if form == "direct" else (17, 20)):
            net = pymeta.LSTMOptimizerNet(H).to(dev)
            for N in (40, 5003, 100_000) if H == 20 else (40, 5003):
                for dtype in (torch.float32, torch.bfloat16):
                    state = net.init_state(N, dtype=dtype, layout="blocked")
                    state.copy_(torch.randn(state.shape, device=dev) * 0.1)
                    with torch.no_grad():
                        net(torch.randn(N, device=dev), state)
        for key in env:
            del os.environ[key]


def wgrad(big):
    # the tensor-core weight gradients (the default at float32, H <= 32): one chunk ending
    # mid-stage (N = 300: 16-byte copies, 301: 4-byte ones), several chunks of 256 (5004,
    # 5003), H over every tile bucket; with `big` (memcheck only: racecheck is slow) chunks of
    # 288 coordinates (N = 140_004). Through the backward op, whose workspace is sized for it.
    cases = [(H, N) for H in (1, 7, 20, 32) for N in (300, 301, 5003, 5004)]
    for H, N in cases + ([(20, 140_004)] if big else []):
        w = [x.detach() for x in pymeta.LSTMOptimizerNet(H).to(dev).weights()]
        grad = torch.randn(N, device=dev) * 1e-3
        state = torch.randn(4, H, N, device=dev) * 0.1
        torch.ops.pymeta.lstm_optimizer_step_backward(
            torch.randn(N, device=dev), torch.randn(4, H, N, device=dev), grad, state, *w,
            "log_sign", 10.0, 0.1)


torch.manual_seed(0)
pymeta.set_backend("native")
only = set(sys.argv[1:])
if not only:
    inner_update()
    torch.cuda.synchronize()
    print("sanitize.py: all kernels ran")
    lstm()
    torch.cuda.synchronize()
    print("sanitize.py: lstm kernels ran")
if not only or "sync" in only:
    sync()
    blocked(forms=("sync",))
    torch.cuda.synchronize()
    print("sanitize.py: synchronized kernels ran")
if not only or "blocked" in only:  # (racecheck: the staged kernel's buffers only)
    blocked() if not only else blocked(forms=("staged",))
    torch.cuda.synchronize()
    print("sanitize.py: blocked layout kernels ran")
if not only or "staged" in only:
    os.environ["PYMETA_LSTM_MMA_STAGED"] = "1"
    os.environ["PYMETA_LSTM_OFF32"] = "0"  # 64-bit store offsets, then 32-bit ones
    staged()
    os.environ["PYMETA_LSTM_SYNC"] = "0"  # the free-running float32 kernel at H = 20 too
    staged()
    del os.environ["PYMETA_LSTM_SYNC"]
    os.environ["PYMETA_LSTM_OFF32"] = "1"
    staged()
    del os.environ["PYMETA_LSTM_MMA_STAGED"], os.environ["PYMETA_LSTM_OFF32"]
    torch.cuda.synchronize()
    print("sanitize.py: staged forward ran")
if not only or "wgrad" in only:
    wgrad(big=not only)
    torch.cuda.synchronize()
    print("sanitize.py: tensor-core weight gradients ran")
if not only:  # the backward pass's two forms (PYMETA_LSTM_BWD_AHEAD: 0 plain loops, 1 ahead)
    for mode in ("0", "1"):
        os.environ["PYMETA_LSTM_BWD_AHEAD"] = mode
        wgrad(big=False)
        del os.environ["PYMETA_LSTM_BWD_AHEAD"]
    torch.cuda.synchronize()
    print("sanitize.py: backward pass forms ran")
