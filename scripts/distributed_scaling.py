"""CPU scaling of distributed MAML: the example on 1 process vs torchrun with K ranks (one
intra-op thread per rank), same total meta-batch; prints ms per meta-step and the efficiency
(t_1 / (K * t_K)). Usage: python scripts/distributed_scaling.py [K] [repeats]"""
import os
import socket
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--steps", "10", "--meta-batch", "1024", "--hidden", "64", "--shots", "20",
        "--queries", "20", "--inner-steps", "2", "--dtype", "float32"]


def run(k: int, out: str) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    if k == 1:
        cmd = [sys.executable, "-m", "pymeta.examples.distributed_maml"]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={k}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "-m", "pymeta.examples.distributed_maml"]
    subprocess.run(cmd + ARGS + ["--out", out], env=env, check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    r = torch.load(out, weights_only=True)
    return r["seconds"] / r["steps_run"]


def main():
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    with tempfile.TemporaryDirectory() as d:
        t1 = t2 = 0.0
        for i in range(repeats):  # interleaved, so that a change of machine load hits both
            t1 += run(1, os.path.join(d, f"a{i}.pt")) / repeats
            t2 += run(k, os.path.join(d, f"b{i}.pt")) / repeats
    print(f"1 process: {1e3 * t1:.1f} ms/step; {k} ranks: {1e3 * t2:.1f} ms/step; "
          f"speedup {t1 / t2:.2f}x; efficiency {t1 / (k * t2):.2f}")


if __name__ == "__main__":
    main()
