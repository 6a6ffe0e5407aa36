"""pymeta.ops.inner_update: native kernels against the reference, gradients, composability
with torch.compile / opcheck, and every bad input."""
import math
import random

import pytest
import torch
from torch.testing import assert_close

import pymeta
from pymeta import ops, reference
from testutil import FLOAT_DTYPES, TOL, needs_native

SHAPES = [(3, 5), (7,), (), (0,), (2, 0, 3), (64, 1, 3, 3), (13,), (5, 129), (1,), (4, 4, 4)]


def make_case(device, dtype, T, lr_form, seed, shapes=SHAPES, shared=None, noncontig=False):
    """Random params / grads / lr over `shapes`; params shared or per task at random."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)

    def rand(*shape):
        return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    params, grads, lrs = [], [], []
    for S in shapes:
        is_shared = rnd.random() < 0.5 if shared is None else shared
        p = rand(*S) if is_shared else rand(T, *S)
        gr = rand(T, *S)
        if noncontig and p.dim() >= 2:  # same values, transposed storage
            p = p.transpose(0, 1).contiguous().transpose(0, 1)
        if noncontig and gr.dim() >= 2:
            gr = gr.transpose(0, 1).contiguous().transpose(0, 1)
        params.append(p)
        grads.append(gr)
        if lr_form == "per_tensor" or (lr_form == "mixed" and rnd.random() < 0.5):
            lrs.append(torch.rand((), generator=g, dtype=torch.float64).to(device, dtype))
        else:
            lrs.append(torch.rand(S, generator=g, dtype=torch.float64).to(device, dtype))
    if lr_form == "float":
        lr = 0.37
    elif lr_form == "one_tensor":
        lr = torch.tensor(0.21, device=device, dtype=dtype)
    else:
        lr = lrs
    return params, grads, lr


def run(backend, *args):
    with pymeta.use_backend(backend):
        return ops.inner_update(*args)


LR_FORMS = ["float", "one_tensor", "per_tensor", "per_param", "mixed"]


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("lr_form", LR_FORMS)
@pytest.mark.parametrize("T", [1, 3, 0])
def test_forward_matches_reference(device, dtype, lr_form, T):
    for seed in range(3):
        args = make_case(device, dtype, T, lr_form, seed)
        out = run("native", *args)
        ref = run("reference", *args)
        assert len(out) == len(ref)
        for o, r, gr in zip(out, ref, args[1]):
            assert o.shape == gr.shape and o.dtype == gr.dtype and o.is_contiguous()
            assert_close(o, r, **TOL[dtype])


@needs_native
@pytest.mark.parametrize("shared", [True, False])
def test_noncontiguous_inputs(device, shared):
    args = make_case(device, torch.float32, 4, "per_param", 7, shared=shared, noncontig=True)
    assert any(not t.is_contiguous() for t in args[0] + args[1])
    for o, r in zip(run("native", *args), run("reference", *args)):
        assert_close(o, r, **TOL[torch.float32])
    # An expanded (stride-0) rate tensor.
    p, gr = torch.randn(6, 5, device=device), torch.randn(2, 6, 5, device=device)
    lr = torch.rand(5, device=device).expand(6, 5)
    assert_close(run("native", [p], [gr], [lr])[0], p - lr * gr)


@needs_native
def test_many_tensors_take_several_launches(device):
    # More tensors than one launch table holds, of many odd sizes.
    shapes = [(random.Random(i).randint(0, 300),) for i in range(131)]
    args = make_case(device, torch.float32, 3, "mixed", 11, shapes=shapes)
    for o, r in zip(run("native", *args), run("reference", *args)):
        assert_close(o, r, **TOL[torch.float32])
    gins = [t.requires_grad_() for t in args[0] + args[2]]
    outs = {b: run(b, *args) for b in ("native", "reference")}
    grads = {b: torch.autograd.grad(sum((o * o).sum() for o in outs[b]), gins) for b in outs}
    for a, b in zip(grads["native"], grads["reference"]):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_native
def test_inputs_not_modified(device):
    args = make_case(device, torch.float32, 3, "mixed", 3)
    before = [t.clone() for t in args[0] + args[1] + args[2]]
    run("native", *args)
    for b, a in zip(before, args[0] + args[1] + args[2]):
        assert torch.equal(a, b)


def _loss(outs):
    # Distinct weights per element, so that every gradient entry is exercised.
    return sum(((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)) ** 2).sum()
               for o in outs if o.numel())


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("lr_form", ["float", "per_tensor", "per_param", "mixed"])
def test_backward_matches_reference(device, dtype, lr_form):
    for seed in range(2):
        params, grads, lr = make_case(device, dtype, 3, lr_form, seed)
        ins = params + grads + (lr if isinstance(lr, list) else [])
        for t in ins:
            t.requires_grad_()
        got = {}
        for backend in ("native", "reference"):
            got[backend] = torch.autograd.grad(_loss(run(backend, params, grads, lr)), ins,
                                               allow_unused=True, materialize_grads=True)
        tol = TOL[dtype] if dtype in (torch.float32, torch.float64) else dict(rtol=3e-2, atol=3e-2)
        for a, b in zip(got["native"], got["reference"]):
            assert_close(a, b, **tol)


@needs_native
@pytest.mark.parametrize("lr_form", ["float", "per_tensor", "per_param", "mixed"])
def test_gradcheck(device, lr_form):
    shapes = [(3, 2), (4,), (), (1, 2, 2)]
    params, grads, lr = make_case(device, torch.float64, 2, lr_form, 5, shapes=shapes)
    lrs = lr if isinstance(lr, list) else []
    n, m = len(params), len(lrs)

    def f(*xs):
        ps, gs, ls = list(xs[:n]), list(xs[n:2 * n]), list(xs[2 * n:])
        with pymeta.use_backend("native"):
            return tuple(ops.inner_update(ps, gs, ls if m else lr))

    xs = [t.detach().clone().requires_grad_() for t in params + grads + lrs]
    assert torch.autograd.gradcheck(f, xs)
    assert torch.autograd.gradgradcheck(f, xs)


@needs_native
@pytest.mark.parametrize("lr_form", ["float", "mixed"])
def test_opcheck(device, lr_form):
    params, grads, lr = make_case(device, torch.float32, 3, lr_form, 9, shapes=[(3, 4), (5,), ()])
    lr_tensors = lr if isinstance(lr, list) else None
    lr_scalar = lr if isinstance(lr, float) else 0.0
    for t in params + (lr_tensors or []):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.pymeta.inner_update.default,
                          (params, grads, lr_tensors, lr_scalar))
    douts = [torch.randn_like(g) for g in grads]
    shared = [int(p.shape != g.shape) for p, g in zip(params, grads)]
    det = [t.detach() for t in lr_tensors] if lr_tensors else None
    torch.library.opcheck(torch.ops.pymeta.inner_update_backward.default,
                          (douts, grads, det, lr_scalar, shared, True, True, det is not None))


@needs_native
def test_torch_compile_fullgraph(device):
    params, grads, lr = make_case(device, torch.float32, 4, "mixed", 2, shapes=[(3, 4), (6,)])
    for t in params + lr:
        t.requires_grad_()

    def step(ps, gs, ls):
        out = ops.inner_update(ps, gs, ls)
        return sum((o * o).sum() for o in out)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with pymeta.use_backend("native"):
        got = compiled(params, grads, lr)
        got_g = torch.autograd.grad(got, params + lr)
    with pymeta.use_backend("reference"):
        want = step(params, grads, lr)
        want_g = torch.autograd.grad(want, params + lr)
    assert_close(got, want)
    for a, b in zip(got_g, want_g):
        assert_close(a, b)


def _mlp_task_loss(flat, x, y):
    w1, b1, w2, b2 = flat
    h = torch.tanh(x @ w1.transpose(-1, -2) + b1.unsqueeze(-2))
    return ((h @ w2.transpose(-1, -2) + b2.unsqueeze(-2) - y) ** 2).mean(dim=(-1, -2))


@needs_native
@pytest.mark.parametrize("lr_kind", ["float", "per_param"])
def test_second_order_maml_meta_gradient(device, lr_kind):
    """Two inner steps of second-order MAML on a small MLP over T tasks, through
    inner_update, against a per-task loop of plain autograd ops."""
    torch.manual_seed(0)
    T, K, dt = 3, 5, torch.float64
    theta = [torch.randn(8, 2, dtype=dt, device=device), torch.randn(8, dtype=dt, device=device),
             torch.randn(1, 8, dtype=dt, device=device), torch.randn(1, dtype=dt, device=device)]
    theta = [t.requires_grad_() for t in theta]
    lrs = [torch.full_like(t, 0.1).requires_grad_() for t in theta] if lr_kind == "per_param" else 0.1
    xs, ys = torch.randn(T, K, 2, dtype=dt, device=device), torch.randn(T, K, 1, dtype=dt, device=device)
    xq, yq = torch.randn(T, K, 2, dtype=dt, device=device), torch.randn(T, K, 1, dtype=dt, device=device)
    wrt = theta + (lrs if isinstance(lrs, list) else [])

    with pymeta.use_backend("native"):
        fast = list(theta)  # shared at the first step
        for _ in range(2):
            batched = [f if f.shape[0] == T and f.dim() > t.dim() else f.expand(T, *f.shape)
                       for f, t in zip(fast, theta)]
            loss = _mlp_task_loss(batched, xs, ys).sum()
            g = torch.autograd.grad(loss, fast if fast[0].dim() > theta[0].dim() else batched,
                                    create_graph=True)
            fast = ops.inner_update(fast, list(g), lrs)
        meta = _mlp_task_loss(fast, xq, yq).mean()
        got = torch.autograd.grad(meta, wrt)

    meta_ref = 0
    for t in range(T):
        fast = list(theta)
        for _ in range(2):
            g = torch.autograd.grad(_mlp_task_loss(fast, xs[t], ys[t]), fast, create_graph=True)
            fast = [p - (lr if isinstance(lrs, list) else lrs) * gi
                    for p, gi, lr in zip(fast, g, lrs if isinstance(lrs, list) else [None] * 4)]
        meta_ref = meta_ref + _mlp_task_loss(fast, xq[t], yq[t]) / T
    want = torch.autograd.grad(meta_ref, wrt)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_native
def test_forward_mode_ad_runs_the_reference(device):
    """No native forward-mode formula: jvp and dual tensors get the reference's tangents
    (dout = dparam - lr * dgrad - dlr * grad), never silently zero."""
    g = torch.Generator().manual_seed(5)
    p, gr = (torch.randn(3, 4, generator=g, dtype=torch.float64).to(device),
             torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(device))
    lr = torch.rand(3, 4, generator=g, dtype=torch.float64).to(device)
    tp, tg, tl = (torch.randn_like(p), torch.randn_like(gr), torch.randn_like(lr))
    _, tan = torch.func.jvp(lambda a, b, c: ops.inner_update([a], [b], [c])[0], (p, gr, lr), (tp, tg, tl))
    assert_close(tan, tp - lr * tg - tl * gr, rtol=1e-12, atol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        out = ops.inner_update([torch.autograd.forward_ad.make_dual(p, tp)], [gr], 0.3)[0]
        assert_close(torch.autograd.forward_ad.unpack_dual(out).tangent, tp.expand(2, 3, 4),
                     rtol=0, atol=0)


@needs_native
def test_tangents_of_incoming_gradients_reach_the_backward():
    """Forward-over-reverse where only the incoming gradient is dual: the backward runs the
    reference's ops, so its tangent comes out (dparam = sum over tasks of dout)."""
    g = torch.Generator().manual_seed(7)
    p = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gr = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    v, tv = (torch.randn(4, 2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    out = ops.inner_update([p], [gr], 0.3)[0]
    with torch.autograd.forward_ad.dual_level():
        (dp,) = torch.autograd.grad(out, p, torch.autograd.forward_ad.make_dual(v, tv))
        assert_close(torch.autograd.forward_ad.unpack_dual(dp).tangent, tv.sum(0),
                     rtol=1e-12, atol=1e-12)


@needs_native
def test_transforms_nested_with_vmap():
    """vmap inside a forward-AD level, jvp over vmap and vmap over jvp: the vmap rule goes
    back through the front, so the transform below it is seen and the tangents are right."""
    g = torch.Generator().manual_seed(6)
    p = torch.randn(2, 3, generator=g, dtype=torch.float64)
    G = torch.randn(5, 4, 2, 3, generator=g, dtype=torch.float64)
    tG = torch.randn(5, 4, 2, 3, generator=g, dtype=torch.float64)

    def step(q):
        return ops.inner_update([p], [q], 0.1)[0]

    with torch.autograd.forward_ad.dual_level():
        assert_close(torch.func.vmap(step)(G), p - 0.1 * G, rtol=0, atol=0)
        dual = torch.autograd.forward_ad.make_dual(p, torch.ones_like(p))
        out = torch.func.vmap(lambda q: ops.inner_update([dual], [q], 0.1)[0])(G)
        assert_close(torch.autograd.forward_ad.unpack_dual(out).tangent, torch.ones_like(G))
    _, tan = torch.func.jvp(torch.func.vmap(step), (G,), (tG,))
    assert_close(tan, -0.1 * tG, rtol=1e-12, atol=1e-12)
    tan = torch.func.vmap(lambda q, t: torch.func.jvp(step, (q,), (t,))[1])(G, tG)
    assert_close(tan, -0.1 * tG, rtol=1e-12, atol=1e-12)


OP = torch.ops.pymeta.inner_update if pymeta.info()["native"] else None


@needs_native
@pytest.mark.parametrize("lr_form", LR_FORMS)
def test_eager_front_matches_the_registered_autograd(device, lr_form):
    """The front's eager autograd path (an autograd.Function, without the registered path's
    per-call Python costs) and the op's registered formula: the same outputs and gradients
    (params, grads, rates), bit for bit, also when some outputs take no part in the loss
    (their incoming gradients are None), and with create_graph (second order)."""
    params, grads, lr = make_case(device, torch.float64, 3, lr_form, 8, shapes=SHAPES[:6])
    lr_list = lr if isinstance(lr, list) else ([lr] * len(grads) if isinstance(lr, torch.Tensor)
                                              else None)
    results = []
    for front in (True, False):
        ps = [t.clone().requires_grad_() for t in params]
        gs = [t.clone().requires_grad_() for t in grads]
        if isinstance(lr, list):
            rate = [t.clone().requires_grad_() for t in lr]
            ls = rate
        elif isinstance(lr, torch.Tensor):
            rate = lr.clone().requires_grad_()
            ls = [rate]
        else:
            rate, ls = lr, []
        with pymeta.use_backend("native"):
            if front:
                outs = ops.inner_update(ps, gs, rate)
            else:
                outs = OP(ps, gs, None if lr_list is None else
                          ([rate] * len(gs) if isinstance(rate, torch.Tensor) else rate),
                          lr if isinstance(lr, float) else 0.0)
        assert (type(outs[0].grad_fn).__name__ == "_InnerUpdateFunctionBackward") == front
        loss = _loss(outs[::2])  # every other output unused
        first = torch.autograd.grad(loss, ps + gs + ls, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        second = torch.autograd.grad(sum((f * f).sum() for f in first if f.requires_grad),
                                     ps + gs + ls, allow_unused=True, materialize_grads=True)
        results.append((*outs, *first, *second))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_native
def test_eager_front_without_recorded_gradients(monkeypatch):
    """Where no gradient is recorded (no_grad, or no input requiring grad) the front calls the
    kernel below autograd (ops._below_autograd), as do the Function's forward and a backward
    without create_graph; with create_graph the backward takes the registered op (its
    gradient then has a history). Same bits either way."""
    calls = []
    below = ops._below_autograd
    monkeypatch.setattr(ops, "_below_autograd",
                        lambda op, args: calls.append(op.__name__) or below(op, args))
    params, grads, lr = make_case("cpu", torch.float32, 3, "per_param", 2, shapes=SHAPES[:4])
    with pymeta.use_backend("native"):
        want = OP(params, grads, lr, 0.0)
        plain = ops.inner_update(params, grads, lr)
        ps = [t.clone().requires_grad_() for t in params]
        with torch.no_grad():
            off = ops.inner_update(ps, grads, lr)
        assert calls == ["inner_update"] * 2
        for got in (plain, off):
            assert all(torch.equal(a, b) and a.grad_fn is None and not a.requires_grad
                       for a, b in zip(got, want))
        outs = ops.inner_update(ps, grads, lr)
        assert calls[2:] == ["inner_update"]  # the Function's forward
        g1 = torch.autograd.grad(_loss(outs), ps, retain_graph=True)
        assert calls[3:] == ["inner_update_backward"]
        g2 = torch.autograd.grad(_loss(outs), ps, create_graph=True)
        assert len(calls) == 4  # recorded: through the registered op
    for a, b in zip(g1, g2):
        assert torch.equal(a, b) and a.grad_fn is None
    assert any(b.grad_fn is not None for b in g2)


@needs_native
def test_backward_is_deterministic(device):
    params, grads, lr = make_case(device, torch.float32, 16, "per_tensor", 4,
                                  shapes=[(3000,), (40, 70), (5,)])
    for t in params + lr:
        t.requires_grad_()
    runs = []
    for _ in range(2):
        with pymeta.use_backend("native"):
            outs = ops.inner_update(params, grads, lr)
        runs.append(torch.autograd.grad(_loss(outs), params + lr))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- bad input: both backends raise, naming the argument -----------------------------------

def _good(device="cpu"):
    return [torch.randn(3, 4, device=device), torch.randn(5, device=device)], \
           [torch.randn(2, 3, 4, device=device), torch.randn(2, 5, device=device)]


BAD_CASES = {  # name: (make args, the exception both backends raise, its message)
    "empty params": (lambda p, g: ([], [], 0.1), ValueError, r"params is an empty list"),
    "length mismatch": (lambda p, g: (p, g[:1], 0.1), ValueError,
                        r"params has 2 tensors but grads has 1"),
    "lr length": (lambda p, g: (p, g, [torch.tensor(0.1)]), ValueError,
                  r"lr has 1 tensors but params has 2"),
    "param shape": (lambda p, g: ([p[0], torch.randn(6)], g, 0.1), ValueError,
                    r"params\[1\] has shape \[6\]"),
    "task count": (lambda p, g: (p, [g[0], torch.randn(3, 5)], 0.1), ValueError,
                   r"grads\[1\] has shape \[3, 5\] but grads\[0\] has T = 2"),
    "no task dim": (lambda p, g: ([torch.randn(())], [torch.randn(())], 0.1), ValueError,
                    r"grads\[0\] must have a leading task dimension"),
    "int dtype": (lambda p, g: ([p[0].long(), p[1]], g, 0.1), TypeError, r"params\[0\] has dtype"),
    "mixed dtype": (lambda p, g: (p, [g[0], g[1].double()], 0.1), TypeError,
                    r"grads\[1\] has dtype"),
    "lr shape": (lambda p, g: (p, g, [torch.tensor(0.1), torch.rand(4)]), ValueError,
                 r"lr\[1\] has shape \[4\]"),
    "lr dtype": (lambda p, g: (p, g, [torch.tensor(0.1), torch.rand(5).double()]), TypeError,
                 r"lr\[1\] has dtype"),
}


@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native), "reference"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_bad_input_names_the_argument(backend, case, requires_grad):
    """Every bad input raises, naming the argument, and modifies nothing: also where the
    inputs require grad (the front's autograd.Function path). Both backends raise the same
    exception type (the native checks are TORCH_CHECK_VALUE / _TYPE, not RuntimeError)."""
    make, exc, pattern = BAD_CASES[case]
    p, g = _good()
    if requires_grad:
        p = [t.requires_grad_() if t.is_floating_point() else t for t in p]
    args = make(p, g)
    before = [t.clone() for t in p + g]
    with pymeta.use_backend(backend), pytest.raises(exc, match=pattern):
        ops.inner_update(*args)
    assert all(torch.equal(a, b) for a, b in zip(before, p + g))


@pytest.mark.parametrize("bad,exc,pattern", [
    (True, TypeError, "not a bool"), ("0.1", TypeError, "not str"),
    ([0.1, 0.2], TypeError, r"lr\[0\] is a float"), (torch.rand(3), ValueError, "must have shape"),
    # a float rate that is not finite would make every output NaN / inf, silently
    (float("nan"), ValueError, "lr must be a finite number"),
    (float("-inf"), ValueError, "lr must be a finite number"),
    (10 ** 400, ValueError, "lr must be a finite number"),  # (too large for a double)
])
def test_bad_lr_python_types(bad, exc, pattern):
    p, g = _good()
    with pytest.raises(exc, match=pattern):
        ops.inner_update(p, g, bad)


def test_numpy_rates_are_floats():
    """NumPy scalars are rates like Python floats (float32 ones too, which are not float)."""
    np = pytest.importorskip("numpy")
    p, g = _good()
    want = ops.inner_update(p, g, 0.25)
    for lr in (np.float32(0.25), np.float64(0.25)):
        for a, b in zip(ops.inner_update(p, g, lr), want):
            assert torch.equal(a, b)


def test_bad_list_types():
    p, g = _good()
    with pytest.raises(TypeError, match="params must be a list"):
        ops.inner_update(p[0], g, 0.1)
    with pytest.raises(TypeError, match=r"grads\[1\] is a int"):
        ops.inner_update(p, [g[0], 3], 0.1)


@needs_native
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices_named():
    p, g = _good()
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cpu but grads\[0\] is on cuda"):
        ops.inner_update([p[0].cuda(), p[1]], [g[0].cuda(), g[1].cuda()], 0.1)


@needs_native
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 40e9,
                    reason="needs 40 GB of GPU memory")
def test_over_2_31_elements_cuda():
    n = 2 ** 31 + 1027  # odd: the scalar (unvectorized) path, past 32-bit offsets
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g = torch.full((1, n), 2.0, dtype=torch.bfloat16, device="cuda")
    g[0, -5:] = 4.0
    with pymeta.use_backend("native"):
        out = ops.inner_update([p], [g], 0.25)[0]
    assert out.shape == (1, n)
    assert out[0, :8].float().eq(0.5).all() and out[0, -5:].float().eq(0.0).all()
    assert out[0, 2 ** 31 - 4: 2 ** 31 + 4].float().eq(0.5).all()
    del out, p, g
    torch.cuda.empty_cache()


@needs_native
@pytest.mark.parametrize("batched", ["grads", "params_shared", "params_per_task", "lr"])
def test_vmap_matches_loop(device, batched):
    """torch.func.vmap over an extra batch dimension B of the native op."""
    B, T = 3, 4
    g = torch.Generator().manual_seed(1)

    def r(*s):
        return torch.randn(s, generator=g, dtype=torch.float64).to(device)

    shapes = [(2, 3), (5,)]
    grads = [r(B, T, *s) if batched != "lr" else r(T, *s) for s in shapes]
    if batched == "params_shared":
        params = [r(B, *s) for s in shapes]
    elif batched == "params_per_task":
        params = [r(B, T, *s) for s in shapes]
    else:
        params = [r(*s) for s in shapes]
    lrs = [r(B, *s).abs() for s in shapes] if batched == "lr" else [r(*s).abs() for s in shapes]
    in_dims = (
        [0 if batched.startswith("params") else None] * 2,
        [0 if batched != "lr" else None] * 2,
        [0 if batched == "lr" else None] * 2,
    )

    def f(ps, gs, ls):
        return ops.inner_update(ps, gs, ls)

    with pymeta.use_backend("native"):
        got = torch.func.vmap(f, in_dims=in_dims)(params, grads, lrs)
    for b in range(B):
        pick = lambda xs, d: [x[b] if d is not None else x for x, d in zip(xs, d)]
        want = reference.inner_update(pick(params, in_dims[0]), pick(grads, in_dims[1]),
                                      pick(lrs, in_dims[2]), 0.0)
        for o, w in zip(got, want):
            assert_close(o[b], w, rtol=1e-12, atol=1e-12)


@needs_native
def test_compile_takes_a_float_rate_as_graph_input():
    """A float lr passed into a compiled function may be a SymFloat: the front's check steps
    aside there, and fullgraph compiles (as it did before the check)."""
    p, g = _good()
    step = torch.compile(lambda p, g, lr: ops.inner_update(p, g, lr), fullgraph=True,
                         backend="aot_eager")
    with pymeta.use_backend("native"):
        for lr in (0.25, 0.5):
            for a, b in zip(step(p, g, lr), ops.inner_update(p, g, lr)):
                torch.testing.assert_close(a, b)
