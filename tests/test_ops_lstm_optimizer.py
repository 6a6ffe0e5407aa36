"""pymeta.ops.lstm_optimizer_step: native kernels vs an oracle built from nn.LSTMCell,
gradients, registrations (opcheck, torch.compile), argument errors, determinism."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pymeta
from pymeta import _backend, ops, reference

native_only = pytest.mark.skipif(not _backend.NATIVE, reason="pymeta._C is not built")
cuda = [pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
OP = torch.ops.pymeta.lstm_optimizer_step if _backend.NATIVE else None
BWD = torch.ops.pymeta.lstm_optimizer_step_backward if _backend.NATIVE else None


def make_grad(n: int, dtype=torch.float64, device="cpu", seed=0) -> torch.Tensor:
    """Magnitudes 1e-10 .. 1e2 (both preprocessing branches), both signs, exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    mag = 10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 12 - 10)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    g = mag * sign
    g[::7] = 0.0
    return g.to(device=device, dtype=dtype)


def make_net(H: int, preprocessing="log_sign", dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    net = pymeta.LSTMOptimizerNet(H, preprocessing).to(device=device, dtype=dtype)
    with torch.no_grad():  # larger than the default init, so that every gate matters
        for prm in net.parameters():
            prm.uniform_(-0.7, 0.7)
    return net


def oracle_step(net: pymeta.LSTMOptimizerNet, grad: torch.Tensor, state: torch.Tensor):
    """The step from the nn modules themselves, with the preprocessing written out."""
    if net.preprocessing == "log_sign":
        p = net.p
        big = grad.abs() >= math.exp(-p)
        safe = torch.where(big, grad.abs(), torch.ones_like(grad))
        x = torch.stack([torch.where(big, safe.log() / p, torch.full_like(grad, -1.0)),
                         torch.where(big, grad.sign(), grad * math.exp(p))], dim=1)
    else:
        x = grad[:, None]
    h1, c1, h2, c2 = (s.t() for s in state)
    h1, c1 = net.cell1(x, (h1, c1))
    h2, c2 = net.cell2(h1, (h2, c2))
    update = net.out(h2).squeeze(1) * net.out_scale
    return update, torch.stack([h1.t(), c1.t(), h2.t(), c2.t()])


def tol(dtype):
    return dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


# ---- forward and backward vs the oracle -------------------------------------------------------

@native_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H", [1, 7, 20, 32, 64])
@pytest.mark.parametrize("preprocessing", ["log_sign", "none"])
def test_step_matches_lstmcell_oracle(device, dtype, H, preprocessing):
    N = 301  # not a multiple of the SIMD width, more than one CPU block
    net = make_net(H, preprocessing, dtype, device)
    grad = make_grad(N, dtype, device)
    if preprocessing == "none":
        grad = grad.clamp(-3, 3)
    state = (torch.randn(4, H, N, dtype=torch.float64) * 0.5).to(device=device, dtype=dtype)
    leaves = [grad, state, *net.weights()]
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    with pymeta.use_backend("native"):
        u, s = ops.lstm_optimizer_step(*leaves, preprocessing, net.p, net.out_scale)
    with torch.no_grad():
        for dst, src in zip(net.weights(), leaves[2:]):
            dst.copy_(src)
    oleaves = [leaves[0].detach().clone().requires_grad_(), leaves[1].detach().clone().requires_grad_()]
    u_ref, s_ref = oracle_step(net, oleaves[0], oleaves[1])
    torch.testing.assert_close(u, u_ref, **tol(dtype))
    torch.testing.assert_close(s, s_ref, **tol(dtype))

    du = torch.randn_like(u)
    ds = torch.randn_like(s)
    got = torch.autograd.grad((u, s), leaves, (du, ds))
    want = torch.autograd.grad((u_ref, s_ref), oleaves + list(net.weights()), (du, ds))
    for name, a, b in zip(("grad", "state") + reference.LSTM_WEIGHT_NAMES, got, want):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, **tol(dtype), msg=f"d {name}")


@native_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_preprocessing_branches(dtype):
    """Exact zeros give (-1, 0); the threshold e^-p splits the branches."""
    H, p = 3, 10.0
    g = torch.tensor([0.0, -0.0, 1e-12, -1e-5, 5e-5, -2.0, 100.0], dtype=dtype)
    x = reference.lstm_preprocess(g, "log_sign", p)
    assert x[0].tolist() == [-1.0, 0.0] and x[1].tolist() == [-1.0, 0.0]
    assert x[5, 1].item() == -1.0 and x[6, 1].item() == 1.0
    torch.testing.assert_close(x[6, 0], torch.tensor(math.log(100.0) / p, dtype=dtype))
    torch.testing.assert_close(x[3, 1], torch.tensor(-1e-5 * math.exp(p), dtype=dtype))
    # The kernel agrees, including the gradient w.r.t. grad at 0 (the linear branch: e^p).
    net = make_net(H, dtype=dtype)
    state = torch.zeros(4, H, g.numel(), dtype=dtype)
    gl = g.clone().requires_grad_()
    u, _ = OP(gl, state, *[w.detach() for w in net.weights()], "log_sign", p, 0.1)
    gr = g.clone().requires_grad_()
    ur, _ = reference.lstm_optimizer_step(gr, state, *[w.detach() for w in net.weights()],
                                          "log_sign", p, 0.1)
    torch.testing.assert_close(u, ur, **tol(dtype))
    (d_native,) = torch.autograd.grad(u.sum(), gl)
    (d_ref,) = torch.autograd.grad(ur.sum(), gr)
    assert torch.isfinite(d_native).all()
    torch.testing.assert_close(d_native, d_ref, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                               atol=1e-6 if dtype == torch.float32 else 1e-12)


@native_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H", [7, 20])
def test_saturated_gates_and_nonfinite_grads(device, dtype, H):
    """Gate pre-activations far past the activations' bends (hundreds, c up to 1e30) and
    +-inf grads saturate as the oracle does; NaN grads stay in their coordinates."""
    N = 301
    net = make_net(H, dtype=dtype, device=device)
    with torch.no_grad():
        for prm in net.parameters():
            prm.mul_(40.0)
    grad = make_grad(N, dtype, device, seed=3)
    grad[[10, 100, 250]] = float("inf")
    grad[[11, 101]] = -float("inf")
    grad[[12, 200, 300]] = float("nan")
    state = (torch.randn(4, H, N, dtype=torch.float64) * 20.0)
    state[1, :, ::5] = 1e30  # c1: tanh(c) saturates, and the cell's c too
    state[3, :, 1::5] = -1e30
    state = state.to(device=device, dtype=dtype)
    w = [t.detach() for t in net.weights()]
    u, s = OP(grad, state, *w, "log_sign", net.p, net.out_scale)
    with torch.no_grad():
        # the oracle in float64 from the same (float32) inputs: only the op's rounding is tested
        u_ref, s_ref = oracle_step(copy.deepcopy(net).double(), grad.double(), state.double())
    nan = torch.zeros(N, dtype=torch.bool, device=device)
    nan[[12, 200, 300]] = True
    assert u[nan].isnan().all() and s[:, :, nan].isnan().all()
    assert u[~nan].isfinite().all() and s[:, :, ~nan].isfinite().all()
    assert u_ref[~nan].isfinite().all()
    # float32: the gate sums have ~40 terms of up to ~1.7e3 (weights up to 28, h up to ~60), so
    # ~1e-3 of rounding in a gate, which c = f * 1e30 carries as relative error (a GPU kernel
    # measured 1.08e-3 against a float32 oracle on an H100, 2026-11-26)
    t = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=4e-3, atol=1e-3)
    torch.testing.assert_close(u[~nan].double(), u_ref[~nan], **t)
    torch.testing.assert_close(s[:, :, ~nan].double(), s_ref[:, :, ~nan], **t)

    # The backward (its recompute runs the same activations) at the saturated ends, with the
    # non-finite grads replaced: gradients w.r.t. the state and every weight.
    grad = torch.where(grad.isfinite(), grad, torch.ones_like(grad))
    leaves = [t_.clone().requires_grad_() for t_ in (state, *w)]
    with pymeta.use_backend("native"):
        u, s = ops.lstm_optimizer_step(grad, *leaves, "log_sign", net.p, net.out_scale)
    sl = state.clone().requires_grad_()
    u_ref, s_ref = oracle_step(net, grad, sl)
    du = torch.randn(N, dtype=dtype, device=device)
    ds = torch.randn(s.shape, dtype=dtype, device=device)
    got = torch.autograd.grad((u, s), leaves, (du, ds))
    want = torch.autograd.grad((u_ref, s_ref), [sl, *net.weights()], (du, ds))
    for name, a, b in zip(("state",) + reference.LSTM_WEIGHT_NAMES, got, want):
        assert a.isfinite().all(), name
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, **t, msg=f"d {name}")


@native_only
def test_empty():
    net = make_net(5)
    g = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    state = torch.zeros(4, 5, 0, dtype=torch.float64)
    u, s = ops.lstm_optimizer_step(g, state, *net.weights())
    assert u.shape == (0,) and s.shape == (4, 5, 0)
    grads = torch.autograd.grad(u.sum() + s.sum(), list(net.parameters()))
    assert all((x == 0).all() for x in grads)


# ---- gradcheck, opcheck, torch.compile --------------------------------------------------------

def _small_inputs(H=3, N=5, preprocessing="log_sign", seed=0):
    net = make_net(H, preprocessing, seed=seed)
    grad = torch.tensor([0.5, -2.0, 1e-6, 0.0, -3e-5], dtype=torch.float64)[:N]
    state = torch.randn(4, H, N, dtype=torch.float64) * 0.5
    return [grad, state, *[w.detach().clone() for w in net.weights()]]


