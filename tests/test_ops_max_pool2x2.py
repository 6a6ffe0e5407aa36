"""pymeta.ops.max_pool2x2: the CPU kernel vs F.max_pool2d (values, indices, gradients, bit for
bit, with ties, NaN and infinities), gradcheck to second order, registrations (opcheck,
torch.compile), argument errors, and the other devices' fallback."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pymeta
from pymeta import _backend, ops

native_only = pytest.mark.skipif(not _backend.NATIVE, reason="pymeta._C is not built")
OP = torch.ops.pymeta.max_pool2x2.default if _backend.NATIVE else None
SHAPES = [(3, 5, 28, 28), (2, 4, 14, 14), (2, 3, 7, 7), (1, 2, 3, 3), (2, 3, 2, 2),
          (2, 3, 6, 9), (1, 1, 5, 130)]  # odd sides (floor mode), rows longer than a chunk


def _check_equal_to_max_pool2d(x: torch.Tensor) -> None:
    x = x.detach().requires_grad_()
    out, idx = ops.max_pool2x2(x)
    want, want_idx = F.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, want_idx)
    g = torch.randn_like(want)
    (got_dx,) = torch.autograd.grad(out, x, g)
    (want_dx,) = torch.autograd.grad(want, x, g)
    assert torch.equal(got_dx, want_dx)


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_max_pool2d_random(shape, dtype):
    torch.manual_seed(0)
    _check_equal_to_max_pool2d(torch.randn(*shape, dtype=dtype))


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_nan_and_infinities_follow_max_pool2d(dtype):
    """Few distinct values (many ties: the first in a window wins), NaN (the last NaN of a
    window wins), +-inf, and all -inf windows."""
    torch.manual_seed(1)
    x = torch.randint(-1, 2, (3, 4, 10, 12)).to(dtype)
    flat = x.view(-1)
    pick = torch.randperm(flat.numel())
    flat[pick[:40]] = float("nan")
    flat[pick[40:80]] = float("inf")
    flat[pick[80:120]] = float("-inf")
    x[0, 0, :2, :2] = float("-inf")
    x[0, 1, :2, :2] = float("nan")
    x[1, 0, :2, :2] = torch.tensor([[-0.0, 0.0], [0.0, -0.0]])  # +-0 tie: the first wins
    x[1, 1, :2, :2] = torch.tensor([[0.0, -0.0], [-0.0, 0.0]])
    _check_equal_to_max_pool2d(x)
    out, _ = ops.max_pool2x2(x)
    assert torch.signbit(out[1, 0, 0, 0]) and not torch.signbit(out[1, 1, 0, 0])


@native_only
def test_nan_stays_in_its_window():
    x = torch.randn(1, 1, 8, 8)
    x[0, 0, 2, 3] = float("nan")
    out, _ = ops.max_pool2x2(x)
    assert torch.isnan(out[0, 0, 1, 1]) and torch.isnan(out).sum() == 1


@native_only
def test_gradcheck_first_and_second_order():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    f = lambda t: ops.max_pool2x2(t)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@native_only
def test_second_order_matches_max_pool2d():
    """What second-order MAML runs through: d/dx of (d pool / dx . v)."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    results = []
    for pool in (lambda t: ops.max_pool2x2(t)[0], lambda t: F.max_pool2d(t, 2)):
        y = pool(x.tanh())
        (g,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(g.square().sum(), x)[0])
    assert torch.equal(*results)


@native_only
def test_opcheck():
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    torch.library.opcheck(OP, (x,))
    torch.library.opcheck(OP, (x.clone().requires_grad_(),))
    torch.library.opcheck(OP, (torch.randn(2, 3, 4, 4),))


@native_only
def test_torch_compile_fullgraph():
    def f(t):
        out, _ = ops.max_pool2x2(t)
        return out.relu() * 2

    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), F.max_pool2d(x, 2).relu() * 2
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (ga,) = torch.autograd.grad(got.sum(), x)
    (gb,) = torch.autograd.grad(want.sum(), x)
    assert torch.equal(ga, gb)


