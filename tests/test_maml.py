"""pymeta.MAML against a plain per-task Python loop (the oracle), on both backends."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pymeta
from pymeta.models import MLP, Conv4

BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(
    not pymeta._backend.NATIVE, reason="native extension not built"))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with pymeta.use_backend(request.param):
        yield request.param


# ---- the oracle: hand-written functional forwards and a per-task loop ---------------------

def mlp_forward(p, x):
    h = x
    for i in (0, 2):
        h = F.relu(F.linear(h, p[f"body.{i}.weight"], p[f"body.{i}.bias"]))
    return F.linear(h, p["head.weight"], p["head.bias"])


def conv4_forward(p, x):
    h = x
    for i in range(4):
        c, b = 4 * i, 4 * i + 1
        h = F.conv2d(h, p[f"features.{c}.weight"], p[f"features.{c}.bias"], padding=1)
        h = F.batch_norm(h, None, None, p[f"features.{b}.weight"], p[f"features.{b}.bias"], training=True)
        h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), p["head.weight"], p["head.bias"])


def oracle_rate(maml, step, i):
    if maml.lr_mode == "scalar":
        return maml.inner_lr
    if maml.lr_mode == "per_layer_step":
        return maml.step_lrs[step, i]
    return maml.param_lrs[i]


def oracle_meta_loss(maml, forward, xs, ys, xq, yq, loss_fn, step_weights=None):
    """Per task: inner SGD with autograd.grad (create_graph for second order, detached inner
    grads for first order); mean over tasks of the query loss (or its step-weighted sum)."""
    meta = dict(maml.module.named_parameters())
    names = maml.adapted_names
    total = 0.0
    for t in range(xs.shape[0]):
        p = dict(meta)
        task = 0.0
        for s in range(maml.inner_steps):
            loss = loss_fn(forward(p, xs[t]), ys[t])
            g = torch.autograd.grad(loss, [p[n] for n in names], create_graph=not maml.first_order)
            if maml.first_order:
                g = [x.detach() for x in g]
            p = {**p, **{n: p[n] - oracle_rate(maml, s, i) * gi for i, (n, gi) in enumerate(zip(names, g))}}
            if step_weights is not None:
                task = task + step_weights[s] * loss_fn(forward(p, xq[t]), yq[t])
        if step_weights is None:
            task = loss_fn(forward(p, xq[t]), yq[t])
        total = total + task
    return total / xs.shape[0]


def perturb_rates(maml, gen):
    # Distinct rates per tensor/step/element, so a mix-up of rates shows.
    with torch.no_grad():
        if maml.lr_mode == "per_layer_step":
            maml.step_lrs.mul_(0.5 + torch.rand(maml.step_lrs.shape, generator=gen, dtype=maml.step_lrs.dtype))
        elif maml.lr_mode == "per_param":
            for r in maml.param_lrs:
                r.mul_(0.5 + torch.rand(r.shape, generator=gen, dtype=r.dtype))


def assert_grads_match(maml, forward, xs, ys, xq, yq, loss_fn, step_weights=None, rtol=1e-10, atol=1e-10):
    params = [p for p in maml.parameters()]
    ours = torch.autograd.grad(maml.meta_loss(xs, ys, xq, yq, loss_fn, step_weights=step_weights),
                               params, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(oracle_meta_loss(maml, forward, xs, ys, xq, yq, loss_fn, step_weights),
                               params, allow_unused=True, materialize_grads=True)
    names = [n for n, _ in maml.named_parameters()]
    for n, a, b in zip(names, ours, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")
    assert any(w.abs().sum() > 0 for w in want)


def sinusoid_tasks(T, K, Q, dtype, gen):
    amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=gen, dtype=dtype)
    phase = 3.14159 * torch.rand(T, 1, 1, generator=gen, dtype=dtype)
    xs = 10 * torch.rand(T, K, 1, generator=gen, dtype=dtype) - 5
    xq = 10 * torch.rand(T, Q, 1, generator=gen, dtype=dtype) - 5
    return xs, amp * torch.sin(xs + phase), xq, amp * torch.sin(xq + phase)


def image_tasks(T, n_way, k, q, size, dtype, gen, channels=1):
    xs = torch.randn(T, n_way * k, channels, size, size, generator=gen, dtype=dtype)
    xq = torch.randn(T, n_way * q, channels, size, size, generator=gen, dtype=dtype)
    ys = torch.arange(n_way).repeat_interleave(k).expand(T, -1).contiguous()
    yq = torch.arange(n_way).repeat_interleave(q).expand(T, -1).contiguous()
    return xs, ys, xq, yq


def make_mlp(dtype, seed=0):
    torch.manual_seed(seed)
    return MLP(1, (16, 16), 1).to(dtype)


def make_conv4(dtype, seed=0, size=16):
    torch.manual_seed(seed)
    return Conv4(1, hidden=8, n_way=3, image_size=size).to(dtype)


# ---- meta-gradients vs the oracle -------------------------------------------------------

@pytest.mark.parametrize("lr_mode", ["scalar", "per_layer_step", "per_param"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_mlp_meta_gradients_float64(backend, lr_mode, first_order, steps):
    gen = torch.Generator().manual_seed(steps)
    maml = pymeta.MAML(make_mlp(torch.float64), inner_lr=0.05, inner_steps=steps,
                       first_order=first_order, lr_mode=lr_mode)
    perturb_rates(maml, gen)
    assert_grads_match(maml, mlp_forward, *sinusoid_tasks(4, 5, 7, torch.float64, gen), F.mse_loss)


@pytest.mark.parametrize("lr_mode", ["scalar", "per_layer_step", "per_param"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_conv4_meta_gradients_float64(backend, lr_mode, first_order, steps):
    gen = torch.Generator().manual_seed(10 + steps)
    maml = pymeta.MAML(make_conv4(torch.float64), inner_lr=0.1, inner_steps=steps,
                       first_order=first_order, lr_mode=lr_mode)
    perturb_rates(maml, gen)
    assert_grads_match(maml, conv4_forward, *image_tasks(3, 3, 1, 2, 16, torch.float64, gen), F.cross_entropy)


@pytest.mark.parametrize("first_order", [False, True])
def test_conv4_five_steps_28px_float64(backend, first_order):
    gen = torch.Generator().manual_seed(5)
    maml = pymeta.MAML(make_conv4(torch.float64, size=28), inner_lr=0.1, inner_steps=5,
                       first_order=first_order, lr_mode="per_layer_step")
    perturb_rates(maml, gen)
    assert_grads_match(maml, conv4_forward, *image_tasks(2, 3, 1, 2, 28, torch.float64, gen), F.cross_entropy)


def test_conv4_second_order_matches_finite_differences(backend):
    # Anchors the oracle: second order through BatchNorm is where batched autodiff can go
    # wrong (torch.func's vmap(grad) does here, pytorch/functorch#534).
    gen = torch.Generator().manual_seed(9)
    maml = pymeta.MAML(make_conv4(torch.float64), inner_lr=0.4, inner_steps=2)
    data = image_tasks(2, 3, 1, 2, 16, torch.float64, gen)
    w = maml.module.features[0].weight
    (g,) = torch.autograd.grad(maml.meta_loss(*data, F.cross_entropy), [w])
    eps = 1e-6
    for idx in [(0, 0, 0, 0), (3, 0, 1, 2)]:
        with torch.no_grad():
            w[idx] += eps
            up = maml.meta_loss(*data, F.cross_entropy)
            w[idx] -= 2 * eps
            down = maml.meta_loss(*data, F.cross_entropy)
            w[idx] += eps
        torch.testing.assert_close(g[idx], (up - down) / (2 * eps), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("model", ["mlp", "conv4"])
@pytest.mark.parametrize("lr_mode", ["scalar", "per_param"])
def test_meta_gradients_float32(backend, model, lr_mode):
    gen = torch.Generator().manual_seed(3)
    if model == "mlp":
        maml = pymeta.MAML(make_mlp(torch.float32), inner_lr=0.05, inner_steps=3, lr_mode=lr_mode)
        fwd, data, loss = mlp_forward, sinusoid_tasks(4, 5, 7, torch.float32, gen), F.mse_loss
    else:
        maml = pymeta.MAML(make_conv4(torch.float32), inner_lr=0.1, inner_steps=2, lr_mode=lr_mode)
        fwd, data, loss = conv4_forward, image_tasks(3, 3, 1, 2, 16, torch.float32, gen), F.cross_entropy
    perturb_rates(maml, gen)
    assert_grads_match(maml, fwd, *data, loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lr_mode", ["scalar", "per_layer_step", "per_param"])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_head_only(backend, lr_mode, first_order):
    gen = torch.Generator().manual_seed(7)
    maml = pymeta.MAML(make_conv4(torch.float64), inner_lr=0.2, inner_steps=2,
                       first_order=first_order, lr_mode=lr_mode, adapt=["head"])
    assert maml.adapted_names == ["head.weight", "head.bias"]
    perturb_rates(maml, gen)
    data = image_tasks(3, 3, 2, 2, 16, torch.float64, gen)
    assert_grads_match(maml, conv4_forward, *data, F.cross_entropy)
    adapted = maml.adapt(*data[:2], F.cross_entropy)
    assert list(adapted) == ["head.weight", "head.bias"]
    assert adapted["head.weight"].shape == (3, *maml.module.head.weight.shape)


def test_adapt_predicate_selects_like_names(backend):
    m = make_mlp(torch.float64)
    a = pymeta.MAML(m, adapt=lambda n, p: n.startswith("head."))
    b = pymeta.MAML(m, adapt=["head.weight", "head.bias"])
    assert a.adapted_names == b.adapted_names == ["head.weight", "head.bias"]


@pytest.mark.parametrize("first_order", [False, True])
def test_step_weights_multi_step_loss(backend, first_order):
    gen = torch.Generator().manual_seed(11)
    maml = pymeta.MAML(make_conv4(torch.float64), inner_lr=0.1, inner_steps=3,
                       first_order=first_order, lr_mode="per_layer_step")
    perturb_rates(maml, gen)
    data = image_tasks(2, 3, 1, 2, 16, torch.float64, gen)
    assert_grads_match(maml, conv4_forward, *data, F.cross_entropy, step_weights=[0.2, 0.3, 0.5])
    # weights (0, ..., 0, 1) are plain MAML
    last = maml.meta_loss(*data, F.cross_entropy, step_weights=torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(last, maml.meta_loss(*data, F.cross_entropy), rtol=1e-12, atol=0)


def test_adapt_and_predict_values(backend):
    gen = torch.Generator().manual_seed(2)
    maml = pymeta.MAML(make_conv4(torch.float64), inner_lr=0.1, inner_steps=2)
    xs, ys, xq, yq = image_tasks(3, 3, 1, 2, 16, torch.float64, gen)
    adapted = maml.adapt(xs, ys, F.cross_entropy)
    out = maml.predict(adapted, xq)
    assert out.shape == (3, 6, 3)
    meta = dict(maml.module.named_parameters())
    for t in range(3):
        p = dict(meta)
        for _ in range(2):
            g = torch.autograd.grad(F.cross_entropy(conv4_forward(p, xs[t]), ys[t]), list(p.values()))
            p = {n: v - 0.1 * gi for (n, v), gi in zip(p.items(), g)}
        for n in p:
            torch.testing.assert_close(adapted[n][t], p[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out[t], conv4_forward(p, xq[t]), rtol=1e-10, atol=1e-12)


# ---- checkpointed inner steps --------------------------------------------------------------

@pytest.mark.parametrize("lr_mode", ["scalar", "per_layer_step", "per_param"])
def test_checkpoint_steps_conv4_matches_oracle(backend, lr_mode):
    gen = torch.Generator().manual_seed(21)
    maml = pymeta.MAML(make_conv4(torch.float64), inner_lr=0.1, inner_steps=3, lr_mode=lr_mode,
                       checkpoint_steps=True)
    perturb_rates(maml, gen)
    data = image_tasks(2, 3, 1, 2, 16, torch.float64, gen)
    assert_grads_match(maml, conv4_forward, *data, F.cross_entropy)
    assert_grads_match(maml, conv4_forward, *data, F.cross_entropy, step_weights=[0.2, 0.3, 0.5])


def test_checkpoint_steps_mlp_and_anil_match_oracle(backend):
    gen = torch.Generator().manual_seed(22)
    maml = pymeta.MAML(make_mlp(torch.float64), inner_lr=0.05, inner_steps=4,
                       lr_mode="per_param", checkpoint_steps=True)
    perturb_rates(maml, gen)
    assert_grads_match(maml, mlp_forward, *sinusoid_tasks(3, 5, 4, torch.float64, gen), F.mse_loss)
    anil = pymeta.MAML(make_conv4(torch.float64), inner_lr=0.1, inner_steps=2, adapt=["head"],
                       checkpoint_steps=True)
    assert_grads_match(anil, conv4_forward, *image_tasks(2, 3, 1, 2, 16, torch.float64, gen),
                       F.cross_entropy)


def test_checkpoint_steps_replays_dropout_masks(backend):
    """A module without forward_tasks (the vmap path) with dropout: the backward's rerun of each
    step draws the same masks, so the meta-gradient equals the one without checkpointing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1)).double()
    gen = torch.Generator().manual_seed(23)
    data = sinusoid_tasks(3, 6, 5, torch.float64, gen)
    data = (data[0].expand(-1, -1, 3).contiguous(), data[1], data[2].expand(-1, -1, 3).contiguous(), data[3])
    grads = []
    for ckpt in (False, True):
        maml = pymeta.MAML(model, inner_lr=0.1, inner_steps=3, checkpoint_steps=ckpt)
        torch.manual_seed(5)
        grads.append(torch.autograd.grad(maml.meta_loss(*data, F.mse_loss), list(model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lr_mode,adapt,steps", [("per_layer_step", None, 2), ("per_param", None, 3),
                                                 ("scalar", ["head"], 2), ("per_layer_step", ["head"], 3)])
def test_checkpoint_steps_differentiable_meta_gradient(backend, lr_mode, adapt, steps):
    """create_graph through the meta-gradient (e.g. a gradient penalty on it): the rerun step's
    backward is itself differentiable, and both orders match the plain graph's, also where
    later steps and shared tensors (ANIL's body, Meta-SGD's rates) reach back to earlier ones."""
    gen = torch.Generator().manual_seed(26)
    data = sinusoid_tasks(2, 4, 3, torch.float64, gen)
    results = []
    for ckpt in (False, True):
        maml = pymeta.MAML(make_mlp(torch.float64), inner_lr=0.05, inner_steps=steps,
                           lr_mode=lr_mode, adapt=adapt, checkpoint_steps=ckpt)
        perturb_rates(maml, torch.Generator().manual_seed(27))
        params = list(maml.parameters())
        g = torch.autograd.grad(maml.meta_loss(*data, F.mse_loss), params, create_graph=True)
        results.append([x.detach() for x in g]
                       + list(torch.autograd.grad(sum(x.square().sum() for x in g), params)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(x.abs().sum() > 0 for x in results[0])


def _saved_bytes_outside_checkpoints(maml, data, loss_fn):
    """Bytes of the tensors the graph holds for the backward once the meta-loss is computed
    (each storage once), outside checkpointed regions (a region keeps its inputs only)."""
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = maml.meta_loss(*data, loss_fn)
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for t in (r() for r in saved) if t is not None}
    loss.backward()
    return sum(alive.values())


def test_checkpoint_steps_keeps_no_inner_activations(backend):
    """Second order: with checkpointing, the inner steps' activations are not kept, and the
    kept bytes no longer grow with the number of steps; first order keeps none anyway."""
    gen = torch.Generator().manual_seed(24)
    data = image_tasks(2, 3, 2, 1, 16, torch.float64, gen)  # support larger than query
    kept = {}
    for steps in (2, 4):
        for ckpt in (False, True):
            maml = pymeta.MAML(make_conv4(torch.float64), inner_lr=0.1, inner_steps=steps,
                               checkpoint_steps=ckpt)
            kept[steps, ckpt] = _saved_bytes_outside_checkpoints(maml, data, F.cross_entropy)
    assert kept[4, False] > 1.5 * kept[2, False]  # grows with steps
    assert kept[4, True] < 0.5 * kept[4, False]
    assert kept[4, True] < 1.2 * kept[2, True]
    fo = {ckpt: _saved_bytes_outside_checkpoints(
        pymeta.MAML(make_conv4(torch.float64), inner_lr=0.1, inner_steps=4, first_order=True,
                    checkpoint_steps=ckpt), data, F.cross_entropy) for ckpt in (False, True)}
    assert fo[True] == fo[False]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checkpoint_steps_cuda_matches_plain():
    gen = torch.Generator().manual_seed(25)
    data = [t.cuda() for t in image_tasks(3, 3, 1, 2, 16, torch.float64, gen)]
    grads = []
    for ckpt in (False, True):
        maml = pymeta.MAML(make_conv4(torch.float64).cuda(), inner_lr=0.1, inner_steps=3,
                           lr_mode="per_layer_step", checkpoint_steps=ckpt)
        grads.append(torch.autograd.grad(maml.meta_loss(*data, F.cross_entropy),
                                         list(maml.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_capture_refuses_checkpoint_steps():
    maml = pymeta.MAML(make_conv4(torch.float32), inner_lr=0.4, inner_steps=2, checkpoint_steps=True)
    xs, ys, xq, yq = image_tasks(2, 5, 1, 2, 16, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="checkpoint_steps=True is not supported in a CUDA graph"):
        maml.capture(F.cross_entropy, xs, ys, xq, yq)


# ---- evaluation mode, BatchNorm, dropout -----------------------------------------------

@pytest.mark.parametrize("lr_mode", ["scalar", "per_param"])
def test_no_grad_adaptation_builds_no_graph(backend, lr_mode):
    gen = torch.Generator().manual_seed(4)
    maml = pymeta.MAML(make_conv4(torch.float64), inner_lr=0.1, inner_steps=3, lr_mode=lr_mode)
    xs, ys, xq, _ = image_tasks(2, 3, 1, 2, 16, torch.float64, gen)
    with torch.no_grad():
        adapted = maml.adapt(xs, ys, F.cross_entropy)
        out = maml.predict(adapted, xq)
    for v in adapted.values():
        assert v.grad_fn is None and not v.requires_grad
    assert out.grad_fn is None and not out.requires_grad
    assert all(p.grad is None for p in maml.parameters())
    torch.testing.assert_close(adapted, {k: v.detach() for k, v in maml.adapt(xs, ys, F.cross_entropy).items()},
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_uses_task_statistics_and_keeps_running_stats(backend, train):
    gen = torch.Generator().manual_seed(6)
    model = make_conv4(torch.float64)
    with torch.no_grad():  # non-trivial running stats, to see they're neither used nor changed
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.train(train)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    maml = pymeta.MAML(model, inner_lr=0.1, inner_steps=2)
    xs, ys, xq, yq = image_tasks(2, 3, 1, 2, 16, torch.float64, gen)
    maml.meta_loss(xs, ys, xq, yq, F.cross_entropy).backward()
    adapted = maml.adapt(xs, ys, F.cross_entropy)
    out = maml.predict(adapted, xq)
    with torch.no_grad():
        maml.adapt(xs, ys, F.cross_entropy)
    after = {k: v for k, v in model.state_dict().items() if k in before}
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # per-task batch statistics: equal to the oracle's batch-stat forward in both modes
    p = {n: v[1] for n, v in adapted.items()}
    torch.testing.assert_close(out[1], conv4_forward(p, xq[1]), rtol=1e-10, atol=1e-12)


def test_dropout_draws_per_task_in_training_mode(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 2)).double()
    maml = pymeta.MAML(model, inner_lr=0.1, adapt=["2"])
    x = torch.randn(1, 8, 4, dtype=torch.float64).expand(2, -1, -1)
    adapted = {n: v.expand(2, *v.shape) for n, v in dict(model.named_parameters()).items() if n.startswith("2.")}
    out = maml.predict(adapted, x)
    assert not torch.equal(out[0], out[1])
    model.eval()
    out = maml.predict(adapted, x)
    assert torch.equal(out[0], out[1])


def test_adam_meta_trains_model_and_rates(backend):
    gen = torch.Generator().manual_seed(8)
    maml = pymeta.MAML(make_mlp(torch.float64), inner_lr=0.05, inner_steps=2, lr_mode="per_param")
    opt = torch.optim.Adam(maml.parameters(), lr=1e-2)
    rates0 = [r.detach().clone() for r in maml.param_lrs]
    w0 = maml.module.head.weight.detach().clone()
    opt.zero_grad()
    maml.meta_loss(*sinusoid_tasks(4, 5, 5, torch.float64, gen), F.mse_loss).backward()
    opt.step()
    assert not torch.equal(w0, maml.module.head.weight)
    assert all(not torch.equal(a, b) for a, b in zip(rates0, maml.param_lrs))


# ---- bad input ----------------------------------------------------------------------------

def test_bad_task_dimensions_name_the_argument():
    maml = pymeta.MAML(make_mlp(torch.float32), inner_steps=1)
    xs, ys = torch.randn(4, 5, 1), torch.randn(4, 5, 1)
    xq, yq = torch.randn(4, 7, 1), torch.randn(4, 7, 1)
    with pytest.raises(ValueError, match="y_support has 3 tasks.*x_support has 4"):
        maml.adapt(xs, ys[:3], F.mse_loss)
    with pytest.raises(ValueError, match="y_support has 3 tasks"):
        maml.meta_loss(xs, ys[:3], xq, yq, F.mse_loss)
    with pytest.raises(ValueError, match="x_query has 2 tasks"):
        maml.meta_loss(xs, ys, xq[:2], yq, F.mse_loss)
    with pytest.raises(ValueError, match="y_query has 5 tasks"):
        maml.meta_loss(xs, ys, xq, torch.randn(5, 7, 1), F.mse_loss)
    with pytest.raises(ValueError, match=r"x_support has shape \[5\]"):
        maml.adapt(torch.randn(5), ys, F.mse_loss)
    adapted = maml.adapt(xs, ys, F.mse_loss)
    with pytest.raises(ValueError, match="x_query has 2 tasks"):
        maml.predict(adapted, xq[:2])
    with pytest.raises(ValueError, match="step_weights has 2 weights"):
        maml.meta_loss(xs, ys, xq, yq, F.mse_loss, step_weights=[0.5, 0.5])


def test_bad_label_shapes_name_the_argument():
    mlp = pymeta.MAML(make_mlp(torch.float32))
    xs, xq = torch.randn(2, 5, 1), torch.randn(2, 7, 1)
    with pytest.raises(ValueError, match=r"y_support has per-task shape \[5\].*output \[5, 1\]"):
        mlp.adapt(xs, torch.randn(2, 5), F.mse_loss)  # would silently broadcast in mse_loss
    with pytest.raises(ValueError, match=r"y_support has per-task shape \[4, 1\]"):
        mlp.adapt(xs, torch.randn(2, 4, 1), F.mse_loss)
    with pytest.raises(ValueError, match=r"y_query has per-task shape \[6, 1\]"):
        mlp.meta_loss(xs, torch.randn(2, 5, 1), xq, torch.randn(2, 6, 1), F.mse_loss)
    conv = pymeta.MAML(make_conv4(torch.float32))
    xs, ys, xq, yq = image_tasks(2, 3, 1, 2, 16, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"y_query has per-task shape \[6, 2\].*\[6, 3\]"):
        conv.meta_loss(xs, ys, xq, torch.zeros(2, 6, 2, dtype=torch.long), F.cross_entropy)
    conv.meta_loss(xs, ys, xq, yq, F.cross_entropy)  # class indices [Q] fit logits [Q, C]


def test_bad_constructor_arguments():
    m = make_mlp(torch.float32)
    with pytest.raises(ValueError, match="lr_mode 'per_tensor'"):
        pymeta.MAML(m, lr_mode="per_tensor")
    with pytest.raises(ValueError, match="adapt selects no parameter"):
        pymeta.MAML(m, adapt=[])
    with pytest.raises(ValueError, match="adapt selects no parameter"):
        pymeta.MAML(m, adapt=lambda n, p: False)
    with pytest.raises(ValueError, match="adapt names 'head.w'"):
        pymeta.MAML(m, adapt=["head.weight", "head.w"])
    with pytest.raises(TypeError, match="adapt must be"):
        pymeta.MAML(m, adapt="head")
    with pytest.raises(ValueError, match="inner_steps"):
        pymeta.MAML(m, inner_steps=0)


def _snapshot(maml):
    return {k: v.detach().clone() for k, v in maml.state_dict().items()}


def _assert_unchanged(maml, before):
    after = maml.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert all(p.grad is None for p in maml.parameters())


@pytest.mark.parametrize("step_weights,exc,match", [
    (torch.ones(2, 2), ValueError, r"step_weights has shape \[2, 2\]"),  # was: a doubled loss
    (torch.tensor(1.0), ValueError, r"step_weights has shape \[\]"),
    (2, TypeError, "step_weights must be None or one weight per inner step.*not int"),
    ("ab", TypeError, "step_weights must be None.*not str"),
    ({0.5, 0.7}, TypeError, "step_weights must be None.*not set"),
    (["a", "b"], TypeError, r"step_weights\[0\] is str 'a'"),
    ([1.0, True], TypeError, r"step_weights\[1\] is bool"),
    ([[1.0], [1.0]], TypeError, r"step_weights\[0\] is list"),
    ([1.0, float("nan")], ValueError, r"step_weights\[1\] must be a finite number, got nan"),
    ([float("inf"), 1.0], ValueError, r"step_weights\[0\] must be a finite number, got inf"),
    ([torch.tensor(1.0), torch.tensor(float("nan"))], ValueError, r"step_weights\[1\] is nan"),
    (torch.tensor([1.0, float("nan")]), ValueError, r"step_weights is \[1.0, nan\].*finite"),
    (torch.tensor([True, False]), TypeError, "step_weights has dtype torch.bool"),
    (torch.ones(2, dtype=torch.complex64), TypeError, "step_weights has dtype torch.complex64"),
    (torch.ones(3), ValueError, "step_weights has 3 weights but inner_steps is 2"),
    ([], ValueError, "step_weights has 0 weights but inner_steps is 2"),
])
def test_bad_step_weights_name_the_argument(step_weights, exc, match):
    maml = pymeta.MAML(make_mlp(torch.float32), inner_lr=0.05, inner_steps=2)
    gen = torch.Generator().manual_seed(0)
    data = sinusoid_tasks(3, 5, 4, torch.float32, gen)
    before = _snapshot(maml)
    with pytest.raises(exc, match=match):
        maml.meta_loss(*data, F.mse_loss, step_weights=step_weights)
    _assert_unchanged(maml, before)


def test_step_weights_accepted_forms_give_the_same_loss():
    maml = pymeta.MAML(make_mlp(torch.float64), inner_lr=0.05, inner_steps=2)
    data = sinusoid_tasks(3, 5, 4, torch.float64, torch.Generator().manual_seed(1))
    want = maml.meta_loss(*data, F.mse_loss, step_weights=[0.25, 0.75])
    learned = torch.tensor([0.25, 0.75], dtype=torch.float64, requires_grad=True)
    forms = [(0.25, 0.75), torch.tensor([0.25, 0.75]), learned,
             [torch.tensor(0.25), torch.tensor(0.75, requires_grad=True)]]
    for w in forms:
        torch.testing.assert_close(maml.meta_loss(*data, F.mse_loss, step_weights=w), want,
                                   rtol=1e-12, atol=0)
    # learned weights (MAML++'s multi-step loss) get their gradient: each step's query loss
    (g,) = torch.autograd.grad(maml.meta_loss(*data, F.mse_loss, step_weights=learned), [learned])
    assert g.shape == (2,) and torch.all(g > 0)
    torch.testing.assert_close(g[1], maml.meta_loss(*data, F.mse_loss).detach(), rtol=1e-12, atol=0)
    # integer weights are fine: [0, 1] is plain MAML
    torch.testing.assert_close(maml.meta_loss(*data, F.mse_loss, step_weights=[0, 1]),
                               maml.meta_loss(*data, F.mse_loss), rtol=1e-12, atol=0)


def test_predict_checks_every_adapted_tensor():
    maml = pymeta.MAML(make_mlp(torch.float32), inner_lr=0.05, inner_steps=1)
    xs, ys, xq, _ = sinusoid_tasks(3, 5, 4, torch.float32, torch.Generator().manual_seed(2))
    adapted = maml.adapt(xs, ys, F.mse_loss)
    before = _snapshot(maml)
    cases = [
        ({"body.0.weight": adapted["body.0.weight"][:, :8]}, ValueError,
         r"adapted\['body.0.weight'\] has shape \[3, 8, 1\]; expected \[T, \*param.shape\] = \[3, 16, 1\]"),
        ({"head.weight": adapted["head.weight"].transpose(1, 2)}, ValueError,
         r"adapted\['head.weight'\] has shape \[3, 16, 1\]; expected .* = \[3, 1, 16\]"),
        ({"head.bias": adapted["head.bias"][0]}, ValueError,  # task dim dropped
         r"adapted\['head.bias'\] has shape \[1\] but x_query has 3 tasks"),
        ({"head.bias": 0.5}, TypeError, r"adapted\['head.bias'\] must be a Tensor .*\[3, 1\], not float"),
        ({"head.bias": adapted["head.bias"].double()}, ValueError,
         r"adapted\['head.bias'\] is torch.float64 on cpu, but the parameter is torch.float32"),
    ]
    for change, exc, match in cases:
        with pytest.raises(exc, match=match):
            maml.predict({**adapted, **change}, xq)
    with pytest.raises(ValueError, match=r"missing \['head.bias'\], unexpected \[\]"):
        maml.predict({k: v for k, v in adapted.items() if k != "head.bias"}, xq)
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['head.scale'\]"):
        maml.predict({**adapted, "head.scale": adapted["head.bias"]}, xq)
    _assert_unchanged(maml, before)
    assert maml.predict(adapted, xq).shape == (3, 4, 1)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(inner_lr=float("nan")), ValueError, "inner_lr must be a finite number, got nan"),
    (dict(inner_lr=float("inf")), ValueError, "inner_lr must be a finite number, got inf"),
    (dict(inner_lr=-0.1), ValueError, "inner_lr must be >= 0, got -0.1"),
    (dict(inner_lr=torch.tensor(float("nan"))), ValueError, "inner_lr must be a finite number"),
    (dict(inner_lr=True), TypeError, "inner_lr must be a real number.*not bool"),
    (dict(inner_lr="0.1"), TypeError, "inner_lr must be a real number.*not str '0.1'"),
    (dict(inner_lr=[0.1, 0.2]), TypeError, "inner_lr must be a real number.*not list"),
    (dict(inner_lr=torch.ones(2)), TypeError, "inner_lr must be a real number.*not Tensor"),
    (dict(first_order="False"), TypeError, "first_order must be a bool.*not str 'False'"),
    (dict(first_order=1), TypeError, "first_order must be a bool.*not int 1"),
    (dict(checkpoint_steps="no"), TypeError, "checkpoint_steps must be a bool.*not str 'no'"),
    (dict(checkpoint_steps=None), TypeError, "checkpoint_steps must be a bool"),
])
def test_bad_constructor_rates_and_flags(kwargs, exc, match):
    model = make_mlp(torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        pymeta.MAML(model, **kwargs)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("lr_mode", ["scalar", "per_layer_step", "per_param"])
def test_constructor_accepts_every_rate_form(lr_mode):
    model = make_mlp(torch.float64)
    for lr in (0, 1, 0.25, torch.tensor(0.25), torch.tensor([0.25])):
        maml = pymeta.MAML(model, inner_lr=lr, inner_steps=2, lr_mode=lr_mode,
                           first_order=True, checkpoint_steps=False)
        assert type(maml.inner_lr) is float and maml.inner_lr == float(lr)
        assert maml.first_order is True and maml.checkpoint_steps is False
    assert torch.all(pymeta.MAML(model, inner_lr=0.25, inner_steps=2, lr_mode="per_layer_step")
                     .step_lrs == 0.25)


def test_inputs_of_another_dtype_reach_the_model():
    """MAML does not insist that inputs have the parameters' dtype: a model may cast its own
    input (float64 data into a float32 model here), and integer token ids feed embeddings."""
    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(1, 1)

        def forward(self, x):
            return self.l(x.float())

    maml = pymeta.MAML(Casting(), inner_lr=0.05, inner_steps=1)
    xs, ys, xq, yq = sinusoid_tasks(3, 5, 4, torch.float32, torch.Generator().manual_seed(3))
    got = maml.meta_loss(xs.double(), ys, xq.double(), yq, F.mse_loss)
    assert torch.equal(got, maml.meta_loss(xs, ys, xq, yq, F.mse_loss))
    emb = pymeta.MAML(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 1)),
                      inner_lr=0.1, adapt=["2"])
    ids = torch.randint(0, 10, (3, 5, 2))
    assert emb.predict(emb.adapt(ids, torch.randn(3, 5, 1), F.mse_loss), ids).shape == (3, 5, 1)


def test_step_weights_may_be_a_parameter_list():
    """Learned per-step weights kept as an nn.ParameterList of [] tensors (iterable, not a
    Sequence) work, and get their gradients."""
    maml = pymeta.MAML(make_mlp(torch.float32), inner_lr=0.05, inner_steps=2)
    xs, ys, xq, yq = sinusoid_tasks(3, 5, 4, torch.float32, torch.Generator().manual_seed(3))
    w = nn.ParameterList([nn.Parameter(torch.tensor(0.25)), nn.Parameter(torch.tensor(0.75))])
    loss = maml.meta_loss(xs, ys, xq, yq, F.mse_loss, step_weights=w)
    want = maml.meta_loss(xs, ys, xq, yq, F.mse_loss, step_weights=[0.25, 0.75])
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad) for p in w)
    with pytest.raises(ValueError, match=r"step_weights\[0\] must be a finite number"):
        maml.meta_loss(xs, ys, xq, yq, F.mse_loss, step_weights=[10 ** 400, 1.0])


