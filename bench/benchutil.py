"""Shared by the pytest-benchmark suites and the GPU timing scripts."""
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

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


def ms_per_call(fn, reps=20, repeats=5, warmup=3, device="cuda"):
    """Milliseconds per call of fn: the median over `repeats` runs of `reps` back-to-back calls
    after `warmup` calls (CUDA events on the GPU, wall clock elsewhere: one run)."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return statistics.median(times)


@contextlib.contextmanager
def env_switches(env):
    """os.environ with the variables of `env` set (e.g. PYMETA_LSTM_* switches) inside the
    block; the caller's values, or their absence, back afterwards, also on an exception."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def json_child(script, argv, env):
    """Runs `python script *argv` in a fresh process (each measurement of the memory scripts
    does, so that one's allocations never show in another's peak) and returns the JSON object
    on its last stdout line; a failure raises with the child's last stderr line."""
    r = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1])
    return json.loads(r.stdout.strip().splitlines()[-1])