@native_only
@pytest.mark.parametrize("preprocessing", ["log_sign", "none"])
def test_gradcheck_every_input(preprocessing):
    inputs = [t.requires_grad_() for t in _small_inputs(preprocessing=preprocessing)]

    def f(*ts):
        with pymeta.use_backend("native"):
            return ops.lstm_optimizer_step(*ts, preprocessing, 10.0, 0.3)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-7, atol=1e-6)


@native_only
def test_gradgradcheck():
    inputs = [t.requires_grad_() for t in _small_inputs(H=2, N=3)]

    def f(*ts):
        return OP(*ts, "log_sign", 10.0, 0.3)

    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-7, atol=1e-5)


@native_only
@pytest.mark.parametrize("outputs", ["both", "update", "state"])
def test_eager_front_matches_the_registered_autograd(outputs):
    """The front's eager autograd path (an autograd.Function, without the registered path's
    per-call Python costs) and the op's registered formula: the same outputs and gradients, bit
    for bit, also when one output takes no part in the loss (its incoming gradient is None),
    and a second derivative through the front (gradgradcheck)."""
    inputs = _small_inputs(H=5, N=5)
    results = []
    for front in (True, False):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with pymeta.use_backend("native"):
            fn = ops.lstm_optimizer_step if front else OP
            u, s = fn(*leaves, "log_sign", 10.0, 0.3)
        assert (type(u.grad_fn).__name__ == "_LstmStepFunctionBackward") == front
        loss = {"both": u.sum() + (s * s).sum(), "update": (u * u).sum(), "state": s.sum()}[outputs]
        results.append((u, s, *torch.autograd.grad(loss, leaves)))
    for a, b in zip(*results):
        assert torch.equal(a, b)

    small = [t.requires_grad_() for t in _small_inputs(H=2, N=3)]

    def f(*ts):
        with pymeta.use_backend("native"):
            return ops.lstm_optimizer_step(*ts, "log_sign", 10.0, 0.3)

    assert torch.autograd.gradgradcheck(f, small, eps=1e-7, atol=1e-5)


@native_only
def test_eager_front_without_recorded_gradients(monkeypatch):
    """Where no gradient is recorded (no_grad, or no input requiring grad) the front calls the
    kernel below autograd (ops._below_autograd): the registered op's bits, and outputs without
    history. So does the Function's forward, and a backward without create_graph; with
    create_graph the backward takes the registered formula (its gradient then has a history:
    the double backward)."""
    calls = []
    below = ops._below_autograd
    monkeypatch.setattr(ops, "_below_autograd",
                        lambda op, args: calls.append(op.__name__) or below(op, args))
    inputs = _small_inputs(H=4, N=5)
    with pymeta.use_backend("native"):
        want = OP(*inputs, "log_sign", 10.0, 0.3)
        plain = ops.lstm_optimizer_step(*inputs, "log_sign", 10.0, 0.3)
        leaves = [t.clone().requires_grad_() for t in inputs]
        with torch.no_grad():
            off = ops.lstm_optimizer_step(*leaves, "log_sign", 10.0, 0.3)
        assert calls == ["lstm_optimizer_step"] * 2
        for got in (plain, off):
            assert all(torch.equal(a, b) and a.grad_fn is None and not a.requires_grad
                       for a, b in zip(got, want))
        u, s = ops.lstm_optimizer_step(*leaves, "log_sign", 10.0, 0.3)
        assert calls[2:] == ["lstm_optimizer_step"]  # the Function's forward
        g1 = torch.autograd.grad(u.sum() + s.sum(), leaves[2], retain_graph=True)[0]
        assert calls[3:] == ["lstm_optimizer_step_backward"]
        g2 = torch.autograd.grad(u.sum() + s.sum(), leaves[2], create_graph=True)[0]
        assert len(calls) == 4  # recorded: through the registered op
    assert torch.equal(g1, g2) and g1.grad_fn is None and g2.grad_fn is not None


@native_only
def test_eager_front_under_functorch_transforms():
    """Under torch.func transforms whose inputs are unrelated to the step (weights are plain
    requires_grad leaves), the front keeps the registered op: an autograd.Function that sets
    up in forward would be refused there. Same values as outside the transform."""
    grad, state, *weights = _small_inputs(H=3, N=5)
    weights = [w.requires_grad_() for w in weights]

    def f(x):
        with pymeta.use_backend("native"):
            u, _ = ops.lstm_optimizer_step(grad, state, *weights, "log_sign", 10.0, 0.3)
        return u.sum() * x

    with pymeta.use_backend("native"):
        want = ops.lstm_optimizer_step(grad, state, *weights, "log_sign", 10.0, 0.3)[0].sum()
    xs = torch.arange(3, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(f)(xs), want.detach() * xs)
    torch.testing.assert_close(torch.func.grad(f)(torch.tensor(2.0, dtype=torch.float64)),
                               want.detach())


@native_only
def test_opcheck_forward_and_backward():
    inputs = _small_inputs()
    torch.library.opcheck(OP, (*inputs, "log_sign", 10.0, 0.3))
    torch.library.opcheck(OP, (*[t.clone().requires_grad_() for t in inputs], "log_sign", 10.0, 0.3))
    grad, state = inputs[0], inputs[1]
    bwd_args = (torch.randn(grad.shape, dtype=grad.dtype), torch.randn(state.shape, dtype=state.dtype),
                *inputs, "log_sign", 10.0, 0.3)
    torch.library.opcheck(BWD, bwd_args)
    none_inputs = _small_inputs(preprocessing="none")
    torch.library.opcheck(OP, (*none_inputs, "none", 10.0, 0.3))


@native_only
def test_backward_op_matches_reference_backward():
    inputs = _small_inputs(H=7, N=5)
    du = torch.randn(5, dtype=torch.float64)
    ds = torch.randn(4, 7, 5, dtype=torch.float64)
    got = BWD(du, ds, *inputs, "log_sign", 10.0, 0.3)
    want = reference.lstm_optimizer_step_backward(du, ds, *inputs, "log_sign", 10.0, 0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@native_only
def test_forward_mode_ad_runs_the_reference():
    """No native forward-mode formula: jvp and torch.func.grad get the reference's results."""
    grad, state, *weights = _small_inputs(H=5, N=5)
    t = torch.randn_like(state)

    def f(s, ws):
        return ops.lstm_optimizer_step(grad, s, *ws, "log_sign", 10.0, 0.3)[0]

    with pymeta.use_backend("reference"):
        _, want = torch.func.jvp(lambda s: f(s, weights), (state,), (t,))
        want_g = torch.func.grad(lambda w0: f(state, [w0, *weights[1:]]).sum())(weights[0])
    _, got = torch.func.jvp(lambda s: f(s, weights), (state,), (t,))
    got_g = torch.func.grad(lambda w0: f(state, [w0, *weights[1:]]).sum())(weights[0])
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_g, want_g, rtol=0, atol=0)


@native_only
def test_tangents_of_incoming_gradients_reach_the_backward():
    """Forward-over-reverse with a dual incoming gradient: the same tangent as the reference."""
    grad, state, *weights = _small_inputs(H=4, N=5)
    weights = [w.requires_grad_() for w in weights]
    tangents = []
    for backend in ("native", "reference"):
        with pymeta.use_backend(backend):
            update, _ = ops.lstm_optimizer_step(grad, state, *weights, "log_sign", 10.0, 0.3)
            with torch.autograd.forward_ad.dual_level():
                v = torch.autograd.forward_ad.make_dual(torch.ones(5, dtype=torch.float64),
                                                        torch.arange(5, dtype=torch.float64))
                (dw,) = torch.autograd.grad(update, weights[0], v)
                tangents.append(torch.autograd.forward_ad.unpack_dual(dw).tangent)
    assert tangents[1] is not None and tangents[1].abs().sum() > 0
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)


@native_only
def test_torch_compile_fullgraph():
    net = make_net(6, dtype=torch.float32)
    grad = make_grad(40, torch.float32)
    state = torch.randn(4, 6, 40)

    def step(g, s, *w):
        u, s2 = ops.lstm_optimizer_step(g, s, *w, "log_sign", 10.0, 0.1)
        return u * 2, s2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    w = [x.detach().clone().requires_grad_() for x in net.weights()]
    with pymeta.use_backend("native"):
        u, s = compiled(grad, state, *w)
        u_e, s_e = step(grad, state, *w)
    torch.testing.assert_close(u, u_e)
    torch.testing.assert_close(s, s_e)
    g1 = torch.autograd.grad(u.sum() + s.sum(), w)
    g2 = torch.autograd.grad(u_e.sum() + s_e.sum(), w)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ---- argument errors: both backends, named argument, inputs untouched --------------------------

def _valid(H=4, N=6, dtype=torch.float32):
    net = make_net(H, dtype=dtype)
    return {"grad": make_grad(N, dtype), "state": torch.randn(4, H, N, dtype=dtype),
            **{n: w.detach().clone() for n, w in zip(reference.LSTM_WEIGHT_NAMES, net.weights())}}


