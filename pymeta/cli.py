"""The `pymeta` command (also `python -m pymeta`): info, bench, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys


# ---- argument types: each checks its value at parse time, before any work starts or any file
# is made; a bad value exits with argparse's "error: argument --x: ..." and status 2.

def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {n}")
    return n


def _seed(text: str) -> int:
    from pymeta.demo import seed_problem

    seed = int(text)
    problem = seed_problem(seed)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return seed


def _out_dir(text: str) -> str:
    from pymeta.demo import out_dir_problem

    problem = out_dir_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _json_file(text: str) -> str:
    """A file that can be written: not a folder, in an existing, writable folder."""
    if not text or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name")
    folder = os.path.dirname(text) or "."
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} does not exist")
    if not os.access(text if os.path.exists(text) else folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"can't write {text!r}: permission denied")
    return text


_positive_int.__name__ = _seed.__name__ = "int"  # argparse: "invalid int value: 'x'"


# ---- the commands ----------------------------------------------------------------------------

def _cmd_info(args) -> int:
    import pymeta

    for k, v in pymeta.info().items():
        print(f"{k:>22}: {v}")
    return 0


def _cmd_bench(args) -> int:
    import torch

    import pymeta
    from pymeta import benchmark, workloads

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("pymeta bench: --device cuda but no GPU is available", file=sys.stderr)
        return 2
    info = pymeta.info()
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"pymeta {info['pymeta']}, torch {info['torch']}, device: {dev_name}")
    if device == "cpu" and benchmark.keep_freed_cpu_memory():
        print("malloc keeps freed memory for this run (see pymeta.benchmark.keep_freed_cpu_memory)")
    bandwidth = benchmark.copy_bandwidth(device) if device == "cuda" else None
    if bandwidth:
        print(f"measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s (roofline column: floor / time)")
    rows = []
    for w in workloads.all_workloads(device, quick=args.quick):
        print(f"timing {w.name} ({w.description}) ...", flush=True)
        rows += benchmark.run_workload(w, device, min_time=0.05 if args.quick else 0.3,
                                       bandwidth=bandwidth)
    print(benchmark.format_table(rows))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({"device": dev_name, "info": info, "rows": rows}, f, indent=1)
        except OSError as e:  # the path passed the check at parse time, so something changed since
            print(f"pymeta bench: error: can't write --json {args.json!r}: {e}", file=sys.stderr)
            return 1
        print(f"\nwrote {args.json}")
    return 0


def _cmd_demo(args) -> int:
    import torch

    from pymeta import demo

    if args.device == "cuda" and not torch.cuda.is_available():
        print("pymeta demo: --device cuda but no GPU is available", file=sys.stderr)
        return 2
    demo.run_demo(device=args.device, out=args.out, quick=args.quick, seed=args.seed,
                  iterations=args.iterations, progress=not args.no_progress)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pymeta", description="fast batched meta-learning for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, compiled kernels, devices, backend")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("bench", help="time the fused ops against their references")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--quick", action="store_true", help="fewer, smaller workloads")
    p.add_argument("--json", metavar="FILE", type=_json_file,
                   help="also write the rows as JSON (its folder must exist)")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("demo", help="meta-learning end to end: sinusoids, the learned optimizer, digits",
                       description="Three experiments: MAML/FOMAML/Meta-SGD on sinusoid regression, the "
                                   "learned LSTM optimizer on quadratics, 5-way few-shot digits. About 5 "
                                   "minutes on 2 CPU cores; --quick under 1 minute.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="pymeta-demo", metavar="DIR", type=_out_dir,
                   help="plots and results.json go here (created if missing)")
    p.add_argument("--quick", action="store_true", help="a short run (under a minute on a CPU)")
    p.add_argument("--seed", type=_seed, default=0, help="an int >= 0 (default 0)")
    p.add_argument("--iterations", type=_positive_int, default=None,
                   help="sinusoid meta-iterations per method (default 2500, --quick 300; "
                        "the papers' protocol: 60000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