# ---- CUDA-graph capture of the meta-gradient ---------------------------------------------

def test_capture_needs_cuda_tensors():
    model = make_conv4(torch.float32)
    maml = pymeta.MAML(model, inner_lr=0.4, inner_steps=1)
    gen = torch.Generator().manual_seed(0)
    xs, ys, xq, yq = image_tasks(2, 5, 1, 2, 16, torch.float32, gen)
    with pytest.raises(ValueError, match="x_support is on cpu; CUDA graphs need CUDA tensors"):
        maml.capture(F.cross_entropy, xs, ys, xq, yq)


def test_capture_checks_step_weights_before_warmup():
    maml = pymeta.MAML(make_conv4(torch.float32), inner_lr=0.4, inner_steps=2)
    xs, ys, xq, yq = image_tasks(2, 5, 1, 2, 16, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"step_weights has shape \[2, 2\]"):
        maml.capture(F.cross_entropy, xs, ys, xq, yq, step_weights=torch.ones(2, 2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("lr_mode,first_order", [("scalar", False), ("per_layer_step", False),
                                                 ("per_param", True)])
def test_capture_replays_equal_eager(lr_mode, first_order):
    torch.manual_seed(0)
    model = make_conv4(torch.float64).cuda()
    maml = pymeta.MAML(model, inner_lr=0.4, inner_steps=2, lr_mode=lr_mode, first_order=first_order)
    gen = torch.Generator().manual_seed(1)
    batches = [[t.cuda() for t in image_tasks(3, 3, 1, 2, 16, torch.float64, gen)] for _ in range(3)]
    step = maml.capture(F.cross_entropy, *batches[0])
    params = [p for p in maml.parameters() if p.requires_grad]
    for batch in batches[1:] + batches[:1]:
        loss = step(*batch).clone()
        got = [p.grad.clone() for p in params]
        want_loss = maml.meta_loss(*batch, F.cross_entropy)
        want = torch.autograd.grad(want_loss, params)
        torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-10, atol=1e-12)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # An optimizer step updates params in place; the next replay sees the new values.
    opt = torch.optim.SGD(maml.parameters(), lr=0.1)
    opt.step()
    loss = step(*batches[1]).clone()
    torch.testing.assert_close(loss, maml.meta_loss(*batches[1], F.cross_entropy).detach(),
                               rtol=1e-10, atol=1e-12)
    params[0].grad = None
    with pytest.raises(RuntimeError, match="don't reset .grad"):
        step(*batches[1])


def test_grouped_conv_fn_only_where_double_backward(monkeypatch):
    """models._GroupedConv runs only in the support forwards of second-order inner steps (their
    backward is differentiated); first order and the query forward take F.conv2d. Same
    meta-gradients either way (float64)."""
    from pymeta import models
    gen = torch.Generator().manual_seed(31)
    data = image_tasks(3, 3, 1, 2, 16, torch.float64, gen)
    calls = []
    real = models._GroupedConv.apply
    monkeypatch.setattr(models._GroupedConv, "apply", lambda *a: calls.append(1) or real(*a))
    # second order: 2 steps x conv layers 2-4 = 6 support forwards, and the meta-gradient's
    # backward through each one's input and weight gradients runs 2 more (18); the 3 query
    # convs would add 3 forwards + their backward; first order: none
    for first_order, want_calls in ((False, 6 * 3), (True, 0)):
        grads = {}
        for devices in ((), ("cpu",)):
            monkeypatch.setattr(models, "_GROUPED_CONV_DEVICES", devices)
            calls.clear()
            maml = pymeta.MAML(make_conv4(torch.float64), inner_lr=0.1, inner_steps=2,
                               first_order=first_order)
            grads[devices] = torch.autograd.grad(maml.meta_loss(*data, F.cross_entropy),
                                                 list(maml.parameters()))
            assert len(calls) == (want_calls if devices else 0)
        for a, b in zip(grads[()], grads[("cpu",)]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