def _bad_cases():
    cases = [
        ("grad", lambda a: a["grad"].half(), TypeError, "grad has dtype"),
        ("grad", lambda a: a["grad"].to(torch.int64), TypeError, "grad has dtype"),
        ("grad", lambda a: a["grad"].view(2, 3), ValueError, "grad must be 1-D"),
        ("state", lambda a: a["state"][:, :, :5].contiguous(), ValueError, "state has shape"),
        ("state", lambda a: a["state"].reshape(4, 6, 4), ValueError, "state has shape"),
        ("state", lambda a: a["state"].double(), TypeError, "state has dtype"),
        ("state", lambda a: a["state"].transpose(1, 2).contiguous().transpose(1, 2),
         ValueError, "state must be contiguous"),
        ("state", lambda a: torch.zeros(4, 65, 6), ValueError, "hidden size H = 65"),
        # the blocked layout [ceil(N / 16), 4, H, 16]: N = 6 is one block
        ("state", lambda a: torch.zeros(2, 4, 4, 16), ValueError, r"state has shape.*\[1, 4, H, 16\]"),
        ("state", lambda a: torch.zeros(1, 4, 4, 8), ValueError, "state has shape"),
        ("state", lambda a: torch.zeros(1, 3, 4, 16), ValueError, "state has shape"),
        ("state", lambda a: torch.zeros(1, 4, 16, 4).transpose(2, 3), ValueError,
         r"state must be contiguous \(layout \[ceil\(N / 16\), 4, H, 16\], blocked"),
        ("state", lambda a: torch.zeros(1, 4, 65, 16), ValueError, r"H = 65 \(state.shape\[2\]"),
    ]
    for name in reference.LSTM_WEIGHT_NAMES:
        cases.append((name, lambda a, n=name: a[n].double(), TypeError, f"{name} has dtype"))
        cases.append((name, lambda a, n=name: torch.cat([a[n], a[n][:1]]), ValueError,
                      f"{name} has shape"))
    return cases


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: f"{c[0]}-{c[3]}")
def test_bad_argument_names_it(backend, case):
    name, mutate, exc, msg = case
    args = _valid()
    args[name] = mutate(args)
    before = {k: v.clone() for k, v in args.items()}
    with pymeta.use_backend(backend), pytest.raises(exc, match=msg):
        ops.lstm_optimizer_step(*args.values())
    for k, v in args.items():
        assert torch.equal(v, before[k]), f"{k} was modified"


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
def test_bad_options(backend):
    args = list(_valid().values())
    with pymeta.use_backend(backend):
        with pytest.raises(ValueError, match="preprocessing must be 'log_sign' or 'none'"):
            ops.lstm_optimizer_step(*args, preprocessing="log")
        with pytest.raises(ValueError, match="p must be a finite number > 0"):
            ops.lstm_optimizer_step(*args, p=0.0)
        with pytest.raises(ValueError, match="w_ih1 has shape"):  # n_in = 1 for 'none'
            ops.lstm_optimizer_step(*args, preprocessing="none")
        with pytest.raises(TypeError, match="state is a list"):
            ops.lstm_optimizer_step(args[0], [1.0], *args[2:])


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
@pytest.mark.parametrize("kw,exc,msg", [
    ({"out_scale": float("nan")}, ValueError, "out_scale must be a finite number"),
    ({"out_scale": float("inf")}, ValueError, "out_scale must be a finite number"),
    ({"out_scale": True}, TypeError, "out_scale must be a real number, not bool"),
    ({"p": True}, TypeError, "p must be a real number, not bool"),
    ({"p": "10"}, TypeError, "p must be a real number, not str"),
    ({"p": None}, TypeError, "p must be a real number, not NoneType"),
    ({"p": float("nan")}, ValueError, "p must be a finite number"),
    # e^-p below float32's normal range: e^p overflows (90) or a zero grad takes the log
    # branch once e^-p flushes to zero (NaN either way)
    ({"p": 87.4}, ValueError, r"p = 87.4 is too large for float32 math.*p <= 87.33"),
    ({"p": 90.0}, ValueError, r"p = 90(\.0)? is too large for float32 math"),
])
def test_bad_scalars_name_the_argument(backend, kw, exc, msg):
    args = list(_valid().values())
    with pymeta.use_backend(backend), pytest.raises(exc, match=msg):
        ops.lstm_optimizer_step(*args, **kw)


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
def test_p_up_to_the_bound_stays_finite(backend):
    """The largest p each dtype takes gives finite outputs, zero and tiny grads included (at
    p = 90 in float32 e^p was inf and a zero grad's input 0 * inf = NaN); float64 takes 90, and
    stops at 708.39."""
    for dtype, p in ((torch.float32, 87.33), (torch.float64, 90.0), (torch.float64, 708.39)):
        args = list(_valid(dtype=dtype).values())
        args[0] = torch.tensor([0.0, -0.0, 1e-38, -1e-30, 1.0, -2.5], dtype=dtype)
        with pymeta.use_backend(backend):
            update, new_state = ops.lstm_optimizer_step(*args, p=p)
        assert torch.isfinite(update).all() and torch.isfinite(new_state).all(), (dtype, p)
    with pymeta.use_backend(backend), pytest.raises(ValueError, match="too large for float64"):
        ops.lstm_optimizer_step(*list(_valid(dtype=torch.float64).values()), p=708.4)
    args = list(_valid().values())
    with pymeta.use_backend(backend):  # p is unused without log_sign: any real number goes
        net = make_net(4, preprocessing="none", dtype=torch.float32)
        ops.lstm_optimizer_step(args[0], args[1], *net.weights(), preprocessing="none",
                                p=float("nan"))


@native_only
def test_op_checks_its_scalars():
    """The registered ops check them too (callers of torch.ops.pymeta, below the front)."""
    args = list(_valid().values())
    for fn, extra in ((OP, ()), (BWD, (args[0].clone(), args[1].clone()))):
        with pytest.raises(ValueError, match="out_scale must be a finite number"):
            fn(*extra, *args, "log_sign", 10.0, float("nan"))
        with pytest.raises(ValueError, match=r"p = 100(\.0)? is too large for float32"):
            fn(*extra, *args, "log_sign", 100.0, 0.1)


@native_only
def test_backward_op_checks_its_gradients():
    args = list(_valid().values())
    grad, state = args[0], args[1]
    for fn in (BWD, reference.lstm_optimizer_step_backward):
        with pytest.raises(ValueError, match="grad_update has shape"):
            fn(grad[:3], state, *args, "log_sign", 10.0, 0.1)
        with pytest.raises(TypeError, match="grad_new_state has dtype"):
            fn(grad, state.double(), *args, "log_sign", 10.0, 0.1)
    # the fake kernel (torch.compile traces with it) checks them as well
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fargs = [mode.from_tensor(t) for t in args]
        with pytest.raises(TypeError, match="grad_update has dtype"):
            BWD(fargs[0].double(), fargs[1], *fargs, "log_sign", 10.0, 0.1)
        with pytest.raises(TypeError, match="grad_new_state has dtype"):
            BWD(fargs[0], fargs[1].double(), *fargs, "log_sign", 10.0, 0.1)
        with pytest.raises(ValueError, match="grad_new_state has shape"):
            BWD(fargs[0], fargs[1][:, :, :2], *fargs, "log_sign", 10.0, 0.1)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
def test_device_mismatch_is_named(device, backend):
    args = _valid()
    args["w_hh2"] = args["w_hh2"].to(device)
    with pymeta.use_backend(backend), pytest.raises(ValueError, match="w_hh2 is on"):
        ops.lstm_optimizer_step(*args.values())


# ---- the blocked state layout [ceil(N / 16), 4, H, 16] -------------------------------------------

def _blocked_inputs(H, N, dtype=torch.float64, state_dtype=None, device="cpu", seed=0):
    """(grad [N], blocked state, weights) and the feature-major problem it is defined as:
    (grad padded by zeros to 16 ceil(N / 16), the state of those coordinates [4, H, 16 B]).
    Padding coordinates get random state of their own (not zeros), NaN grads at 3 and N - 1."""
    net = make_net(H, dtype=dtype, seed=seed)
    B = (N + 15) // 16
    gen = torch.Generator().manual_seed(seed + 1)
    fm = (torch.randn(4, H, 16 * B, generator=gen, dtype=torch.float64) * 0.5).to(
        device=device, dtype=state_dtype or dtype)
    grad = make_grad(N, dtype, device, seed)
    grad[[min(3, N - 1), N - 1]] = float("nan")
    weights = [w.detach().clone().to(device) for w in net.weights()]
    blocked = fm.reshape(4, H, B, 16).permute(2, 0, 1, 3).contiguous()
    grad_pad = torch.cat([grad, grad.new_zeros(16 * B - N)])
    return (grad, blocked, *weights), (grad_pad, fm, *weights)


def _same_bits(a, b):
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))


@native_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, "bf16_state"])
@pytest.mark.parametrize("H", [7, 20, 32])
@pytest.mark.parametrize("N", [1, 16, 37, 1000])
def test_blocked_state_is_the_padded_feature_major_step(device, dtype, H, N):
    """A blocked state gives, bit for bit, the feature-major step on the padded problem: update
    [:N], new_state re-blocked (padding coordinates stepped with a zero grad, their state
    written); and the reference agrees within tolerance."""
    state_dtype = torch.bfloat16 if dtype == "bf16_state" else None
    dtype = torch.float32 if dtype == "bf16_state" else dtype
    blk, fm = _blocked_inputs(H, N, dtype, state_dtype, device)
    _poison_allocator([blk[0], blk[1]])
    u, ns = OP(*blk, "log_sign", 10.0, 0.1)
    u_fm, ns_fm = OP(*fm, "log_sign", 10.0, 0.1)
    assert _same_bits(u, u_fm[:N].contiguous())
    assert _same_bits(ns, reference.lstm_state_to_blocked(ns_fm))
    assert torch.equal(reference.lstm_state_to_feature_major(blk[1]), fm[1])
    u_ref, ns_ref = reference.lstm_optimizer_step(*blk, "log_sign", 10.0, 0.1)
    t = tol(dtype) if state_dtype is None else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(u, u_ref, **t, equal_nan=True)
    torch.testing.assert_close(ns.float(), ns_ref.float(), **t, equal_nan=True)


