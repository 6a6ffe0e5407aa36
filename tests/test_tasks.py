"""pymeta.tasks: optimizee families (shapes, seeding, independence of the problems of a
batch, the digits train/test split) and the few-shot part (Sinusoid, FewShotSampler on tensor
data and image folders, split_classes, digits_dataset)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pymeta.tasks import (DigitsMLPFamily, QuadraticFamily, QuadraticProblem, derive_seed,
                          load_digits_split)
from pymeta.tasks import (Episode, FewShotSampler, Sinusoid, digits_dataset, load_image_folder,
                          split_classes)


def test_quadratic_shapes_loss_and_seeding():
    fam = QuadraticFamily(dim=10)
    p = fam.sample(5, seed=3)
    assert p.W.shape == (5, 10, 10) and p.y.shape == (5, 10) and p.numel == 50
    theta = p.init_theta()
    assert theta.shape == (50,) and theta.std() < 0.05
    losses = p.losses(theta)
    expected = torch.stack([((p.W[b] @ theta.view(5, 10)[b] - p.y[b]) ** 2).sum() for b in range(5)])
    torch.testing.assert_close(losses, expected)
    q = fam.sample(5, seed=3)
    assert torch.equal(p.W, q.W) and torch.equal(p.y, q.y) and torch.equal(p.theta0, q.theta0)
    assert not torch.equal(p.W, fam.sample(5, seed=4).W)
    assert fam.sample(2, 0, dtype=torch.float64).W.dtype == torch.float64
    with pytest.raises(ValueError, match="theta has shape"):
        p.losses(torch.zeros(49))
    with pytest.raises(ValueError):
        QuadraticFamily(dim=0)


def test_problems_of_a_batch_are_independent():
    for p in (QuadraticFamily(4).sample(3, 0), DigitsMLPFamily(hidden=5, batch_size=8).sample(3, 0)):
        theta = p.init_theta().requires_grad_()
        (g,) = torch.autograd.grad(p.losses(theta)[1], theta)
        rows = g.view(3, -1)
        assert rows[0].abs().sum() == 0 and rows[2].abs().sum() == 0 and rows[1].abs().sum() > 0


def _autograd_losses_and_grad(p, theta, step):
    leaf = theta.detach().clone().requires_grad_()
    losses = p.losses(leaf, step)
    (g,) = torch.autograd.grad(losses.sum(), leaf)
    return losses.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_and_grad_equals_autograd(dtype):
    """The quadratics' closed form gives autograd's bits on the CPU; other problems go through
    autograd itself. Neither returns a graph, and theta is left as it was."""
    for p, step in ((QuadraticFamily(10).sample(7, 1, dtype=dtype), 0),
                    (QuadraticFamily(3).sample(1, 2, dtype=dtype), 5),
                    (DigitsMLPFamily(hidden=5, batch_size=8).sample(3, 0, dtype=dtype), 4)):
        theta = (p.init_theta() + 0.3 * torch.randn(p.numel, dtype=dtype)).requires_grad_()
        want_l, want_g = _autograd_losses_and_grad(p, theta, step)
        losses, g = p.losses_and_grad(theta, step)
        assert torch.equal(losses, want_l) and torch.equal(g, want_g)
        assert losses.shape == (p.batch,) and g.shape == (p.numel,)
        assert not losses.requires_grad and not g.requires_grad and g.grad_fn is None
        assert theta.grad is None and theta.is_leaf
        with pytest.raises(ValueError, match="losses_and_grad: theta has shape"):
            p.losses_and_grad(theta[:-1], step)
        with pytest.raises(ValueError, match="losses_and_grad: step must be"):
            p.losses_and_grad(theta, -1)


def test_digits_split():
    xtr, ytr, xte, yte = load_digits_split()
    assert xtr.shape[1] == 64 and len(xtr) + len(xte) == 1797 and len(xte) == 359
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0 and set(ytr.tolist()) == set(range(10))
    # a partition of the 1797 images: every image is in exactly one part (the digits set has
    # a few duplicate images, so compare multisets of rows)
    from collections import Counter
    from sklearn.datasets import load_digits
    rows = Counter(map(tuple, (torch.tensor(load_digits().data) / 16).float().tolist()))
    assert Counter(map(tuple, xtr.tolist())) + Counter(map(tuple, xte.tolist())) == rows
    xtr2, _, _, _ = load_digits_split(seed=1)
    assert not torch.equal(xtr, xtr2)


def test_digits_mlp_shapes_seeding_minibatches():
    fam = DigitsMLPFamily()
    p = fam.sample(4, seed=0)
    assert p.shapes == [(20, 64), (20,), (10, 20), (10,)]
    assert p.n_params == 64 * 20 + 20 + 20 * 10 + 10 and p.numel == 4 * p.n_params
    theta = p.init_theta()
    params = p.unflatten(theta)
    assert [tuple(t.shape) for t in params] == [(4, 20, 64), (4, 20), (4, 10, 20), (4, 10)]
    assert torch.equal(p.flatten(params), theta)
    assert params[0].abs().max() <= 1 / 8  # nn.Linear's bound 1/sqrt(64)
    assert p.minibatch(3).shape == (4, 128)
    assert torch.equal(p.minibatch(3), fam.sample(4, seed=0).minibatch(3))
    assert not torch.equal(p.minibatch(3), p.minibatch(4))
    loss = p.losses(theta, 3)
    assert loss.shape == (4,) and (loss - 2.3).abs().max() < 0.3  # ~log(10) at init
    torch.testing.assert_close(p.losses(theta, 3), loss)
    ev = p.evaluate(theta, "test")
    assert ev["loss"].shape == (4,) and ev["acc"].shape == (4,)
    q = fam.sample(4, seed=1)
    assert not torch.equal(q.init_theta(), theta)


@pytest.mark.parametrize("kw,shapes", [
    (dict(hidden=40), [(40, 64), (40,), (10, 40), (10,)]),
    (dict(layers=2), [(20, 64), (20,), (20, 20), (20,), (10, 20), (10,)]),
    (dict(activation="relu"), [(20, 64), (20,), (10, 20), (10,)]),
])
def test_digits_mlp_variants(kw, shapes):
    p = DigitsMLPFamily(**kw).sample(2, seed=0)
    assert p.shapes == shapes
    assert p.losses(p.init_theta(), 0).shape == (2,)


def test_digits_family_errors_and_derive_seed():
    with pytest.raises(ValueError, match="activation"):
        DigitsMLPFamily(activation="gelu2")
    with pytest.raises(ValueError):
        DigitsMLPFamily(hidden=0)
    assert derive_seed(0, 1) != derive_seed(1, 0) and derive_seed(0, 1) == derive_seed(0, 1)
    assert 0 <= derive_seed(5) < 2 ** 63


# ---- few-shot task samplers ------------------------------------------------------------



def _toy(classes=6, per_class=10, side=4):
    """x[i] is a [1, side, side] image whose every pixel encodes (class, example index), so a
    drawn example can be traced back and rotations can be checked exactly."""
    y = torch.arange(classes).repeat_interleave(per_class)
    base = torch.arange(side * side, dtype=torch.float32).view(1, side, side)
    x = torch.stack([base + 1000 * y[i] + 100 * (i % per_class) for i in range(len(y))])
    return x, y


# ---- Sinusoid --------------------------------------------------------------------------------

def test_sinusoid_shapes_ranges_and_function():
    b = Sinusoid(seed=0).sample(7, 5, 3)
    assert b.x_support.shape == (7, 5, 1) and b.y_support.shape == (7, 5, 1)
    assert b.x_query.shape == (7, 3, 1) and b.y_query.shape == (7, 3, 1)
    assert b.amplitude.shape == (7,) and b.phase.shape == (7,)
    assert b.x_support.dtype == torch.float32
    assert ((b.amplitude >= 0.1) & (b.amplitude <= 5)).all()
    assert ((b.phase >= 0) & (b.phase <= math.pi)).all()
    assert (b.x_support.abs() <= 5).all() and (b.x_query.abs() <= 5).all()
    want = b.amplitude[:, None, None] * torch.sin(b.x_support - b.phase[:, None, None])
    torch.testing.assert_close(b.y_support, want, rtol=1e-5, atol=1e-5)


def test_sinusoid_seeding():
    a, b, c = Sinusoid(seed=3).sample(4, 5, 5), Sinusoid(seed=3).sample(4, 5, 5), Sinusoid(seed=4).sample(4, 5, 5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a.x_support, c.x_support)
    s = Sinusoid(seed=3)
    first, second = s.sample(4, 5), s.sample(4, 5)  # the generator advances
    assert not torch.equal(first.x_support, second.x_support)


def test_sinusoid_bad_inputs():
    with pytest.raises(ValueError, match="shots"):
        Sinusoid(seed=0).sample(2, 0)
    with pytest.raises(ValueError, match="tasks"):
        Sinusoid(seed=0).sample(0, 5)
    with pytest.raises(TypeError, match="queries"):
        Sinusoid(seed=0).sample(2, 5, 1.5)
    with pytest.raises(ValueError, match="amplitude"):
        Sinusoid(amplitude=(5, 0.1))


# ---- FewShotSampler on tensors ----------------------------------------------------------------

def test_sampler_shapes_and_label_remapping():
    x, y = _toy()
    s = FewShotSampler(x, y, n_way=3, k_shot=2, q_queries=4, seed=0)
    e = s.sample(5)
    assert isinstance(e, Episode)
    assert e.x_support.shape == (5, 6, 1, 4, 4) and e.y_support.shape == (5, 6)
    assert e.x_query.shape == (5, 12, 1, 4, 4) and e.y_query.shape == (5, 12)
    assert e.classes.shape == (5, 3)
    assert e.y_support.dtype == torch.long
    assert e.y_support[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert e.y_query[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for t in range(5):
        assert len(set(e.classes[t].tolist())) == 3  # N distinct classes
        for xs, ys in ((e.x_support[t], e.y_support[t]), (e.x_query[t], e.y_query[t])):
            true_class = (xs[:, 0, 0, 0] // 1000).long()
            # label j stands for the class classes[t, j] everywhere in the episode
            assert torch.equal(true_class, e.classes[t][ys])
        # support and query examples of one episode are all distinct
        ids = torch.cat([e.x_support[t, :, 0, 0, 0], e.x_query[t, :, 0, 0, 0]])
        assert ids.unique().numel() == ids.numel()


def test_sampler_zero_queries_and_device_dtype_kept():
    x, y = _toy()
    e = FewShotSampler(x.double(), y, 2, 3, 0, seed=0).sample(2)
    assert e.x_query.shape == (2, 0, 1, 4, 4) and e.x_support.dtype == torch.float64


def test_sampler_seeding_determinism():
    x, y = _toy()
    a = FewShotSampler(x, y, 3, 1, 2, seed=11).sample(8)
    b = FewShotSampler(x, y, 3, 1, 2, seed=11).sample(8)
    c = FewShotSampler(x, y, 3, 1, 2, seed=12).sample(8)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a.x_support, c.x_support)
    g = torch.Generator().manual_seed(5)
    d = FewShotSampler(x, y, 3, 1, 2, seed=0).sample(8, generator=g)
    e = FewShotSampler(x, y, 3, 1, 2, seed=99).sample(8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(d.x_support, e.x_support)


def test_sampler_draws_every_class_and_example():
    x, y = _toy(classes=4, per_class=5)
    e = FewShotSampler(x, y, 2, 2, 1, seed=0).sample(400)
    assert set(e.classes.flatten().tolist()) == {0, 1, 2, 3}
    seen = torch.cat([e.x_support[..., 0, 0, 0].flatten(), e.x_query[..., 0, 0, 0].flatten()]).unique()
    assert seen.numel() == 20


def test_disjoint_splits():
    x, y = _toy(classes=10)
    parts = split_classes(10, {"train": 6, "val": 2, "test": -1}, seed=0)
    assert sorted(sum(parts.values(), [])) == list(range(10))
    assert len(parts["train"]) == 6 and len(parts["val"]) == 2 and len(parts["test"]) == 2
    assert split_classes(10, [6, 2, 2], seed=0) == parts
    samplers = FewShotSampler.splits(x, y, 2, 1, 2, classes=parts, seed=0)
    for name, s in samplers.items():
        drawn = (s.sample(50).x_support[..., 0, 0, 0] // 1000).long().unique().tolist()
        assert set(drawn) <= set(parts[name]), name
    with pytest.raises(ValueError, match="overlap"):
        FewShotSampler.splits(x, y, 2, 1, 2, classes={"train": [0, 1, 2], "test": [2, 3, 4]})
    with pytest.raises(ValueError, match="sizes"):
        split_classes(5, [4, 4])
    with pytest.raises(ValueError, match="split 'val': .*n_way=3"):
        FewShotSampler.splits(x, y, 3, 1, 2, classes=parts)


def test_rotation_augmentation():
    x, y = _toy(classes=2, per_class=6)
    s = FewShotSampler(x, y, 8, 1, 1, rotations=True, seed=0)
    assert s.num_classes == 8
    assert s.class_names[:4] == [(0, 0), (0, 90), (0, 180), (0, 270)]
    e = s.sample(3)
    for t in range(3):
        for j, cid in enumerate(e.classes[t].tolist()):
            label, angle = s.class_names[cid]
            img = e.x_support[t, j]  # K = 1: row j has label j
            # undo the rotation: the image must be one of this class's originals
            back = torch.rot90(img, -(angle // 90), dims=(-2, -1))
            assert ((back - x[y == label]).abs().flatten(1).sum(1) == 0).any()
            if angle:
                assert not torch.equal(img, back)
    only_180 = FewShotSampler(x, y, 4, 1, 1, rotations=(0, 180), seed=0)
    assert only_180.num_classes == 4
    with pytest.raises(ValueError, match="rotations"):
        FewShotSampler(x, y, 2, 1, 1, rotations=(45,))
    with pytest.raises(ValueError, match="square"):
        FewShotSampler(torch.zeros(12, 1, 4, 5), y, 2, 1, 1, rotations=True)


def test_sampler_bad_inputs():
    x, y = _toy(classes=4, per_class=5)
    with pytest.raises(ValueError, match="n_way=5"):
        FewShotSampler(x, y, 5, 1, 1)
    with pytest.raises(ValueError, match="k_shot \\+ q_queries = 6"):
        FewShotSampler(x, y, 2, 3, 3)
    with pytest.raises(ValueError, match="n_way"):
        FewShotSampler(x, y, 0, 1, 1)
    with pytest.raises(ValueError, match="k_shot"):
        FewShotSampler(x, y, 2, 0, 1)
    with pytest.raises(ValueError, match="q_queries"):
        FewShotSampler(x, y, 2, 1, -1)
    with pytest.raises(TypeError, match="k_shot"):
        FewShotSampler(x, y, 2, 1.0, 1)
    with pytest.raises(ValueError, match="x has 19 examples but y has 20"):
        FewShotSampler(x[:19], y, 2, 1, 1)
    with pytest.raises(ValueError, match="y must be a 1-D integer"):
        FewShotSampler(x, y.float(), 2, 1, 1)
    with pytest.raises(ValueError, match="classes lists labels not present"):
        FewShotSampler(x, y, 2, 1, 1, classes=[0, 7])
    with pytest.raises(ValueError, match="tasks"):
        FewShotSampler(x, y, 2, 1, 1, seed=0).sample(0)


# ---- image folders ------------------------------------------------------------------------------

def _write_tree(root, layout, size=(10, 12), per_class=4):
    from PIL import Image

    for ci, cls in enumerate(layout):
        d = root.joinpath(*cls.split("/"))
        d.mkdir(parents=True)
        for i in range(per_class):
            value = 20 * ci + i  # a flat gray level per image, identifies (class, example)
            Image.new("L", size, color=value).save(d / f"{i:02d}.png")
    (root / "README.txt").write_text("not an image")


def test_image_folder_omniglot_layout(tmp_path):
    layout = ["Greek/character01", "Greek/character02", "Latin/character01"]
    _write_tree(tmp_path, layout)
    x, y, names = load_image_folder(tmp_path, size=8)
    assert names == layout
    assert x.shape == (12, 1, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.allclose(x[5], torch.full((1, 8, 8), 21 / 255))  # class 1, example 1
    rgb, _, _ = load_image_folder(tmp_path, size=(6, 7), grayscale=False)
    assert rgb.shape == (12, 3, 6, 7)
    inv, _, _ = load_image_folder(tmp_path, size=8, invert=True)
    torch.testing.assert_close(inv, 1 - x)
    s = FewShotSampler.from_folder(tmp_path, 2, 1, 2, size=8, seed=0, rotations=True,
                                   classes=["Greek/character01", "Latin/character01"])
    assert s.num_classes == 8
    e = s.sample(3)
    assert e.x_support.shape == (3, 2, 1, 8, 8) and e.x_query.shape == (3, 4, 1, 8, 8)
    level = (e.x_support[..., 0, 0] * 255).round().long().flatten()
    assert set((level // 20).tolist()) <= {0, 2}  # only the two chosen classes


def test_image_folder_flat_layout_and_errors(tmp_path):
    _write_tree(tmp_path / "flat", ["cat", "dog"], size=(5, 5), per_class=3)
    x, y, names = load_image_folder(tmp_path / "flat", size=None)
    assert names == ["cat", "dog"] and x.shape == (6, 1, 5, 5)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no class folders with images"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="root"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="size"):
        load_image_folder(tmp_path / "flat", size=0)
    with pytest.raises(ValueError, match="k_shot \\+ q_queries"):
        FewShotSampler.from_folder(tmp_path / "flat", 2, 2, 2, size=5)
    with pytest.raises(ValueError, match="not classes"):
        FewShotSampler.from_folder(tmp_path / "flat", 2, 1, 1, size=5, classes=["cat", "cow"])
    from PIL import Image

    Image.new("L", (9, 9)).save(tmp_path / "flat" / "dog" / "big.png")
    with pytest.raises(ValueError, match="different sizes"):
        load_image_folder(tmp_path / "flat", size=None)


def test_digits_dataset():
    x, y = digits_dataset()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert 0 <= x.min() and x.max() <= 1
    assert y.unique().tolist() == list(range(10))


# ---- bad inputs: clear errors naming the argument, no silent wrong results ------------------------

@pytest.mark.parametrize("angle", [90, 180, 270])
def test_a_single_rotation_rotates(angle):
    # one non-zero angle is a rotation too (it used to run only when angles were mixed)
    x, y = _toy(classes=2, per_class=6)
    s = FewShotSampler(x, y, 1, 1, 1, rotations=[angle], seed=0)
    assert s.class_names == [(0, angle), (1, angle)]
    e = s.sample(4)
    for t in range(4):
        label, a = s.class_names[e.classes[t, 0]]
        assert a == angle
        for img in (e.x_support[t, 0], e.x_query[t, 0]):
            originals = x[y == label]
            rotated = torch.rot90(originals, angle // 90, dims=(-2, -1))
            assert ((rotated - img).abs().flatten(1).sum(1) == 0).any()
            assert not ((originals - img).abs().flatten(1).sum(1) == 0).any()


def test_integer_dtypes_refused():
    with pytest.raises(TypeError, match="dtype"):
        QuadraticFamily(3).sample(2, 0, dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        DigitsMLPFamily().sample(1, 0, dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        Sinusoid(seed=0).sample(2, 3, dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        digits_dataset(torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        QuadraticFamily(3).sample(2, 0, dtype="float32")
    assert digits_dataset(torch.float64)[0].dtype == torch.float64


@pytest.mark.parametrize("kw,name", [
    (dict(amplitude=(0, math.inf)), "amplitude"), (dict(x_range=(-math.inf, 5)), "x_range"),
    (dict(phase=(0, math.nan)), "phase"), (dict(amplitude=(5, 0.1)), "amplitude"),
])
def test_sinusoid_ranges_finite(kw, name):
    with pytest.raises(ValueError, match=name):
        Sinusoid(**kw)


@pytest.mark.parametrize("kw,name", [
    (dict(amplitude="12"), "amplitude"), (dict(amplitude=(1, 2, 3)), "amplitude"),
    (dict(x_range=(True, 5)), "x_range"), (dict(phase=5), "phase"), (dict(seed=1.5), "seed"),
    (dict(seed="3"), "seed"),
])
def test_sinusoid_bad_types(kw, name):
    with pytest.raises(TypeError, match=name):
        Sinusoid(**kw)


def test_quadratic_family_bad_inputs():
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="init_std"):
            QuadraticFamily(3, init_std=bad)
    assert torch.equal(QuadraticFamily(3, init_std=0).sample(2, 0).theta0, torch.zeros(6))
    for bad in (True, 2.0, "3"):
        with pytest.raises(TypeError, match="dim"):
            QuadraticFamily(dim=bad)
    fam = QuadraticFamily(3)
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="batch"):
            fam.sample(bad, 0)
    with pytest.raises(ValueError, match="batch"):
        fam.sample(0, 0)
    for bad in (1.9, True, "1"):
        with pytest.raises(TypeError, match="seed"):
            fam.sample(2, bad)
    for bad in (-1, 2 ** 64):
        with pytest.raises(ValueError, match="seed"):
            fam.sample(2, bad)
    assert torch.equal(fam.sample(2, np.int64(4)).W, fam.sample(2, 4).W)
    assert fam.sample(np.int64(2), 2 ** 64 - 1).batch == 2


def test_quadratic_problem_checks():
    p = QuadraticFamily(3).sample(2, 0)
    theta = p.init_theta()
    with pytest.raises(ValueError, match="theta0"):
        QuadraticProblem(p.W, p.y, torch.zeros(5))
    with pytest.raises(ValueError, match="W must be"):
        QuadraticProblem(p.W[:, :2], p.y, p.theta0)
    with pytest.raises(TypeError, match="dtype"):
        QuadraticProblem(p.W.long(), p.y, p.theta0)
    assert QuadraticProblem(p.W, p.y, p.theta0.view(2, 3)).numel == 6
    with pytest.raises(ValueError, match="step"):
        p.losses(theta, -1)
    with pytest.raises(TypeError, match="step"):
        p.losses(theta, 1.5)
    with pytest.raises(TypeError, match="theta has dtype torch.float64"):
        p.losses(theta.double())
    with pytest.raises(TypeError, match="theta must be a tensor"):
        p.losses(theta.tolist())
    assert torch.equal(p.losses(theta, np.int64(3)), p.losses(theta, 3))
    for lo, hi in ((0, 3), (1, 1), (-1, 1), (2, 1)):
        with pytest.raises(ValueError, match="start"):
            p.subset(lo, hi)
    with pytest.raises(TypeError, match="stop"):
        p.subset(0, 1.5)
    sub = p.subset(1, 2)
    assert sub.batch == 1 and torch.equal(sub.W[0], p.W[1]) and torch.equal(sub.theta0, p.theta0[3:])


def test_digits_problem_checks():
    fam = DigitsMLPFamily(hidden=5, batch_size=8)
    p = fam.sample(3, 0)
    theta = p.init_theta()
    with pytest.raises(ValueError, match="split"):
        p.evaluate(theta, "tset")
    with pytest.raises(ValueError, match="theta has shape"):
        p.evaluate(theta[:-1])
    with pytest.raises(TypeError, match="theta has dtype"):
        p.evaluate(theta.double(), "test")
    with pytest.raises(TypeError, match="theta has dtype"):
        p.losses(theta.double())
    with pytest.raises(ValueError, match="step"):
        p.losses(theta, -1)
    with pytest.raises(ValueError, match="step"):
        p.minibatch(-1)
    with pytest.raises(ValueError, match="start"):
        p.subset(0, 4)
    with pytest.raises(ValueError, match="start"):
        p.subset(2, 2)
    sub = p.subset(1, 3)
    assert sub.batch == 2 and torch.equal(sub.minibatch(5), p.minibatch(5)[1:])
    assert set(p.evaluate(theta, "train")) == {"loss", "acc"}


@pytest.mark.parametrize("kw,name,exc", [
    (dict(hidden=2.5), "hidden", TypeError), (dict(hidden=True), "hidden", TypeError),
    (dict(hidden="20"), "hidden", TypeError), (dict(layers=1.9), "layers", TypeError),
    (dict(batch_size=3.7), "batch_size", TypeError), (dict(layers=0), "layers", ValueError),
    (dict(activation=["relu"]), "activation", TypeError),
    (dict(test_fraction=1e-6), "test_fraction", ValueError),
    (dict(test_fraction=0.9999), "test_fraction", ValueError),
    (dict(test_fraction=math.nan), "test_fraction", ValueError),
    (dict(test_fraction="0.2"), "test_fraction", TypeError),
    (dict(split_seed=1.5), "split_seed", TypeError), (dict(split_seed=-1), "split_seed", ValueError),
])
def test_digits_family_bad_inputs(kw, name, exc):
    with pytest.raises(exc, match=name):
        DigitsMLPFamily(**kw)


def test_digits_family_sample_checks_and_numpy_ints():
    fam = DigitsMLPFamily(hidden=np.int64(5), layers=np.int32(1), batch_size=np.int64(8))
    assert type(fam.hidden) is int and fam.hidden == 5
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="batch"):
            fam.sample(bad, 0)
    with pytest.raises(TypeError, match="seed"):
        fam.sample(2, 1.9)


def test_load_digits_split_checks_and_copies():
    for bad in (1.5, -0.5, 0.0, 1.0, 1e-6, 0.9999):
        with pytest.raises(ValueError, match="test_fraction"):
            load_digits_split(bad)
    with pytest.raises(TypeError, match="seed"):
        load_digits_split(0.2, 1.5)
    a = load_digits_split(0.2, 0)
    a[0].fill_(7.0)  # the caller's copy: the cache (shared by the problems) is untouched
    assert load_digits_split(0.2, 0)[0].max() <= 1.0


def test_derive_seed_checks():
    for bad in (1.7, True, "3", None):
        with pytest.raises(TypeError, match="keys\\[0\\]"):
            derive_seed(bad)
    with pytest.raises(ValueError, match="keys\\[1\\]"):
        derive_seed(0, -1)
    assert derive_seed(np.uint64(3), np.int64(4)) == derive_seed(3, 4)
    # keys of any size (meta_train's seed is any int >= 0); the result fits a generator
    assert derive_seed(2 ** 64, 1) == 4383729030133993156  # (the value before the checks)
    assert 0 <= derive_seed(2 ** 64 - 1) < 2 ** 63


def test_sampler_seed_and_generator_checks():
    x, y = _toy()
    for bad in (1.5, True, "0"):
        with pytest.raises(TypeError, match="seed"):
            FewShotSampler(x, y, 2, 1, 1, seed=bad)
    with pytest.raises(ValueError, match="seed"):
        FewShotSampler(x, y, 2, 1, 1, seed=-1)
    s = FewShotSampler(x, y, 2, 1, 1, seed=np.int64(3))
    assert s.seed == 3 and type(s.seed) is int
    with pytest.raises(TypeError, match="generator"):
        s.sample(2, generator=5)
    with pytest.raises(TypeError, match="generator"):
        Sinusoid(seed=0).sample(2, 3, generator=5)
    with pytest.raises(TypeError, match="tasks"):
        s.sample(2.0)


def test_sampler_sparse_labels():
    # labels far apart: counted without a dense bincount over 0..10**12
    x, y = _toy(classes=3, per_class=4)
    y = torch.tensor([0, 10 ** 7, 10 ** 12])[y]
    s = FewShotSampler(x, y, 2, 1, 2, seed=0)
    assert s.class_names == [0, 10 ** 7, 10 ** 12]
    e = s.sample(20)
    for t in range(20):
        true = (e.x_support[t, :, 0, 0, 0] // 1000).long()
        assert torch.equal(y[true * 4], torch.tensor(s.class_names)[e.classes[t]])
    with pytest.raises(ValueError, match="k_shot \\+ q_queries = 5"):
        FewShotSampler(x, y, 2, 2, 3)


def test_sampler_bad_rotations_and_classes():
    x, y = _toy(classes=4, per_class=5)
    for bad in (90, "90", [90.0], [False]):
        with pytest.raises(TypeError, match="rotations"):
            FewShotSampler(x, y, 2, 1, 1, rotations=bad)
    for bad in ([1.0, 2.0], [True, 2]):
        with pytest.raises(TypeError, match="classes\\[0\\]"):
            FewShotSampler(x, y, 2, 1, 1, classes=bad)
    for bad in ("12", 3, {1: 1}):
        with pytest.raises(TypeError, match="classes"):
            FewShotSampler(x, y, 2, 1, 1, classes=bad)
    with pytest.raises(TypeError, match="classes"):
        FewShotSampler(x, y, 2, 1, 1, classes=torch.tensor([1.0, 2.0]))
    a = FewShotSampler(x, y, 2, 1, 1, classes=torch.tensor([1, 2]), seed=0)
    b = FewShotSampler(x, y, 2, 1, 1, classes=[np.int64(1), 2], seed=0)
    assert a.class_names == b.class_names == [1, 2]
    assert torch.equal(a.sample(3).x_support, b.sample(3).x_support)
    with pytest.raises(TypeError, match="classes"):
        FewShotSampler.splits(x, y, 2, 1, 1, classes=[[0, 1], [2, 3]])
    with pytest.raises(TypeError, match="classes\\['a'\\]"):
        FewShotSampler.splits(x, y, 2, 1, 1, classes={"a": None})
    with pytest.raises(TypeError, match="seed"):
        FewShotSampler.splits(x, y, 2, 1, 1, classes={"a": [0, 1]}, seed=0.5)


def test_split_classes_bad_inputs_and_numpy_ints():
    assert split_classes(np.int64(10), [np.int64(6), np.int64(4)], seed=0) == split_classes(10, [6, 4], seed=0)
    with pytest.raises(TypeError, match="sizes"):
        split_classes(10, 5)
    with pytest.raises(TypeError, match="sizes"):
        split_classes(10, "55")
    with pytest.raises(TypeError, match="sizes\\['train'\\]"):
        split_classes(10, [5.0, 5])
    with pytest.raises(ValueError, match="sizes\\['val'\\]"):
        split_classes(10, [5, -2])
    with pytest.raises(TypeError, match="classes"):
        split_classes("abc", [1, 2])
    with pytest.raises(TypeError, match="classes"):
        split_classes([[0], [1]], [1, 1])
    with pytest.raises(ValueError, match="classes"):
        split_classes(-1, [0])
    for bad in (1.5, "1"):
        with pytest.raises(TypeError, match="seed"):
            split_classes(10, [5, 5], seed=bad)


def test_image_folder_bad_files_and_arguments(tmp_path):
    from PIL import Image
    from pymeta._io import FileFormatError

    _write_tree(tmp_path / "t", ["a", "b"], size=(6, 6), per_class=2)
    Image.new("L", (6, 6)).save(tmp_path / "t" / "a" / "x.jpg")
    x, y, _ = load_image_folder(tmp_path / "t", size=np.int64(4), extensions=".png")
    assert x.shape == (4, 1, 4, 4)  # the .jpg is not loaded (".png" is one extension)
    assert load_image_folder(tmp_path / "t", size=4)[0].shape == (5, 1, 4, 4)
    for bad in (2.5, True, (4, 4.0), "4", (4, 4, 4)):
        with pytest.raises(TypeError, match="size"):
            load_image_folder(tmp_path / "t", size=bad)
    with pytest.raises(ValueError, match="size"):
        load_image_folder(tmp_path / "t", size=(4, 0))
    with pytest.raises(TypeError, match="extensions"):
        load_image_folder(tmp_path / "t", extensions=[1])
    with pytest.raises(TypeError, match="classes"):
        FewShotSampler.from_folder(tmp_path / "t", 2, 1, 1, size=4, classes="ab")
    # a truncated PNG and a file that is no image: the error names the file
    good = (tmp_path / "t" / "b" / "00.png").read_bytes()
    (tmp_path / "t" / "b" / "01.png").write_bytes(good[:len(good) // 2])
    with pytest.raises(FileFormatError, match="01.png"):
        load_image_folder(tmp_path / "t", size=4)
    (tmp_path / "t" / "b" / "01.png").write_bytes(b"not an image at all")
    with pytest.raises(FileFormatError, match="01.png"):
        load_image_folder(tmp_path / "t", size=4)


def test_review_fixes_numbers_as_before():
    """What worked before the checks still does: one-element tensors as numbers (float() /
    int() took them), seeds of any size for derive_seed; and a bool or float step never
    reads another step's cached minibatch; a non-tensor y is a TypeError, not AttributeError."""
    p = QuadraticFamily(3, torch.tensor(0.1)).sample(2, 0)
    theta = p.init_theta()
    assert torch.equal(p.losses(theta, torch.tensor(2)), p.losses(theta, 2))
    got = Sinusoid(amplitude=torch.tensor([0.1, 5.0]), seed=torch.tensor(3)).sample(2, 3)
    want = Sinusoid(amplitude=(0.1, 5.0), seed=3).sample(2, 3)
    assert all(torch.allclose(a, b) for a, b in zip(got, want))
    d = DigitsMLPFamily(hidden=5, batch_size=8).sample(2, 0)
    d.minibatch(1)  # cached now
    for bad in (True, 1.0):
        with pytest.raises(TypeError, match="step"):
            d.minibatch(bad)
    with pytest.raises(TypeError, match="y must be a tensor"):
        QuadraticProblem(torch.zeros(1, 2, 2), [[0.0, 0.0]], torch.zeros(2))
