"""Task families.

Sections:

* Optimizee families (learning to learn by gradient descent by gradient descent,
  Andrychowicz et al. 2016): ``QuadraticFamily``, ``DigitsMLPFamily``. A family samples a
  batch of B independent problems as ONE vectorized optimizee: a flat parameter vector
  ``theta`` of ``B * n_params`` coordinates (problem-major: problem b owns
  ``theta[b * n_params:(b + 1) * n_params]``) and a loss returning the B per-problem losses.
  The problems never mix, so the gradient of ``losses.sum()`` is every problem's own gradient,
  and one fused LSTM step covers every coordinate of every problem.

(Few-shot task samplers for the MAML family go in their own section below.)
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["OptimizeeProblem", "QuadraticFamily", "QuadraticProblem", "DigitsMLPFamily",
           "DigitsMLPProblem", "load_digits_split", "derive_seed"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (well mixed: seeds (0, 1) and (1, 0)
    give unrelated streams)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# =============================================================================================
# Optimizee families (learned optimizers)
# =============================================================================================

class OptimizeeProblem:
    """A batch of B independent optimizee problems as one vectorized optimizee.

    Subclasses set ``batch`` (B), ``shapes`` (per-problem parameter shapes), ``device``,
    ``dtype`` and implement ``_losses(params, step)`` on the unflattened ``[B, *shape]``
    parameters.
    """

    batch: int
    shapes: List[Tuple[int, ...]]
    device: torch.device
    dtype: torch.dtype
    theta0: Tensor

    @property
    def n_params(self) -> int:
        """Parameters of one problem."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Coordinates of the whole batch: ``batch * n_params``."""
        return self.batch * self.n_params

    def init_theta(self) -> Tensor:
        """The initial flat parameters ``[batch * n_params]`` (a fresh copy)."""
        return self.theta0.clone()

    def unflatten(self, theta: Tensor) -> List[Tensor]:
        """Flat ``[B * n_params]`` -> a list of ``[B, *shape]`` views."""
        rows = theta.view(self.batch, self.n_params)
        out, off = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(rows[:, off:off + n].reshape(self.batch, *s))
            off += n
        return out

    def flatten(self, params: Sequence[Tensor]) -> Tensor:
        """Inverse of ``unflatten``."""
        return torch.cat([p.reshape(self.batch, -1) for p in params], 1).reshape(-1)

    def losses(self, theta: Tensor, step: int = 0) -> Tensor:
        """The B per-problem losses ``[B]`` at flat parameters ``theta``. ``step`` picks the
        minibatch of stochastic problems (the same step gives the same minibatch)."""
        if theta.shape != (self.numel,):
            raise ValueError(f"{type(self).__name__}.losses: theta has shape {list(theta.shape)}; "
                             f"expected [{self.numel}] (batch {self.batch} x {self.n_params} params)")
        return self._losses(self.unflatten(theta), int(step))

    def _losses(self, params: List[Tensor], step: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError


# ---- quadratics ------------------------------------------------------------------------------

class QuadraticProblem(OptimizeeProblem):
    """``f_b(theta_b) = ||W_b theta_b - y_b||^2`` for b < B. ``W [B, dim, dim]``, ``y [B, dim]``."""

    def __init__(self, W: Tensor, y: Tensor, theta0: Tensor):
        self.W, self.y = W, y
        self.batch, self.dim = y.shape
        self.shapes = [(self.dim,)]
        self.device, self.dtype = y.device, y.dtype
        self.theta0 = theta0.reshape(-1)

    def _losses(self, params: List[Tensor], step: int) -> Tensor:
        (theta,) = params  # [B, dim]
        r = torch.bmm(self.W, theta.unsqueeze(2)).squeeze(2) - self.y
        return (r * r).sum(1)


class QuadraticFamily:
    """Random quadratics of the paper: ``f(theta) = ||W theta - y||^2``, ``W`` (dim x dim)
    and ``y`` (dim) with i.i.d. N(0, 1) entries, ``theta_0`` ~ N(0, init_std^2).

    ``sample(batch, seed)`` draws ``batch`` independent problems, a pure function of the seed.
    """

    def __init__(self, dim: int = 10, init_std: float = 0.01):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"QuadraticFamily: dim must be an int >= 1, got {dim!r}")
        self.dim = dim
        self.init_std = float(init_std)

    def sample(self, batch: int, seed: int, device=None,
               dtype: torch.dtype = torch.float32) -> QuadraticProblem:
        if batch < 1:
            raise ValueError(f"QuadraticFamily.sample: batch must be >= 1, got {batch}")
        g = _generator(seed)
        d = self.dim
        W = torch.randn(batch, d, d, generator=g, dtype=torch.float64)
        y = torch.randn(batch, d, generator=g, dtype=torch.float64)
        theta0 = torch.randn(batch, d, generator=g, dtype=torch.float64) * self.init_std
        return QuadraticProblem(*(t.to(device=device, dtype=dtype) for t in (W, y, theta0)))

    def __repr__(self) -> str:
        return f"QuadraticFamily(dim={self.dim})"


# ---- an MLP on scikit-learn's digits (the MNIST stand-in) -------------------------------------