@native_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_blocked_state_backward_is_the_padded_feature_major_backward(device, state_dtype):
    """The backward op on a blocked state (float32 or bfloat16): the feature-major backward on
    the padded problem (d_grad [:N], d_state re-blocked, the weights' gradients summed over
    padding coordinates too), bit for bit; and gradients through ops.lstm_optimizer_step match
    the reference's."""
    H, N = 20, 37
    blk, fm = _blocked_inputs(H, N, torch.float32, state_dtype, device=device)
    blk[0][:] = torch.nan_to_num(blk[0])
    fm[0][:N] = blk[0]
    du = torch.randn(N, device=device)
    ds = torch.randn(blk[1].shape, device=device).to(blk[1].dtype)
    got = BWD(du, ds, *blk, "log_sign", 10.0, 0.1)
    want = BWD(torch.cat([du, du.new_zeros(16 * 3 - N)]),
               reference.lstm_state_to_feature_major(ds), *fm, "log_sign", 10.0, 0.1)
    assert got[1].dtype == blk[1].dtype
    assert _same_bits(got[0], want[0][:N].contiguous())
    assert _same_bits(got[1], reference.lstm_state_to_blocked(want[1]))
    for a, b in zip(got[2:], want[2:]):
        assert _same_bits(a, b)
    if state_dtype is not None:
        return  # (the reference comparison below is float32's)

    def loss(backend, *ts):
        with pymeta.use_backend(backend):
            u, ns = ops.lstm_optimizer_step(*ts, "log_sign", 10.0, 0.1)
        return (u * du).sum() + (ns * ds).sum()

    leaves = [t.clone().requires_grad_() for t in blk]
    g_native = torch.autograd.grad(loss("native", *leaves), leaves)
    g_ref = torch.autograd.grad(loss("reference", *leaves), leaves)
    for a, b in zip(g_native, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@native_only
def test_blocked_state_gradcheck_opcheck_compile():
    """float64 gradcheck of every input through a blocked state (N = 5: 11 padding coordinates),
    opcheck of both ops with it, and torch.compile (the fake kernels keep the state's shape)."""
    flat = _small_inputs()
    blocked = reference.lstm_state_to_blocked(flat[1])
    inputs = [t.clone().requires_grad_() for t in [flat[0], blocked, *flat[2:]]]

    def f(*ts):
        with pymeta.use_backend("native"):
            return ops.lstm_optimizer_step(*ts, "log_sign", 10.0, 0.3)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-7, atol=1e-6)
    plain = [t.detach() for t in inputs]
    torch.library.opcheck(OP, (*plain, "log_sign", 10.0, 0.3))
    torch.library.opcheck(BWD, (torch.randn(5, dtype=torch.float64),
                                torch.randn(blocked.shape, dtype=torch.float64), *plain,
                                "log_sign", 10.0, 0.3))
    compiled = torch.compile(lambda *ts: OP(*ts, "log_sign", 10.0, 0.3), fullgraph=True)
    for a, b in zip(compiled(*plain), OP(*plain, "log_sign", 10.0, 0.3)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
@pytest.mark.parametrize("N", [5, 16, 40])
def test_blocked_outputs_and_conversions_are_their_own_tensors(backend, N):
    """new_state (one block or more) and d_state are tensors of their own, not views of a
    temporary, so that in-place edits work under autograd; the reference conversions copy."""
    flat = _small_inputs(H=3, N=5)
    grad = make_grad(N)
    state = reference.lstm_state_to_blocked(torch.randn(4, 3, N, dtype=torch.float64))
    leaves = [t.clone().requires_grad_() for t in [grad, state, *flat[2:]]]
    with pymeta.use_backend(backend):
        u, ns = ops.lstm_optimizer_step(*leaves, "log_sign", 10.0, 0.3)
    assert ns._base is None and ns.is_contiguous()
    ns.mul_(0.5)  # an in-place edit of the output, recorded by autograd
    d_state, = torch.autograd.grad(u.sum() + ns.sum(), [leaves[1]])
    assert d_state.shape == state.shape
    if backend == "native":  # the backward op's d_state output
        outs = BWD(torch.ones_like(grad), torch.ones_like(state), grad, state, *flat[2:],
                   "log_sign", 10.0, 0.3)
        assert outs[1].shape == state.shape and outs[1]._base is None
    fm = torch.randn(4, 3, 16, dtype=torch.float64)
    for conv, x in ((reference.lstm_state_to_blocked, fm),
                    (reference.lstm_state_to_feature_major, reference.lstm_state_to_blocked(fm))):
        y = conv(x)
        before = x.clone()
        y.zero_()
        assert torch.equal(x, before), conv.__name__


def test_init_state_layouts():
    net = pymeta.LSTMOptimizerNet(hidden_size=5)
    assert net.init_state(37).shape == (4, 5, 37)
    blocked = net.init_state(37, layout="blocked")
    assert blocked.shape == (3, 4, 5, 16) and not blocked.any()
    assert net.init_state(0, layout="blocked").shape == (0, 4, 5, 16)
    with pytest.raises(ValueError, match="layout must be 'feature_major' or 'blocked'"):
        net.init_state(3, layout="row_major")
    grad = make_grad(37, torch.float32)
    u_fm, s_fm = net(grad, net.init_state(37))
    u_b, s_b = net(grad, blocked)
    torch.testing.assert_close(u_b, u_fm, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(reference.lstm_state_to_feature_major(s_b)[:, :, :37], s_fm,
                               rtol=1e-6, atol=1e-7)


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H,form", [(7, "default"), (20, "default"), (20, "direct"),
                                    (20, "staged"), (20, "staged_sync"), (32, "default")])
@pytest.mark.parametrize("N", [40, 100_003, 300_000])
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_blocked_kernels_same_bits(H, form, N, bf16, monkeypatch):
    """The tensor-core forward on a blocked state (kBlk: H 17..20 and 25..32) gives the bits of
    the feature-major forward on the padded problem, NaN grads included, every output element
    written (outputs from a NaN-poisoned allocator): by default the staged kernel at H 17..20
    where 16-byte copies apply (aligned pointers, any N: at N = 100,003 the grad's last chunk
    is a partial copy) and every SM gets a block step, else the direct one;
    PYMETA_LSTM_BLK_STAGED=0 the direct kernel; =1 the staged one at H 17..20, and with
    PYMETA_LSTM_SYNC=1 its float32 sync form. Elsewhere the op converts (no blocked kernel
    runs)."""
    for key in ("PYMETA_LSTM_OFF32", "PYMETA_LSTM_MMA", "PYMETA_LSTM_SYNC_WARPS",
                "PYMETA_LSTM_MMA_STAGED", "PYMETA_LSTM_SYNC", "PYMETA_LSTM_BLK_STAGED"):
        monkeypatch.delenv(key, raising=False)
    blk, fm = _blocked_inputs(H, N, torch.float32, torch.bfloat16 if bf16 else None, "cuda")
    want_u, want_ns = OP(*fm, "log_sign", 10.0, 0.1)
    switches = {}
    if form != "default":
        switches["PYMETA_LSTM_BLK_STAGED"] = "0" if form == "direct" else "1"
    if form == "staged_sync":
        switches["PYMETA_LSTM_SYNC"] = "1"
    (u, ns), names = _forward_kernels_under(list(blk), monkeypatch, **switches)
    assert _same_bits(u, want_u[:N].contiguous())
    assert _same_bits(ns, reference.lstm_state_to_blocked(want_ns))
    native = 17 <= H <= 20 or 25 <= H <= 32
    if form == "default":  # (N = 40: one block step, fewer than the SMs)
        staged = 17 <= H <= 20 and N > 40
    else:
        staged = form != "direct" and 17 <= H <= 20
    sync = staged and form == "staged_sync" and not bf16
    assert names, names
    ran = [n for n in names if ", false, true>" in n]  # kOff32 = false, kBlk = true
    if not native:
        assert not ran, names
        return
    assert ran == names, names
    assert all(("staged" in n) == staged and ("sync" in n) == sync for n in names), names


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H", [17, 22, 27])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("offset", [False, True])
def test_cuda_blocked_partial_hidden_sizes_and_offsets(H, bf16, offset, monkeypatch):
    """Blocked states at H below their kernel's size (17 in HB = 20, 27 in HB = 32), at H 22
    (HB = 24: no blocked kernel, the op converts) and at a storage offset of one element (no
    16-byte copies: the direct kernel by default; with PYMETA_LSTM_BLK_STAGED=1 a float32 state
    takes the staged kernel's 4-byte copies): the bits of the padded feature-major step."""
    for key in ("PYMETA_LSTM_OFF32", "PYMETA_LSTM_MMA", "PYMETA_LSTM_SYNC_WARPS",
                "PYMETA_LSTM_MMA_STAGED", "PYMETA_LSTM_SYNC", "PYMETA_LSTM_BLK_STAGED"):
        monkeypatch.delenv(key, raising=False)
    N = 300_000
    blk, fm = _blocked_inputs(H, N, torch.float32, torch.bfloat16 if bf16 else None, "cuda")
    blk = list(blk)
    if offset:
        buf = torch.empty(blk[1].numel() + 1, device="cuda", dtype=blk[1].dtype)
        blk[1] = buf[1:].view(blk[1].shape).copy_(blk[1])
    want_u, want_ns = OP(*fm, "log_sign", 10.0, 0.1)
    (u, ns), names = _forward_kernels_under(blk, monkeypatch)
    assert _same_bits(u, want_u[:N].contiguous())
    assert _same_bits(ns, reference.lstm_state_to_blocked(want_ns))
    ran = [n for n in names if ", false, true>" in n]
    if H == 22:
        assert names and not ran, names
    else:
        assert names and ran == names, names
        assert all(("staged" in n) == (H <= 20 and not offset) for n in names), names
    if offset and H <= 20 and not bf16:
        (u, ns), names = _forward_kernels_under(blk, monkeypatch, PYMETA_LSTM_BLK_STAGED="1")
        assert _same_bits(u, want_u[:N].contiguous())
        assert _same_bits(ns, reference.lstm_state_to_blocked(want_ns))
        assert names and all("staged" in n for n in names), names


# ---- determinism ------------------------------------------------------------------------------

