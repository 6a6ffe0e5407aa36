"""pytest-benchmark suite for inner_update (run: pytest bench --benchmark-enable).
The workloads are pymeta.workloads', shared with `pymeta bench`."""
import pytest

from pymeta import workloads
from benchutil import timed

CASES = {
    "per-task scalar": dict(shared=False, lr_mode="scalar"),
    "shared scalar": dict(shared=True, lr_mode="scalar"),
    "per-task per_param": dict(shared=False, lr_mode="per_param"),
    "shared per_tensor fwd+bwd": dict(shared=True, lr_mode="per_tensor", backward=True),
}
VARIANTS = ["pymeta", "reference", "per-tensor loop", "torch._foreach", "torch.compile(loop)"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_inner_update(benchmark, device, case, variant):
    tasks = 32 if device == "cuda" else 8
    w = workloads.inner_update_workload(device, tasks, compile=variant.startswith("torch.compile"),
                                        **CASES[case])
    benchmark.group = f"inner_update {case} ({device})"
    result = benchmark(timed(w.variants[variant], device))
    assert result is not None
