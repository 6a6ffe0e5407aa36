"""Shared by the pytest-benchmark suites."""
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def timed(fn, device):
    """fn, made to wait for the GPU so that wall-clock timing is honest there."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run
