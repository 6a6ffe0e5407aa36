"""pymeta.tasks: optimizee families (shapes, seeding, independence of the problems of a
batch, the digits train/test split)."""
from __future__ import annotations

import pytest
import torch

from pymeta.tasks import DigitsMLPFamily, QuadraticFamily, derive_seed, load_digits_split


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