BAD = [
    (lambda: torch.randint(0, 3, (1, 1, 4, 4)), TypeError, "x must be float32 or float64, not torch.int64"),
    (lambda: torch.randn(1, 1, 4, 4, dtype=torch.bfloat16), TypeError, "x must be float32 or float64"),
    (lambda: torch.randn(3, 4, 4), ValueError, r"x must be \[N, C, H, W\]; got 3 dimensions"),
    (lambda: torch.randn(1, 1, 1, 4), ValueError, "x must be at least 2x2 in H and W; got 1x4"),
    (lambda: torch.randn(1, 1, 8, 8).transpose(2, 3), ValueError, "x must be contiguous"),
    (lambda: torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last), ValueError,
     "x must be contiguous"),
]


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("make,exc,msg", BAD)
def test_bad_input_names_x(backend, make, exc, msg):
    if backend == "native" and not _backend.NATIVE:
        pytest.skip("pymeta._C is not built")
    with pymeta.use_backend(backend), pytest.raises(exc, match=msg):
        ops.max_pool2x2(make())
    with pytest.raises(TypeError, match="x is a list"):
        ops.max_pool2x2([1.0])


def test_backend_switch_routes_the_call():
    """"reference" runs F.max_pool2d (aten's autograd node), the others the native op."""
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with pymeta.use_backend("reference"):
        out, _ = ops.max_pool2x2(x)
    assert type(out.grad_fn).__name__ == "MaxPool2DWithIndicesBackward0"
    if _backend.NATIVE:
        out, _ = ops.max_pool2x2(x)
        assert "pymeta_max_pool2x2" in type(out.grad_fn).__name__


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runs_max_pool2d():
    """No CUDA kernel: on the GPU every backend runs F.max_pool2d."""
    x = torch.randn(2, 3, 8, 8, device="cuda")
    for backend in ("auto", "native", "reference"):
        with pymeta.use_backend(backend):
            out, idx = ops.max_pool2x2(x)
        want, want_idx = F.max_pool2d(x, 2, return_indices=True)
        assert torch.equal(out, want) and torch.equal(idx, want_idx)


def test_forward_mode_ad_and_func_grad_match_max_pool2d():
    """The native op has no forward-mode formula: jvp, dual tensors and torch.func.grad run
    the reference, so tangents are max_pool2d's, not silently zero."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    t = torch.randn_like(x)
    _, want = torch.func.jvp(lambda a: F.max_pool2d(a, 2), (x,), (t,))
    _, got = torch.func.jvp(lambda a: ops.max_pool2x2(a)[0], (x,), (t,))
    assert torch.equal(got, want) and want.abs().sum() > 0
    with torch.autograd.forward_ad.dual_level():
        out = ops.max_pool2x2(torch.autograd.forward_ad.make_dual(x, t))[0]
        assert torch.equal(torch.autograd.forward_ad.unpack_dual(out).tangent, want)
    g = torch.func.grad(lambda a: ops.max_pool2x2(a)[0].square().sum())(x)
    assert torch.equal(g, torch.func.grad(lambda a: F.max_pool2d(a, 2).square().sum())(x))


def test_transforms_nested_with_vmap():
    """No vmap rule: under vmap (alone or with jvp / grad) the front runs the reference, so
    every transform composes and nothing is dropped."""
    torch.manual_seed(5)
    x = torch.randn(3, 2, 2, 6, 6, dtype=torch.float64)
    t = torch.randn_like(x)
    ours = torch.func.vmap(lambda z: ops.max_pool2x2(z)[0])
    torch_s = torch.func.vmap(lambda z: F.max_pool2d(z, 2))
    assert torch.equal(ours(x), torch_s(x))
    assert torch.equal(torch.func.jvp(ours, (x,), (t,))[1], torch.func.jvp(torch_s, (x,), (t,))[1])
    assert torch.equal(torch.func.grad(lambda z: ours(z).square().sum())(x),
                       torch.func.grad(lambda z: torch_s(z).square().sum())(x))
