"""Timing for `pymeta bench`: medians of repeated runs (CUDA events on a GPU), ratios
within one run, and on a GPU the fraction of the memory roofline floor."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from pymeta import _checks
from pymeta.workloads import Workload


def resident_bytes(field: str = "VmRSS") -> int:
    """A memory figure of this process from /proc/self/status: "VmRSS" (resident now) or
    "VmHWM" (the resident high-water mark, see reset_resident_peak). Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_resident_peak() -> None:
    """Sets VmHWM to the current resident size (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` sets ``m.bytes`` to the memory high-water mark over
    the block minus the memory in use before it: torch.cuda's allocated memory on a GPU, the
    resident size elsewhere (Linux; that follows live memory only if freed blocks go back to
    the OS, e.g. MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0)."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self.bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            reset_resident_peak()
            self.before = resident_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if self.cuda else resident_bytes("VmHWM")
        self.bytes = peak - self.before


def keep_freed_cpu_memory() -> bool:
    """Asks glibc's malloc to keep freed memory instead of returning it to the OS.

    Every variant allocates its outputs (14 MB for the Conv-4 x 32 workload) on each call;
    whether those pages come back from the heap or fault in fresh depended on the order of
    the variants (1.4 ms vs 5.2 ms for the same call in one run). With this set, CPU timings
    compare the kernels. Returns False where mallopt is unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 31))
    except (OSError, AttributeError):
        return False


def time_fn(fn: Callable[[], object], device: str, min_time: float = 0.2, warmup: int = 3,
            max_reps: int = 200) -> float:
    """Median seconds per call of fn(): after ``warmup`` untimed calls, timed calls until they
    add up to ``min_time`` seconds (on a CPU at least 5), at most ``max_reps`` (at least one)."""
    # Checked once, before anything is timed.
    if not callable(fn):
        raise TypeError(f"pymeta.benchmark.time_fn: fn must be callable, not {type(fn).__name__}")
    _checks.real("pymeta.benchmark.time_fn", "min_time", min_time, finite=False, min=0)
    warmup = _checks.integer("pymeta.benchmark.time_fn", "warmup", warmup, min=0)
    max_reps = _checks.integer("pymeta.benchmark.time_fn", "max_reps", max_reps, min=1)
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        total = 0.0
        while (total < min_time or not times) and len(times) < max_reps:
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
            times.append(t)
            total += t
    else:
        total = 0.0
        while (total < min_time or len(times) < 5) and len(times) < max_reps:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            times.append(t)
            total += t
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Measured device-to-device copy rate in bytes/s (bytes read + bytes written)."""
    nbytes = _checks.integer("pymeta.benchmark.copy_bandwidth", "nbytes", nbytes, min=4)
    a = torch.empty(nbytes // 4, device=device)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device, min_time=0.3)
    return 2 * nbytes / t


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object] | None:
    """fn captured in a CUDA graph (its replay runs the same kernels with no host work in
    between), or None where fn can't be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return graph.replay
    except Exception:  # noqa: BLE001 - any failure just means "not capturable"
        torch.cuda.synchronize()
        return None


def run_workload(w: Workload, device: str, min_time: float = 0.2, bandwidth: float | None = None) -> list[dict]:
    """Times every variant of w: eagerly and, on a GPU, also as a CUDA graph replay (which
    shows device time without the host's launch overhead). Returns one row per variant."""
    if not w.variants:
        raise ValueError(f"pymeta.benchmark.run_workload: workload {w.name!r} has no variants")
    _checks.real("pymeta.benchmark.run_workload", "min_time", min_time, finite=False, min=0)
    if bandwidth is not None:
        _checks.real("pymeta.benchmark.run_workload", "bandwidth", bandwidth, gt=0)
    rows = []
    for name, fn in w.variants.items():
        row = {"workload": w.name, "variant": name, "ms": time_fn(fn, device, min_time=min_time) * 1e3}
        if device == "cuda":
            replay = cuda_graph(fn)
            row["graph_ms"] = time_fn(replay, device, min_time=min_time) * 1e3 if replay else None
        rows.append(row)
    ours = rows[0]
    for r in rows:
        r["pymeta_speedup"] = r["ms"] / ours["ms"]
        if r.get("graph_ms") and ours.get("graph_ms"):
            r["pymeta_graph_speedup"] = r["graph_ms"] / ours["graph_ms"]
        best = r.get("graph_ms") or r["ms"]
        if bandwidth and w.bytes:
            r["roofline_fraction"] = (w.bytes / bandwidth) / (best / 1e3)
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table: per workload, each variant's time and how many times slower it is
    than pymeta's ("x pymeta"), eagerly and as a CUDA graph; roofline = floor / best time."""
    lines = []
    current = None
    for r in rows:
        if r["workload"] != current:
            current = r["workload"]
            lines.append("")
            lines.append(current)
            lines.append(f"  {'variant':<26}{'eager ms':>10}{'x pymeta':>9}{'graph ms':>10}{'x pymeta':>9}"
                         f"{'roofline':>9}")
        graph = f"{r['graph_ms']:.4f}" if r.get("graph_ms") else "-"
        gx = f"{r['pymeta_graph_speedup']:.2f}" if r.get("pymeta_graph_speedup") else "-"
        roof = f"{r['roofline_fraction'] * 100:.0f}%" if r.get("roofline_fraction") else "-"
        lines.append(f"  {r['variant']:<26}{r['ms']:>10.4f}{r['pymeta_speedup']:>9.2f}{graph:>10}{gx:>9}{roof:>9}")
    return "\n".join(lines)