@native_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, "bf16_state", "bf16_chunks"])
def test_backward_bitwise_deterministic(device, dtype, monkeypatch):
    H, N = 20, 5000
    if dtype in ("bf16_state", "bf16_chunks"):  # float32 math; chunks: summed in chunk order
        monkeypatch.setenv("PYMETA_LSTM_BF16_CHUNK", "700")
        if dtype == "bf16_chunks":
            monkeypatch.setenv("PYMETA_LSTM_BF16_NATIVE", "0")
        inputs = _bf16_inputs(H, N, device)
        du = torch.randn(N, device=device)
        ds = torch.randn(4, H, N, device=device).bfloat16()
    else:
        inputs = [t.to(device=device, dtype=dtype) for t in _valid(H, N).values()]
        du = torch.randn(N, dtype=dtype, device=device)
        ds = torch.randn(4, H, N, dtype=dtype, device=device)
    runs = [BWD(du, ds, *inputs, "log_sign", 10.0, 0.1) for _ in range(2)]
    if device == "cpu":  # the reduction order does not depend on the thread count either
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            runs.append(BWD(du, ds, *inputs, "log_sign", 10.0, 0.1))
        finally:
            torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


@native_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,G", [(40_003, 512), (262_401, 2048)])
def test_cpu_backward_sums_groups_of_blocks_in_order(dtype, N, G):
    """The CPU backward keeps its weight-gradient partials per group of blocks of 128
    coordinates: at N = 40003 4 blocks (512 coordinates; the last group is one partial block),
    at N = 262401 16 (the most: 2048 coordinates). Each weight gradient is the ordered sum, over the groups, of what the op gives on the
    group's coordinates alone (bit for bit), whatever the thread count, and it matches the
    reference."""
    H = 20
    inputs = [t.to(dtype) for t in _valid(H, N, torch.float64).values()]
    du = torch.randn(N, dtype=dtype)
    ds = torch.randn(4, H, N, dtype=dtype)
    full = BWD(du, ds, *inputs, "log_sign", 10.0, 0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        other = BWD(du, ds, *inputs, "log_sign", 10.0, 0.1)
    finally:
        torch.set_num_threads(threads)
    want = [torch.zeros_like(w) for w in inputs[2:]]
    for n0 in range(0, N, G):
        n1 = min(n0 + G, N)
        part = BWD(du[n0:n1], ds[:, :, n0:n1].contiguous(), inputs[0][n0:n1],
                   inputs[1][:, :, n0:n1].contiguous(), *inputs[2:], "log_sign", 10.0, 0.1)
        assert torch.equal(part[0], full[0][n0:n1]) and torch.equal(part[1], full[1][:, :, n0:n1])
        want = [a + b for a, b in zip(want, part[2:])]
    for a, b, c in zip(full[2:], want, other[2:]):
        assert torch.equal(a, b) and torch.equal(a, c)
    ref = reference.lstm_optimizer_step_backward(du.double(), ds.double(),
                                                 *(t.double() for t in inputs), "log_sign", 10.0, 0.1)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3)
    for a, r in zip(full[2:], ref[2:]):
        scale = r.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.double() / scale, r / scale, **tol)


# ---- bfloat16 state storage ---------------------------------------------------------------------

def _bf16_inputs(H, N, device="cpu", seed=0):
    """float32 grad (with zeros, tiny and huge values) and weights, a bfloat16 state."""
    args = _valid(H, N)
    gen = torch.Generator().manual_seed(seed)
    args["grad"] = make_grad(N, torch.float32, seed=seed)
    args["state"] = (torch.randn(4, H, N, generator=gen) * 0.8).bfloat16()
    return [t.to(device) for t in args.values()]


BF16_PATHS = {"direct": {}, "chunks": {"PYMETA_LSTM_BF16_NATIVE": "0"},
              "no_mma": {"PYMETA_LSTM_MMA": "0"}}  # no_mma: the GPU's no-kernel fallback


def _bf16_path(device, path, monkeypatch):
    if path == "no_mma" and device == "cpu":
        pytest.skip("PYMETA_LSTM_MMA selects a GPU kernel")
    for k, v in BF16_PATHS[path].items():
        monkeypatch.setenv(k, v)


def _bf16_backward_direct(device, path, H):
    """Whether the backward reads a bfloat16 state itself (no chunks): on the CPU by default;
    on the GPU unless PYMETA_LSTM_BF16_NATIVE=0, where the CUDA-core pass's float weights fit in
    shared memory (at H = 64 about 201 KB: an H100 or H200 has 227 KB per block, an A100 163,
    enough up to H = 53)."""
    if path == "chunks":
        return False
    if device == "cpu":
        return path == "direct"
    HP = 16 if H <= 16 else 20 if H <= 20 else 24 if H <= 24 else 32 if H <= 32 else 64
    smem = 4 * (12 * H * HP + 16 * H + HP + 1)  # lstm_smem_layout(H, HP).total floats
    return smem <= torch.cuda.get_device_properties(device).shared_memory_per_block_optin


@native_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", list(BF16_PATHS))
@pytest.mark.parametrize("H,N,chunk", [(20, 1000, None), (7, 1000, "37"), (20, 513, "256"),
                                       (32, 1, "4"), (3, 0, "5"), (64, 77, "16")])
def test_bf16_state_is_the_float32_step_rounded(device, path, H, N, chunk, monkeypatch):
    """A bfloat16 state: forward and backward equal the float32 op on the upcast state, with
    new_state / d_state rounded to bfloat16 (bitwise). "direct": the kernels read and write
    bfloat16 (the CPU forward and backward, the GPU's tensor-core forward and its backward's
    CUDA-core pass; the other GPU forward kernels convert in chunks); "chunks":
    PYMETA_LSTM_BF16_NATIVE=0, every call converts in chunks (across chunk borders here);
    "no_mma": on the GPU, the CUDA-core forward, which does not read bfloat16 (the front
    converts in chunks; the backward still reads it). Where the backward reads bfloat16, its
    weight gradients are the float32 op's bit for bit (the same sums over the same rows)."""
    if chunk is not None:
        monkeypatch.setenv("PYMETA_LSTM_BF16_CHUNK", chunk)
    _bf16_path(device, path, monkeypatch)
    grad, state, *w = _bf16_inputs(H, N, device)
    gen = torch.Generator().manual_seed(1)
    du = torch.randn(N, generator=gen).to(device)
    ds = torch.randn(4, H, N, generator=gen).bfloat16().to(device)
    u, ns = OP(grad, state, *w, "log_sign", 10.0, 0.1)
    u32, ns32 = OP(grad, state.float(), *w, "log_sign", 10.0, 0.1)
    assert ns.dtype == torch.bfloat16 and u.dtype == torch.float32
    assert torch.equal(u, u32) and torch.equal(ns, ns32.bfloat16())
    got = BWD(du, ds, grad, state, *w, "log_sign", 10.0, 0.1)
    want = BWD(du, ds.float(), grad, state.float(), *w, "log_sign", 10.0, 0.1)
    assert got[1].dtype == torch.bfloat16
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1].bfloat16())
    for a, b in zip(got[2:], want[2:]):
        assert a.dtype == torch.float32
        if _bf16_backward_direct(device, path, H):  # the same blocks and sums as float32
            assert torch.equal(a, b)
        else:  # sums over chunks, then the chunks added
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().amax(dim=None).item())
    # and the reference (which computes in float32 and rounds) agrees within a bf16 rounding
    ru, rns = reference.lstm_optimizer_step(grad, state, *w, "log_sign", 10.0, 0.1)
    torch.testing.assert_close(u, ru, **tol(torch.float32))
    torch.testing.assert_close(ns.float(), rns.float(), rtol=2 ** -7, atol=1e-6)
    rb = reference.lstm_optimizer_step_backward(du, ds, grad, state, *w, "log_sign", 10.0, 0.1)
    for a, b in zip(got, rb):
        assert a.dtype == b.dtype
        scale = b.float().abs().amax(dim=None).clamp_min(1.0) if b.numel() else 1.0
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=2 ** -7, atol=1e-5)


@native_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", list(BF16_PATHS))
def test_bf16_state_nan_stays_in_its_coordinates(device, path, monkeypatch):
    monkeypatch.setenv("PYMETA_LSTM_BF16_CHUNK", "64")
    _bf16_path(device, path, monkeypatch)
    H, N = 20, 300
    grad, state, *w = _bf16_inputs(H, N, device)
    grad[[3, 130]] = float("nan")
    state[0, 5, 200] = float("nan")  # an h1 entry: every gate of that coordinate
    u, ns = OP(grad, state, *w, "log_sign", 10.0, 0.1)
    bad = ~u.isfinite()
    assert bad.nonzero().flatten().tolist() == [3, 130, 200]
    assert not (~ns.isfinite()).any(dim=(0, 1))[~bad].any()


@native_only
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_state_inf_h_matches_the_reference(device, monkeypatch):
    """+-Inf in a bfloat16 state's h rows (layers 1 and 2) makes +-Inf gates, as in the
    reference, so update and new_state stay finite for random weights. On the GPU the
    tensor-core forward feeds a bfloat16 h to its products as exact TF32 values (2 mma, no lo
    part). The float32 state's 3xTF32 split gives NaN there instead, since lo(Inf) = Inf - Inf
    (docs/ARCHITECTURE.md); so would a weight that is exactly a TF32 value (Inf * lo = Inf * 0),
    which random float32 weights are not (checked below)."""
    for key in BF16_PATHS["chunks"]:
        monkeypatch.delenv(key, raising=False)
    H, N = 20, 1000
    grad, state, *w = _bf16_inputs(H, N, device)
    for row, unit, n, sign in ((0, 3, 17, 1), (0, 19, 500, -1), (2, 0, 640, 1), (2, 7, 999, -1)):
        state[row, unit, n] = sign * float("inf")
    tf32 = lambda t: t.view(torch.int32) & 0x1FFF == 0  # no lo part (low 13 mantissa bits)
    assert not tf32(w[1][:, [3, 19]].cpu()).any() and not tf32(w[5][:, [0, 7]].cpu()).any()
    u, ns = OP(grad, state, *w, "log_sign", 10.0, 0.1)
    ru, rns = reference.lstm_optimizer_step(grad, state, *w, "log_sign", 10.0, 0.1)
    assert u.isfinite().all() and rns.float()[[1, 3]].isfinite().all()
    torch.testing.assert_close(u, ru, **tol(torch.float32))
    fin = rns.float().isfinite()
    assert torch.equal(ns.float().isfinite(), fin)
    torch.testing.assert_close(ns.float()[fin], rns.float()[fin], rtol=2 ** -7, atol=1e-6)


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H,N,kernel", [
    (20, 10_007, "backward_smem_bf16_kernel<20>"), (7, 3_001, "backward_smem_bf16_kernel<16>"),
    (32, 10_000, "backward_smem_bf16_kernel<32>")])