_DIGITS_CACHE: Dict[Tuple[float, int], Tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 8x8 digits (1797 images, bundled with scikit-learn: no download), pixels
    scaled to [0, 1], shuffled with ``seed`` and split into ``(x_train, y_train, x_test,
    y_test)`` (float32 ``[n, 64]``, int64 ``[n]``); the test part is ``test_fraction``."""
    key = (float(test_fraction), int(seed))
    if key not in _DIGITS_CACHE:
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.int64)
        perm = torch.randperm(len(y), generator=_generator(seed))
        n_test = int(round(len(y) * test_fraction))
        te, tr = perm[:n_test], perm[n_test:]
        _DIGITS_CACHE[key] = (x[tr], y[tr], x[te], y[te])
    return _DIGITS_CACHE[key]


_ACTS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}


class DigitsMLPProblem(OptimizeeProblem):
    """B independent MLPs on the digits training split; step t's loss is the mean
    cross-entropy on a minibatch of ``batch_size`` training images drawn for (problem, t)."""

    def __init__(self, family: "DigitsMLPFamily", batch: int, seed: int, device, dtype):
        self.family = family
        self.batch = batch
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        sizes = [64] + [family.hidden] * family.layers + [10]
        self.shapes, fan_ins = [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            self.shapes += [(fan_out, fan_in), (fan_out,)]
            fan_ins += [fan_in, fan_in]
        g = _generator(derive_seed(self.seed, 0))
        parts = []  # nn.Linear's init: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for s, fan_in in zip(self.shapes, fan_ins):
            u = torch.rand(batch, *s, generator=g, dtype=torch.float64)
            parts.append((u * 2 - 1) / math.sqrt(fan_in))
        self.theta0 = self.flatten(parts).to(self.device, dtype)
        xtr, ytr, xte, yte = load_digits_split(family.test_fraction, family.split_seed)
        self.x_train, self.y_train = xtr.to(self.device, dtype), ytr.to(self.device)
        self.x_test, self.y_test = xte.to(self.device, dtype), yte.to(self.device)
        self._batches: Dict[int, Tensor] = {}

    def minibatch(self, step: int) -> Tensor:
        """``[B, batch_size]`` indices into the training split for ``step`` (deterministic)."""
        idx = self._batches.get(step)
        if idx is None:
            g = _generator(derive_seed(self.seed, 1, step))
            n = self.y_train.shape[0]
            idx = torch.randint(n, (self.batch, self.family.batch_size), generator=g)
            idx = idx.to(self.device)
            if len(self._batches) > 4096:
                self._batches.clear()
            self._batches[step] = idx
        return idx

    def logits(self, params: List[Tensor], x: Tensor) -> Tensor:
        """x ``[B, n, 64]`` -> logits ``[B, n, 10]``."""
        act = _ACTS[self.family.activation]
        h = x
        n_layers = len(params) // 2
        for i in range(n_layers):
            W, b = params[2 * i], params[2 * i + 1]
            h = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))
            if i < n_layers - 1:
                h = act(h)
        return h

    def _ce(self, params: List[Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = self.logits(params, x)
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, 10), y.reshape(-1), reduction="none").view(self.batch, -1).mean(1)

    def _losses(self, params: List[Tensor], step: int) -> Tensor:
        idx = self.minibatch(step)
        return self._ce(params, self.x_train[idx], self.y_train[idx])

    @torch.no_grad()
    def evaluate(self, theta: Tensor, split: str = "train") -> Dict[str, Tensor]:
        """Full-split mean cross-entropy and accuracy per problem: ``{"loss": [B], "acc": [B]}``."""
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        params = self.unflatten(theta)
        logits = self.logits(params, x.unsqueeze(0).expand(self.batch, -1, -1))
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 10), y.repeat(self.batch), reduction="none").view(self.batch, -1)
        acc = (logits.argmax(2) == y.unsqueeze(0)).to(theta.dtype).mean(1)
        return {"loss": loss.mean(1), "acc": acc}


class DigitsMLPFamily:
    """The paper's MNIST MLP on scikit-learn's 8x8 digits: ``64 -> hidden (x layers) -> 10``,
    ``activation`` between layers, softmax cross-entropy on minibatches of ``batch_size``
    training images. A problem is a random initialization (nn.Linear's) plus its own stream
    of minibatches; the data split (``test_fraction``, ``split_seed``) is shared by all.

    Defaults are the paper's base case (20 sigmoid units, one hidden layer, batch 128); the
    generalization tests use ``hidden=40``, ``layers=2`` or ``activation="relu"``.
    """

    def __init__(self, hidden: int = 20, layers: int = 1, activation: str = "sigmoid",
                 batch_size: int = 128, test_fraction: float = 0.2, split_seed: int = 0):
        if activation not in _ACTS:
            raise ValueError(f"DigitsMLPFamily: activation must be one of {sorted(_ACTS)}, "
                             f"not {activation!r}")
        if hidden < 1 or layers < 1 or batch_size < 1:
            raise ValueError("DigitsMLPFamily: hidden, layers and batch_size must be >= 1")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"DigitsMLPFamily: test_fraction must be in (0, 1), got {test_fraction}")
        self.hidden, self.layers, self.activation = int(hidden), int(layers), activation
        self.batch_size = int(batch_size)
        self.test_fraction, self.split_seed = float(test_fraction), int(split_seed)

    def sample(self, batch: int, seed: int, device=None,
               dtype: torch.dtype = torch.float32) -> DigitsMLPProblem:
        if batch < 1:
            raise ValueError(f"DigitsMLPFamily.sample: batch must be >= 1, got {batch}")
        return DigitsMLPProblem(self, batch, seed, device, dtype)

    def __repr__(self) -> str:
        return (f"DigitsMLPFamily(hidden={self.hidden}, layers={self.layers}, "
                f"activation={self.activation!r}, batch_size={self.batch_size})")


# =============================================================================================
# Few-shot task samplers (MAML family)
# =============================================================================================
# (to be added)