def test_cuda_bf16_backward_reads_bfloat16(H, N, kernel, monkeypatch):
    """The GPU backward of a bfloat16 state runs the CUDA-core pass on the bfloat16 tensors
    (its float copies of h1_prev / h2_prev in the workspace's shadow rows, read by the
    weight-gradient kernels), not the float32 pass on converted chunks: the profiler shows the
    pass's bfloat16 kernel, and every result equals the float32 op on the upcast tensors bit for
    bit (d_state rounded), weight gradients included, with the tensor-core and the CUDA-core
    weight gradients; a NaN in one coordinate's d_new_state stays in it.
    PYMETA_LSTM_BF16_NATIVE=0 still converts in chunks, and so does a call whose workspace would
    pass PYMETA_LSTM_BF16_DIRECT_MB (1 MiB here)."""
    grad, state, *w = _bf16_inputs(H, N, "cuda", seed=3)
    gen = torch.Generator().manual_seed(4)
    du = torch.randn(N, generator=gen).cuda()
    ds = torch.randn(4, H, N, generator=gen).bfloat16().cuda()
    ds[2, H - 1, 11] = float("nan")  # d h2 of coordinate 11

    def run(state, ds):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = BWD(du, ds, grad, state, *w, "log_sign", 10.0, 0.1)
            torch.cuda.synchronize()
        return out, [e.name for e in prof.events()]

    for wg in (None, "0"):  # the tensor-core weight gradients (default), the CUDA-core ones
        if wg is not None:
            monkeypatch.setenv("PYMETA_LSTM_WG_MMA", wg)
        got, names = run(state, ds)
        want, _ = run(state.float(), ds.float())
        assert any(kernel in n for n in names), sorted(set(names))
        assert got[1].dtype == torch.bfloat16
        # (bits: a NaN is no torch.equal of itself)
        assert _same_bits(got[0], want[0]) and _same_bits(got[1], want[1].bfloat16())
        for a, b in zip(got[2:], want[2:]):
            assert _same_bits(a, b)
        bad = got[0].isnan().nonzero().flatten().tolist()
        assert bad == [11] and not got[1][:, :, :11].isnan().any()
    for env in ({"PYMETA_LSTM_BF16_NATIVE": "0"}, {"PYMETA_LSTM_BF16_DIRECT_MB": "1"}):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        chunked, names = run(state, ds)
        for k in env:
            monkeypatch.delenv(k)
        assert not any("backward_smem_bf16_kernel" in n for n in names), env
        assert _same_bits(chunked[0], got[0]) and _same_bits(chunked[1], got[1])


@native_only
@pytest.mark.parametrize("path", ["direct", "chunks"])
def test_bf16_state_opcheck_and_compile(path, monkeypatch):
    monkeypatch.setenv("PYMETA_LSTM_BF16_CHUNK", "3")
    _bf16_path("cpu", path, monkeypatch)
    grad, state, *w = _bf16_inputs(5, 8)
    torch.library.opcheck(OP, (grad, state, *w, "log_sign", 10.0, 0.3))
    torch.library.opcheck(OP, (grad, state.clone().requires_grad_(),
                               *[x.clone().requires_grad_() for x in w], "log_sign", 10.0, 0.3))
    torch.library.opcheck(BWD, (torch.randn(8), torch.randn(4, 5, 8).bfloat16(), grad, state, *w,
                                "log_sign", 10.0, 0.3))

    def step(g, s, *ws):
        u, s2 = ops.lstm_optimizer_step(g, s, *ws, "log_sign", 10.0, 0.1)
        return u * 2, s2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    wg = [x.clone().requires_grad_() for x in w]
    sg = state.clone().requires_grad_()
    u, s2 = compiled(grad, sg, *wg)
    ue, se = step(grad, sg, *wg)
    assert s2.dtype == torch.bfloat16
    assert torch.equal(u, ue) and torch.equal(s2, se)
    g1 = torch.autograd.grad(u.sum() + s2.float().sum(), [sg, *wg])
    g2 = torch.autograd.grad(ue.sum() + se.float().sum(), [sg, *wg])
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", [pytest.param("native", marks=native_only), "reference"])
def test_bf16_state_bad_dtypes_are_named(backend):
    grad, state, *w = _bf16_inputs(4, 6)
    with pymeta.use_backend(backend):
        with pytest.raises(TypeError, match=r"state has dtype (torch\.float16|Half) .*or is bfloat16"):
            ops.lstm_optimizer_step(grad, state.half(), *w)
        with pytest.raises(TypeError, match=r"state has dtype (torch\.bfloat16|BFloat16) but "
                                            r"grad has (torch\.float64|Double)"):
            ops.lstm_optimizer_step(grad.double(), state, *[x.double() for x in w])
        with pytest.raises(TypeError, match=r"w_out has dtype (torch\.bfloat16|BFloat16)"):
            ops.lstm_optimizer_step(grad, state, *w[:8], w[8].bfloat16(), w[9])
    bwds = [reference.lstm_optimizer_step_backward] + ([BWD] if _backend.NATIVE else [])
    for fn in bwds:
        with pytest.raises(TypeError, match=r"grad_new_state has dtype (torch\.float32|Float) "
                                            r"but state has (torch\.bfloat16|BFloat16)"):
            fn(torch.randn(6), torch.randn(4, 4, 6), grad, state, *w, "log_sign", 10.0, 0.1)


# ---- CUDA ------------------------------------------------------------------------------------

@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H", [20, 64])
def test_cuda_matches_cpu_large(dtype, H):
    """Many blocks and reduction chunks (N not a multiple of either)."""
    N = 100_003
    inputs = [t.to(dtype) for t in _valid(H, N, torch.float64).values()]
    du = torch.randn(N, dtype=dtype)
    ds = torch.randn(4, H, N, dtype=dtype)
    cpu_f = OP(*inputs, "log_sign", 10.0, 0.1)
    cpu_b = BWD(du, ds, *inputs, "log_sign", 10.0, 0.1)
    gpu_in = [t.cuda() for t in inputs]
    gpu_f = OP(*gpu_in, "log_sign", 10.0, 0.1)
    gpu_b = BWD(du.cuda(), ds.cuda(), *gpu_in, "log_sign", 10.0, 0.1)
    rtol, atol = (1e-9, 1e-9) if dtype == torch.float64 else (1e-3, 1e-3)
    for a, b in zip(cpu_f + cpu_b, gpu_f + gpu_b):
        scale = a.abs().max().clamp_min(1.0)
        torch.testing.assert_close(b.cpu() / scale, a / scale, rtol=rtol, atol=atol)


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H", [1, 7, 20, 24, 32])
def test_cuda_tensor_core_forward_matches_cuda_core_forward(H, monkeypatch):
    """float32, H <= 32 takes the tensor-core forward (3xTF32 mma.sync); PYMETA_LSTM_MMA=0
    selects the CUDA-core kernel. Both agree, NaN stays in its coordinates, and N not a
    multiple of the 32-coordinate warp step leaves nothing past N written."""
    N = 10_007
    inputs = [t.to(torch.float32).cuda() for t in _valid(H, N, torch.float64).values()]
    inputs[0][[5, 4000]] = float("nan")
    fast = OP(*inputs, "log_sign", 10.0, 0.1)
    monkeypatch.setenv("PYMETA_LSTM_MMA", "0")
    slow = OP(*inputs, "log_sign", 10.0, 0.1)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, equal_nan=True)
    bad = fast[0].isnan()
    assert bad.nonzero().flatten().tolist() == [5, 4000]
    assert torch.equal(fast[1].isnan().any(dim=1), bad.expand(4, N))


def _staged_vs_direct(H, N, kind, monkeypatch, check_ran, off32=False):
    inputs = [t.to(torch.float32).cuda() for t in _valid(H, N, torch.float64).values()]
    inputs[0][[5, N - 1]] = float("nan")
    if kind == "offset":
        buf = torch.empty(4 * H * N + 1, device="cuda")
        buf[1:].copy_(inputs[1].flatten())
        inputs[1] = buf[1:].view(4, H, N)
    if kind == "bf16":
        inputs[1] = inputs[1].bfloat16()
    monkeypatch.setenv("PYMETA_LSTM_MMA_STAGED", "0")
    if check_ran:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            direct = OP(*inputs, "log_sign", 10.0, 0.1)
            torch.cuda.synchronize()
        assert not any("forward_mma_staged_kernel" in e.name for e in prof.events())
    else:
        direct = OP(*inputs, "log_sign", 10.0, 0.1)
    # float32: opt-in; bfloat16: the default
    if kind == "bf16":
        monkeypatch.delenv("PYMETA_LSTM_MMA_STAGED")
    else:
        monkeypatch.setenv("PYMETA_LSTM_MMA_STAGED", "1")
    # 32-bit store offsets forced on or off (the default: on for a bfloat16 state only)
    monkeypatch.setenv("PYMETA_LSTM_OFF32", "1" if off32 else "0")
    monkeypatch.setenv("PYMETA_LSTM_SYNC", "0")  # the free-running form (sync: its own test)
    if check_ran:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            staged = OP(*inputs, "log_sign", 10.0, 0.1)
            torch.cuda.synchronize()
        ran = [e.name for e in prof.events() if "forward_mma_staged_kernel" in e.name]
        assert bool(ran) == (kind != "bf16" or N % 8 == 0)
        assert all((", true, false>" in n) == off32 for n in ran), ran
    else:
        staged = OP(*inputs, "log_sign", 10.0, 0.1)
    for a, b in zip(staged, direct):  # same math: the same bits
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    bad = staged[0].isnan()
    assert bad.nonzero().flatten().tolist() == [5, N - 1]
    assert torch.equal(staged[1].isnan().any(dim=1), bad.expand(4, N))


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H", [1, 7, 20, 24, 32])
@pytest.mark.parametrize("N,kind", [(10_000, "f32"), (10_007, "f32"), (10_000, "offset"),
                                    (10_000, "bf16"), (10_004, "bf16"), (40, "f32")])
@pytest.mark.parametrize("off32", [False, True])
def test_cuda_staged_forward_matches_direct_forward(H, N, kind, off32, monkeypatch):
    """The staged tensor-core forward (cp.async of each warp's next step into shared memory:
    the default for a bfloat16 state, opt-in with PYMETA_LSTM_MMA_STAGED=1 for float32)
    against the direct one (PYMETA_LSTM_MMA_STAGED=0): 16-byte copies (N % 4 == 0, or % 8 for
    bfloat16), 4-byte copies (odd N, a state at a storage offset), a bfloat16 state whose N
    rules out 16-byte copies (the direct kernel runs); with 32-bit store offsets too
    (PYMETA_LSTM_OFF32=1). Same math: the same bits. NaN stays in its coordinates."""
    _staged_vs_direct(H, N, kind, monkeypatch, check_ran=False, off32=off32)


def _poison_allocator(like):
    """NaN-filled tensors the sizes of `like`'s, freed at once: the caching allocator hands
    their blocks to the next call's outputs, so an output element the kernel never writes
    shows as NaN instead of keeping the bits an earlier identical call left there."""
    junk = [torch.full_like(t, float("nan")) for t in like]
    del junk


def _forward_kernels_under(inputs, monkeypatch, **switches):
    """The forward op on `inputs` with the PYMETA_LSTM_* `switches` set: its outputs and the
    names of the tensor-core forward kernels that ran (torch.profiler)."""
    for key, value in switches.items():
        monkeypatch.setenv(key, value)
    _poison_allocator([inputs[0], inputs[1]])  # the sizes of update and new_state
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = OP(*inputs, "log_sign", 10.0, 0.1)
        torch.cuda.synchronize()
    return got, [e.name for e in prof.events() if "forward_mma" in e.name]


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H", [1, 7, 20, 32])
@pytest.mark.parametrize("N", [1000, 200_003])
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_forward_32bit_offsets_same_bits(H, N, bf16, monkeypatch):
    """PYMETA_LSTM_OFF32=1: the tensor-core forward with 32-bit element offsets gives the bits
    of the 64-bit one (PYMETA_LSTM_OFF32=0): update and new_state, NaN grads included. The
    profiler shows that kernel (its template's last argument true) ran."""
    inputs = [t.to(torch.float32).cuda() for t in _valid(H, N, torch.float64).values()]
    inputs[0][[3, N - 1]] = float("nan")
    if bf16:
        inputs[1] = inputs[1].bfloat16()
        monkeypatch.setenv("PYMETA_LSTM_MMA_STAGED", "0")  # the direct kernel
    monkeypatch.setenv("PYMETA_LSTM_OFF32", "0")  # (on by default: bfloat16 at H <= 20)
    want = OP(*inputs, "log_sign", 10.0, 0.1)
    got, names = _forward_kernels_under(inputs, monkeypatch, PYMETA_LSTM_OFF32="1")
    assert names and all("forward_mma_kernel<" in n and ", true, false>" in n for n in names), names
    for a, b in zip(got, want):
        assert torch.equal(a.view(torch.int16) if bf16 and a.dim() == 3 else a.view(torch.int32),
                           b.view(torch.int16) if bf16 and b.dim() == 3 else b.view(torch.int32))


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H", [7, 17, 20, 32])
@pytest.mark.parametrize("N", [40, 100_003, 300_000])
@pytest.mark.parametrize("sync_warps", [None, 16, 8, 3, 2])
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_forward_sync_same_bits(H, N, sync_warps, bf16, monkeypatch):
    """The staged tensor-core forward with a barrier per step in each barrier group
    (forward_mma_staged_sync_kernel: PYMETA_LSTM_SYNC=1, groups of PYMETA_LSTM_SYNC_WARPS warps,
    4 by default; H 17..20, float32 with 64-bit offsets or bfloat16 with 32-bit ones) gives the
    bits of its free-running form (PYMETA_LSTM_SYNC=0), NaN grads included: one step with idle
    warps and groups (N = 40), a partial last step (4-byte copies for float32; the direct
    kernel for bfloat16), many steps per warp; groups of the whole block (16 warps on an H100:
    one group), a smaller last group (3 warps per group), 8 groups (2 warps: barrier ids up
    to 8). The profiler shows the sync kernel ran where it applies and only there."""
    for key in ("PYMETA_LSTM_OFF32", "PYMETA_LSTM_MMA", "PYMETA_LSTM_SYNC_WARPS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYMETA_LSTM_MMA_STAGED", "1")
    monkeypatch.setenv("PYMETA_LSTM_SYNC", "0")
    inputs = [t.to(torch.float32).cuda() for t in _valid(H, N, torch.float64).values()]
    inputs[0][[3, N - 1]] = float("nan")
    if bf16:
        inputs[1] = inputs[1].bfloat16()
    want = OP(*inputs, "log_sign", 10.0, 0.1)
    switches = {"PYMETA_LSTM_SYNC": "1"}
    if sync_warps:
        switches["PYMETA_LSTM_SYNC_WARPS"] = str(sync_warps)
    got, names = _forward_kernels_under(inputs, monkeypatch, **switches)
    applies = 17 <= H <= 20 and not (bf16 and N % 8)
    assert names and all(("sync_kernel" in n) == applies for n in names), names
    bits = torch.int16 if bf16 else torch.int32
    assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32))
    assert torch.equal(got[1].view(bits), want[1].view(bits))


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("state_dtype,H,N,want,off32,sync", [
    (torch.float32, 20, 100_000, "forward_mma_staged_sync_kernel<20, float", False, None),
    (torch.float32, 17, 100_000, "forward_mma_staged_sync_kernel<20, float", False, None),
    (torch.float32, 20, 100_001, "forward_mma_kernel<20, float", False, None),
    (torch.float32, 20, 2_000, "forward_mma_kernel<20, float", False, None),
    (torch.float32, 16, 100_000, "forward_mma_kernel<16, float", False, None),
    (torch.float32, 32, 100_000, "forward_mma_kernel<32, float", False, None),
    (torch.bfloat16, 20, 100_000, "forward_mma_staged_kernel<20, unsigned short", True, None),
    (torch.bfloat16, 20, 100_001, "forward_mma_kernel<20, unsigned short", True, None),
    (torch.bfloat16, 32, 100_000, "forward_mma_staged_kernel<32, unsigned short", False, None),
    (torch.float32, 20, 100_001, "forward_mma_staged_sync_kernel<20, float", False, "1"),
    (torch.float32, 20, 2_000, "forward_mma_staged_sync_kernel<20, float", False, "1"),
    (torch.float32, 20, 100_000, "forward_mma_kernel<20, float", False, "0")])
def test_cuda_forward_default_kernels(state_dtype, H, N, want, off32, sync, monkeypatch):
    """The tensor-core forward's defaults (H100 timings, bench/RESULTS.md): float32 with 64-bit
    offsets, the staged kernel's sync form at H 17..20 where 16-byte copies apply (N % 4 == 0)
    and every SM gets a block step (N = 2000 does not), else the direct kernel; bfloat16,
    staged where 16-byte copies apply (N % 8 == 0), else direct, with 32-bit offsets at
    H <= 20 (64-bit above: not timed there). PYMETA_LSTM_SYNC=1 alone forces the float32 sync
    form (4-byte copies at N % 4 != 0, and below a block step per SM); =0 alone leaves the
    direct kernel."""
    for key in ("PYMETA_LSTM_OFF32", "PYMETA_LSTM_MMA_STAGED", "PYMETA_LSTM_MMA",
                "PYMETA_LSTM_BF16_NATIVE", "PYMETA_LSTM_SYNC", "PYMETA_LSTM_SYNC_WARPS"):
        monkeypatch.delenv(key, raising=False)
    if sync is not None:
        monkeypatch.setenv("PYMETA_LSTM_SYNC", sync)
    inputs = [t.to(torch.float32).cuda() for t in _valid(H, N, torch.float64).values()]
    inputs[1] = inputs[1].to(state_dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        OP(*inputs, "log_sign", 10.0, 0.1)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "forward_mma" in e.name]
    assert names and all(want in n and (", true, false>" in n) == off32 for n in names), names


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H", [20, 32])
@pytest.mark.parametrize("N,kind", [(200_000, "f32"), (200_003, "f32"), (200_008, "bf16"),
                                    (200_004, "bf16")])
@pytest.mark.parametrize("off32", [False, True])
def test_cuda_staged_forward_many_steps_per_warp(H, N, kind, off32, monkeypatch):
    """N large enough for several steps per warp (both staging buffers refilled), and a check
    (torch.profiler) that the staged kernel ran (for a bfloat16 state by default), except for a
    bfloat16 state with N % 8 != 0; the kernel with 32-bit store offsets under
    PYMETA_LSTM_OFF32=1."""
    _staged_vs_direct(H, N, kind, monkeypatch, check_ran=True, off32=off32)


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H,N", [(7, 10_007), (16, 10_007), (20, 10_007), (24, 10_007),
                                 (32, 10_007), (20, 200_003)])
def test_cuda_tensor_core_backward_matches_cuda_core_backward(H, N, monkeypatch):
    """The backward op's per-coordinate pass on the tensor cores (opt-in, PYMETA_LSTM_MMA_BWD=1)
    against the default CUDA-core kernel: d_grad, d_state and every weight gradient. (At N =
    200k each warp runs several steps of the persistent loop.) The profiler shows it ran."""
    inputs = [t.to(torch.float32).cuda() for t in _valid(H, N, torch.float64).values()]
    gen = torch.Generator().manual_seed(3)
    du = torch.randn(N, generator=gen).cuda()
    ds = torch.randn(4, H, N, generator=gen).cuda()
    monkeypatch.setenv("PYMETA_LSTM_MMA_BWD", "1")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fast = BWD(du, ds, *inputs, "log_sign", 10.0, 0.1)
        torch.cuda.synchronize()
    assert any("backward_mma_kernel" in e.name for e in prof.events())
    monkeypatch.delenv("PYMETA_LSTM_MMA_BWD")
    slow = BWD(du, ds, *inputs, "log_sign", 10.0, 0.1)
    for a, b in zip(fast, slow):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=2e-5)


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H,N", [(H, N) for H in (1, 7, 20, 24, 32) for N in (101, 10_004)] +
                         [(20, 200_003), (20, 200_004), (32, 200_004)])
def test_cuda_tensor_core_wgrad_matches_cuda_core_wgrad(H, N, monkeypatch):
    """The weight gradients on the tensor cores (the default for float32 at H <= 32: one block
    per chunk reads each workspace row once, 3xTF32 mma; 16-byte copies when N % 4 == 0, else
    4-byte ones; chunks of 256, or 416 at N = 200k) against the CUDA-core tiles
    (PYMETA_LSTM_WG_MMA=0): the same
    d_grad and d_state bits (the same per-coordinate pass), every weight gradient close,
    bitwise reproducible. A NaN in d_new_state (only unit 0's layer-1 gate rows turn NaN) and
    an Inf in d_update (every entry turns non-finite) give the same entries as the CUDA-core
    sums. A profiler check that the kernel ran wherever it fits."""
    inputs = [t.to(torch.float32).cuda() for t in _valid(H, N, torch.float64).values()]
    gen = torch.Generator().manual_seed(5)
    du = torch.randn(N, generator=gen).cuda()
    ds = torch.randn(4, H, N, generator=gen).cuda()

    def both(du, ds):
        monkeypatch.setenv("PYMETA_LSTM_WG_MMA", "0")
        slow = BWD(du, ds, *inputs, "log_sign", 10.0, 0.1)
        monkeypatch.delenv("PYMETA_LSTM_WG_MMA")
        return BWD(du, ds, *inputs, "log_sign", 10.0, 0.1), slow

    fast, slow = both(du, ds)
    cc = torch.cuda.get_device_capability()
    # sm_86 / sm_89 have 99 KB of shared memory per block: too little for H = 32 (124 KB)
    if cc >= (8, 0) and (H <= 24 or cc == (8, 0) or cc >= (9, 0)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            again = BWD(du, ds, *inputs, "log_sign", 10.0, 0.1)
            torch.cuda.synchronize()
        assert any("wgrad_mma_kernel" in e.name for e in prof.events())
    else:
        again = BWD(du, ds, *inputs, "log_sign", 10.0, 0.1)
    for a, b in zip(fast, again):
        assert torch.equal(a, b)
    for a, b in zip(fast[:2], slow[:2]):
        assert torch.equal(a, b)
    for a, b in zip(fast[2:], slow[2:]):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-5)

    ds_nan = ds.clone()
    ds_nan[1, 0, N - 1] = float("nan")  # d c1 of unit 0 at the last coordinate
    du_inf = du.clone()
    du_inf[N // 3] = float("inf")
    for case, (d_u, d_s) in (("nan", (du, ds_nan)), ("inf", (du_inf, ds))):
        fast, slow = both(d_u, d_s)
        bad = 0
        for a, b in zip(fast[2:], slow[2:]):
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a == float("inf"), b == float("inf"))
            assert torch.equal(a == -float("inf"), b == -float("inf"))
            ok = b.isfinite()
            bad += int((~ok).sum())
            if ok.any():
                scale = b[ok].abs().max().clamp_min(1.0)
                torch.testing.assert_close(a[ok] / scale, b[ok] / scale, rtol=1e-4, atol=1e-5)
        total = sum(b.numel() for b in slow[2:])
        assert 0 < bad < total if case == "nan" else bad == total


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["float64", "H64", "bf16"])
def test_cuda_wgrad_mma_where_it_does_not_apply(case, monkeypatch):
    """float64 or H > 32: the CUDA-core weight gradients run whether or not the tensor-core
    ones are switched off (PYMETA_LSTM_WG_MMA=0), bit for bit the same (the workspace is sized
    for what runs). With a bfloat16 state the weight gradients read the pass's float copies of
    the h rows, so the tensor-core ones apply there: the same d_grad and d_state, close weight
    gradients."""
    H, N = (64, 5003) if case == "H64" else (20, 5003)
    dtype = torch.float64 if case == "float64" else torch.float32
    inputs = [t.to(dtype).cuda() for t in _valid(H, N, torch.float64).values()]
    du = torch.randn(N, dtype=dtype).cuda()
    ds = torch.randn(4, H, N, dtype=dtype).cuda()
    if case == "bf16":
        inputs[1], ds = inputs[1].bfloat16(), ds.bfloat16()
    flagged = BWD(du, ds, *inputs, "log_sign", 10.0, 0.1)
    monkeypatch.setenv("PYMETA_LSTM_WG_MMA", "0")
    plain = BWD(du, ds, *inputs, "log_sign", 10.0, 0.1)
    for i, (a, b) in enumerate(zip(plain, flagged)):
        if case == "bf16" and i >= 2:
            scale = a.abs().max().clamp_min(1.0)
            torch.testing.assert_close(b / scale, a / scale, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a, b)


@native_only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H", [7, 20, 32, 64])
def test_cuda_backward_pass_loads_ahead_same_bits(dtype, H, monkeypatch):
    """The backward's CUDA-core pass in its forms (PYMETA_LSTM_BWD_AHEAD=0: the plain loops,
    =1: inputs loaded one unit ahead; unset: the default, ahead for float at H <= 20;
    PYMETA_LSTM_BWD_WIDE=1: the plain loops at 6 blocks per SM, float at H <= 20;
    PYMETA_LSTM_OFF32=1: 32-bit offsets, float) runs the same arithmetic: every output bit for
    bit the same, a NaN in d_new_state included. (H = 64 has only the plain form.)"""
    N = 20_011
    inputs = [t.to(dtype).cuda() for t in _valid(H, N, torch.float64).values()]
    gen = torch.Generator().manual_seed(11)
    du = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype).cuda()
    ds = torch.randn(4, H, N, generator=gen, dtype=torch.float64).to(dtype).cuda()
    ds[3, H - 1, 7] = float("nan")
    monkeypatch.delenv("PYMETA_LSTM_BWD_AHEAD", raising=False)

    def run(kernel="backward_smem_ahead_kernel"):  # the outputs, and whether `kernel` ran
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = BWD(du, ds, *inputs, "log_sign", 10.0, 0.1)
            torch.cuda.synchronize()
        return out, any(kernel in e.name for e in prof.events())

    outs, ran = [], []
    for mode in (None, "0", "1"):
        if mode is not None:
            monkeypatch.setenv("PYMETA_LSTM_BWD_AHEAD", mode)
        out, ahead = run()
        outs.append(out)
        ran.append(ahead)
    assert ran == [dtype == torch.float32 and H <= 20, False, H <= 32]
    # the plain loops at 6 blocks per SM (PYMETA_LSTM_BWD_WIDE=1: float at H <= 20 only)
    monkeypatch.setenv("PYMETA_LSTM_BWD_WIDE", "1")
    out, wide = run("backward_smem_wide_kernel")
    monkeypatch.delenv("PYMETA_LSTM_BWD_WIDE")
    assert wide == (dtype == torch.float32 and H <= 20)
    outs.append(out)
    # 32-bit offsets (PYMETA_LSTM_OFF32=1: float only), the plain and the default form; the
    # profiler names the kernel template's last argument
    monkeypatch.setenv("PYMETA_LSTM_OFF32", "1")
    HP = H if H > 20 else (16 if H <= 16 else 20)
    for mode in ("0", None):
        if mode is None:
            monkeypatch.delenv("PYMETA_LSTM_BWD_AHEAD")
        else:
            monkeypatch.setenv("PYMETA_LSTM_BWD_AHEAD", mode)
        form = "backward_smem_ahead_kernel" if mode is None and HP <= 20 else "backward_smem_kernel"
        out, off32 = run(f"{form}<float, {HP}, true>")
        assert off32 == (dtype == torch.float32)
        outs.append(out)
    monkeypatch.delenv("PYMETA_LSTM_OFF32")
    assert outs[0][0][7].isnan()  # the NaN reached d_grad of its coordinate
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


@native_only
def test_compile_takes_the_scalars_as_graph_inputs():
    """Under torch.compile a float argument may be a SymFloat (torch does not specialize
    floats by default): the front's scalar checks step aside (the op's C++ front and fake
    kernel check it), so fullgraph compiles and gives the eager result."""
    args = list(_valid().values())
    step = torch.compile(lambda *a, p, s: ops.lstm_optimizer_step(*a, p=p, out_scale=s),
                         fullgraph=True, backend="aot_eager")
    with pymeta.use_backend("native"):
        for p, s in ((9.0, 0.2), (8.0, 0.3)):
            got = step(*args, p=p, s=s)
            want = ops.lstm_optimizer_step(*args, p=p, out_scale=s)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
