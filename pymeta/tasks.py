"""Task families.

Sections:

* Optimizee families (learning to learn by gradient descent by gradient descent,
  Andrychowicz et al. 2016): ``QuadraticFamily``, ``DigitsMLPFamily``. A family samples a
  batch of B independent problems as ONE vectorized optimizee: a flat parameter vector
  ``theta`` of ``B * n_params`` coordinates (problem-major: problem b owns
  ``theta[b * n_params:(b + 1) * n_params]``) and a loss returning the B per-problem losses.
  The problems never mix, so the gradient of ``losses.sum()`` is every problem's own gradient,
  and one fused LSTM step covers every coordinate of every problem.

* Few-shot task samplers for the MAML family: the sinusoid regression family of MAML /
  Meta-SGD (``Sinusoid``), N-way K-shot episodes from any labelled tensor dataset or an
  image-folder tree (``FewShotSampler``, ``load_image_folder``), disjoint class splits
  (``split_classes``) and scikit-learn's digits as a small real data set
  (``digits_dataset``). Nothing is downloaded at run time.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from pymeta import _checks
from pymeta._io import FileFormatError

__all__ = ["OptimizeeProblem", "QuadraticFamily", "QuadraticProblem", "DigitsMLPFamily",
           "DigitsMLPProblem", "load_digits_split", "derive_seed", "autograd_losses_and_grad",
           "Sinusoid", "SinusoidTasks", "FewShotSampler", "Episode", "load_image_folder",
           "split_classes", "digits_dataset"]


_SEED_END = 2 ** 64  # seeds are ints in [0, 2**64): what torch.Generator.manual_seed takes


def _seed(where: str, name: str, v: Any, optional: bool = False) -> Optional[int]:
    """A seed as an int in [0, 2**64) (None too where optional), or an error naming it. Floats
    are refused (1.7 would draw seed 1's stream), as are bools and strings."""
    if v is None and optional:
        return None
    if type(v) is not int or not 0 <= v < _SEED_END:  # the usual case skips the ABC check
        v = _checks.integer(where, name, v, min=0)
        if v >= _SEED_END:
            raise ValueError(f"{where}: {name} must be an int in [0, 2**64), got {v!r}")
    return v


def _float_dtype(where: str, dtype: Any) -> torch.dtype:
    """A floating torch dtype, or a TypeError: an integer dtype would truncate the data."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{where}: dtype must be a floating torch dtype (e.g. torch.float32), "
                        f"not {dtype!r}")
    return dtype


def _not_str_seq(where: str, name: str, v: Any, what: str) -> list:
    """``list(v)`` for an iterable v that is not a str / bytes / dict (which would be iterated
    character by character or key by key), else a TypeError naming it."""
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Iterable):
        raise TypeError(f"{where}: {name} must be a sequence of {what}, not {type(v).__name__} {v!r}")
    return list(v)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of ints >= 0, of any size (well mixed: seeds (0, 1) and
    (1, 0) give unrelated streams)."""
    keys = [_checks.integer("pymeta.tasks.derive_seed", f"keys[{i}]", k, min=0)
            for i, k in enumerate(keys)]
    return int(np.random.SeedSequence(keys).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# =============================================================================================
# Optimizee families (learned optimizers)
# =============================================================================================

def autograd_losses_and_grad(losses_fn: Callable[[Tensor, int], Tensor], theta: Tensor,
                             step: int) -> Tuple[Tensor, Tensor]:
    """``(losses, d losses.sum() / d theta)`` of ``losses_fn(theta, step)``, both without a
    graph, by autograd on a fresh leaf sharing theta's memory (theta itself is not touched)."""
    leaf = theta.detach().requires_grad_()
    with torch.enable_grad():
        losses = losses_fn(leaf, step)
        (g,) = torch.autograd.grad(losses.sum(), leaf)
    return losses.detach(), g


class OptimizeeProblem:
    """A batch of B independent optimizee problems as one vectorized optimizee.

    Subclasses set ``batch`` (B), ``shapes`` (per-problem parameter shapes), ``device``,
    ``dtype`` and implement ``_losses(params, step)`` on the unflattened ``[B, *shape]``
    parameters. Those with a closed-form gradient may also override
    ``_losses_and_grad(theta, step)`` (see ``losses_and_grad``), which meta-training calls
    every step.
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

    def _check_theta(self, where: str, theta: Tensor) -> None:
        # Called every optimizer step: metadata only (no device sync), messages built on error.
        if isinstance(theta, Tensor) and theta.shape == (self.numel,) and theta.dtype == self.dtype:
            return
        where = f"{type(self).__name__}.{where}"
        if not isinstance(theta, Tensor):
            raise TypeError(f"{where}: theta must be a tensor, not {type(theta).__name__}")
        if theta.shape != (self.numel,):
            raise ValueError(f"{where}: theta has shape {list(theta.shape)}; expected "
                             f"[{self.numel}] (batch {self.batch} x {self.n_params} params)")
        raise TypeError(f"{where}: theta has dtype {theta.dtype}; expected the problem's "
                        f"{self.dtype}")

    def losses(self, theta: Tensor, step: int = 0) -> Tensor:
        """The B per-problem losses ``[B]`` at flat parameters ``theta``. ``step`` (an int
        >= 0) picks the minibatch of stochastic problems (the same step gives the same
        minibatch)."""
        self._check_theta("losses", theta)
        if type(step) is not int or step < 0:
            step = _checks.integer(f"{type(self).__name__}.losses", "step", step, min=0)
        return self._losses(self.unflatten(theta), step)

    def losses_and_grad(self, theta: Tensor, step: int = 0) -> Tuple[Tensor, Tensor]:
        """``(losses [B], grad [N])`` at flat parameters ``theta`` ``[N]``: the per-problem
        losses of ``losses(theta, step)`` and ``d sum_b f_b / d theta``, both without a graph
        (theta is read detached). Each problem's coordinates get that problem's own gradient.

        What the learned optimizer is fed, and (over B) the gradient of a meta-loss term
        ``mean_b f_b(theta)`` at theta (see ``pymeta.meta_train.unroll``). The default is
        autograd on a fresh leaf; a problem with a closed form overrides ``_losses_and_grad``
        (``QuadraticProblem``: the same values, without the engine's per-call cost).
        """
        self._check_theta("losses_and_grad", theta)
        if type(step) is not int or step < 0:
            step = _checks.integer(f"{type(self).__name__}.losses_and_grad", "step", step, min=0)
        return self._losses_and_grad(theta.detach(), step)

    def _losses(self, params: List[Tensor], step: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _losses_and_grad(self, theta: Tensor, step: int) -> Tuple[Tensor, Tensor]:
        # (through losses(), which a subclass may have overridden)
        return autograd_losses_and_grad(self.losses, theta, step)

    def _check_rows(self, start: int, stop: int) -> Tuple[int, int]:
        where = f"{type(self).__name__}.subset"
        start = _checks.integer(where, "start", start, min=0)
        stop = _checks.integer(where, "stop", stop)
        if not start < stop <= self.batch:  # slicing would truncate silently
            raise ValueError(f"{where}: need 0 <= start < stop <= batch ({self.batch}), got "
                             f"start={start}, stop={stop}")
        return start, stop

    def subset(self, start: int, stop: int) -> "OptimizeeProblem":
        """Problems ``start..stop-1`` of this batch as a problem of their own, identical to
        those problems here (used to shard a meta-batch across ranks)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be split into shards (it has "
                                  f"no subset method); distributed meta_train needs one")


# ---- quadratics ------------------------------------------------------------------------------

class QuadraticProblem(OptimizeeProblem):
    """``f_b(theta_b) = ||W_b theta_b - y_b||^2`` for b < B. ``W [B, dim, dim]``, ``y [B, dim]``."""

    def __init__(self, W: Tensor, y: Tensor, theta0: Tensor):
        where = "QuadraticProblem"
        for name, t in (("W", W), ("y", y), ("theta0", theta0)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{where}: {name} must be a tensor, not {type(t).__name__}")
        for name, t in (("W", W), ("y", y), ("theta0", theta0)):
            if not t.is_floating_point() or t.dtype != y.dtype or t.device != y.device:
                raise TypeError(f"{where}: W, y and theta0 must share one floating dtype and "
                                f"device; {name} is {t.dtype} on {t.device}, y {y.dtype} on {y.device}")
        if y.dim() != 2 or y.shape[0] < 1 or y.shape[1] < 1:
            raise ValueError(f"{where}: y must be [B, dim] with B, dim >= 1, got {list(y.shape)}")
        B, d = y.shape
        if W.shape != (B, d, d):
            raise ValueError(f"{where}: W must be [B, dim, dim] = [{B}, {d}, {d}] (y is [{B}, {d}]), "
                             f"got {list(W.shape)}")
        if theta0.shape not in ((B, d), (B * d,)):
            raise ValueError(f"{where}: theta0 must be [B, dim] = [{B}, {d}] or [{B * d}], got "
                             f"{list(theta0.shape)}")
        self.W, self.y = W, y
        self.batch, self.dim = B, d
        self.shapes = [(self.dim,)]
        self.device, self.dtype = y.device, y.dtype
        self.theta0 = theta0.reshape(-1)

    def _losses(self, params: List[Tensor], step: int) -> Tensor:
        (theta,) = params  # [B, dim]
        r = torch.bmm(self.W, theta.unsqueeze(2)).squeeze(2) - self.y
        return (r * r).sum(1)

    def _losses_and_grad(self, theta: Tensor, step: int) -> Tuple[Tensor, Tensor]:
        if (type(self)._losses is not QuadraticProblem._losses
                or type(self).losses is not OptimizeeProblem.losses
                or "losses" in vars(self) or "_losses" in vars(self)):
            return super()._losses_and_grad(theta, step)  # a subclass or instance changed the loss
        # grad_b = 2 W_b^T r_b as autograd forms it (r * r's backward adds r + r; bmm's is a
        # bmm with W^T): the same bits on the CPU (tested), with no graph built or walked.
        (th,) = self.unflatten(theta)
        r = torch.bmm(self.W, th.unsqueeze(2)).squeeze(2) - self.y
        g = torch.bmm(self.W.transpose(1, 2), (r + r).unsqueeze(2)).squeeze(2)
        return (r * r).sum(1), g.reshape(-1)

    def subset(self, start: int, stop: int) -> "QuadraticProblem":
        start, stop = self._check_rows(start, stop)
        d = self.dim
        return QuadraticProblem(self.W[start:stop], self.y[start:stop],
                                self.theta0[start * d:stop * d])


class QuadraticFamily:
    """Random quadratics of the paper: ``f(theta) = ||W theta - y||^2``, ``W`` (dim x dim)
    and ``y`` (dim) with i.i.d. N(0, 1) entries, ``theta_0`` ~ N(0, init_std^2).

    ``sample(batch, seed)`` draws ``batch`` independent problems, a pure function of the seed.
    """

    def __init__(self, dim: int = 10, init_std: float = 0.01):
        self.dim = _checks.integer("QuadraticFamily", "dim", dim, min=1)
        self.init_std = _checks.real("QuadraticFamily", "init_std", init_std, min=0)

    def sample(self, batch: int, seed: int, device=None,
               dtype: torch.dtype = torch.float32) -> QuadraticProblem:
        where = "QuadraticFamily.sample"
        batch = _checks.integer(where, "batch", batch, min=1)
        seed = _seed(where, "seed", seed)
        _float_dtype(where, dtype)
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
_DIGITS_N = 1797  # images in scikit-learn's digits


def _test_fraction(where: str, test_fraction: Any) -> float:
    """test_fraction in (0, 1) that leaves both parts of the digits split non-empty (an empty
    test part gives NaN metrics, an empty train part no minibatches)."""
    f = _checks.real(where, "test_fraction", test_fraction)
    if not 0 < round(_DIGITS_N * f) < _DIGITS_N:
        raise ValueError(f"{where}: test_fraction must be in (0, 1) and leave at least one of the "
                         f"{_DIGITS_N} digits images in each of the train and test parts, got "
                         f"{test_fraction!r}")
    return f


def _digits_split(test_fraction: float, seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """load_digits_split without the checks, and the cached tensors themselves (not copies)."""
    key = (test_fraction, seed)
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


def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 8x8 digits (1797 images, bundled with scikit-learn: no download), pixels
    scaled to [0, 1], shuffled with ``seed`` and split into ``(x_train, y_train, x_test,
    y_test)`` (float32 ``[n, 64]``, int64 ``[n]``); the test part is ``test_fraction``
    (0 < test_fraction < 1, both parts non-empty). The tensors are fresh copies."""
    where = "pymeta.tasks.load_digits_split"
    f = _test_fraction(where, test_fraction)
    # copies: an in-place edit by the caller must not reach the cache the problems share
    return tuple(t.clone() for t in _digits_split(f, _seed(where, "seed", seed)))


_ACTS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}


class DigitsMLPProblem(OptimizeeProblem):
    """B independent MLPs on the digits training split; step t's loss is the mean
    cross-entropy on a minibatch of ``batch_size`` training images drawn for (problem, t)."""

    def __init__(self, family: "DigitsMLPFamily", batch: int, seed: int, device, dtype):
        where = "DigitsMLPProblem"
        if not isinstance(family, DigitsMLPFamily):
            raise TypeError(f"{where}: family must be a DigitsMLPFamily, not {type(family).__name__}")
        self.family = family
        self.batch = _checks.integer(where, "batch", batch, min=1)
        self.seed = _seed(where, "seed", seed)
        _float_dtype(where, dtype)
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
        xtr, ytr, xte, yte = _digits_split(family.test_fraction, family.split_seed)
        self.x_train, self.y_train = xtr.to(self.device, dtype), ytr.to(self.device)
        self.x_test, self.y_test = xte.to(self.device, dtype), yte.to(self.device)
        self._batches: Dict[int, Tensor] = {}
        self._rows = (0, batch, batch)  # (start, stop, full batch): see subset

    def subset(self, start: int, stop: int) -> "DigitsMLPProblem":
        start, stop = self._check_rows(start, stop)
        import copy
        sub = copy.copy(self)
        n = self.n_params
        lo = self._rows[0]
        sub.batch = stop - start
        sub.theta0 = self.theta0[start * n:stop * n]
        sub._rows = (lo + start, lo + stop, self._rows[2])
        sub._batches = {}
        return sub

    def minibatch(self, step: int) -> Tensor:
        """``[B, batch_size]`` indices into the training split for ``step`` (deterministic)."""
        if type(step) is not int or step < 0:  # (True or 1.0 would hit step 1's cache entry)
            step = _checks.integer("DigitsMLPProblem.minibatch", "step", step, min=0)
        idx = self._batches.get(step)
        if idx is None:
            g = _generator(derive_seed(self.seed, 1, step))
            n = self.y_train.shape[0]
            lo, hi, full = self._rows
            idx = torch.randint(n, (full, self.family.batch_size), generator=g)[lo:hi]
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
        """Full-split mean cross-entropy and accuracy per problem: ``{"loss": [B], "acc": [B]}``;
        split is ``"train"`` or ``"test"``."""
        if not isinstance(split, str) or split not in ("train", "test"):
            raise ValueError(f"DigitsMLPProblem.evaluate: split must be 'train' or 'test', "
                             f"not {split!r}")
        self._check_theta("evaluate", theta)
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
        where = "DigitsMLPFamily"
        if not isinstance(activation, str):
            raise TypeError(f"{where}: activation must be a str, one of {sorted(_ACTS)}, "
                            f"not {type(activation).__name__} {activation!r}")
        if activation not in _ACTS:
            raise ValueError(f"{where}: activation must be one of {sorted(_ACTS)}, "
                             f"not {activation!r}")
        hidden = _checks.integer(where, "hidden", hidden, min=1)
        layers = _checks.integer(where, "layers", layers, min=1)
        batch_size = _checks.integer(where, "batch_size", batch_size, min=1)
        test_fraction = _test_fraction(where, test_fraction)
        split_seed = _seed(where, "split_seed", split_seed)
        self.hidden, self.layers, self.activation = hidden, layers, activation
        self.batch_size = batch_size
        self.test_fraction, self.split_seed = test_fraction, split_seed

    def sample(self, batch: int, seed: int, device=None,
               dtype: torch.dtype = torch.float32) -> DigitsMLPProblem:
        where = "DigitsMLPFamily.sample"
        batch = _checks.integer(where, "batch", batch, min=1)
        seed = _seed(where, "seed", seed)
        _float_dtype(where, dtype)
        return DigitsMLPProblem(self, batch, seed, device, dtype)

    def __repr__(self) -> str:
        return (f"DigitsMLPFamily(hidden={self.hidden}, layers={self.layers}, "
                f"activation={self.activation!r}, batch_size={self.batch_size})")


# =============================================================================================
# Few-shot task samplers
# =============================================================================================
# Self-contained: depends on torch only (Pillow for image folders, scikit-learn for digits,
# both imported when used).

def _rng(seed: Optional[int]) -> torch.Generator:
    """A generator seeded with a checked seed (None: a random one)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _check_int(value, name: str, owner: str, minimum: int) -> int:
    return _checks.integer(owner, name, value, min=minimum)


def _check_generator(owner: str, generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{owner}: generator must be a torch.Generator or None, not "
                        f"{type(generator).__name__}")


def _check_range(value, name: str, owner: str) -> Tuple[float, float]:
    """A finite (low, high) pair with low <= high (inf bounds give inf / NaN samples)."""
    pair = _not_str_seq(owner, name, value, "two numbers (low, high)")
    if len(pair) != 2:
        raise TypeError(f"{owner}: {name} must be a pair (low, high), got {value!r}")
    lo, hi = (_checks.real(owner, name, v) for v in pair)
    if not lo <= hi:
        raise ValueError(f"{owner}: {name} must have low <= high, got {value!r}")
    return lo, hi


class SinusoidTasks(NamedTuple):
    """A batch of T sinusoid tasks: support and query sets ``[T, K, 1]`` / ``[T, Q, 1]`` and
    each task's amplitude and phase ``[T]``."""
    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor
    amplitude: Tensor
    phase: Tensor


class Sinusoid:
    """The sinusoid regression tasks of MAML (Finn et al. 2017) and Meta-SGD (Li et al.
    2017): ``y = A sin(x - phase)`` with A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5].

    Args:
        amplitude, phase, x_range: the (low, high) ranges of the uniform distributions.
        seed: seeds this sampler's own generator (None: a random seed). Two samplers with one
            seed draw the same tasks.

    ``sample(T, K, Q)`` returns ``SinusoidTasks`` with ``x_support, y_support`` of shape
    ``[T, K, 1]`` and ``x_query, y_query`` of ``[T, Q, 1]``, ready for ``pymeta.MAML`` with a
    ``pymeta.models.MLP(1, (40, 40), 1)``.
    """

    def __init__(self, amplitude: Sequence[float] = (0.1, 5.0), phase: Sequence[float] = (0.0, math.pi),
                 x_range: Sequence[float] = (-5.0, 5.0), seed: Optional[int] = None):
        owner = "pymeta.tasks.Sinusoid"
        self.amplitude = _check_range(amplitude, "amplitude", owner)
        self.phase = _check_range(phase, "phase", owner)
        self.x_range = _check_range(x_range, "x_range", owner)
        self.generator = _rng(_seed(owner, "seed", seed, optional=True))

    @staticmethod
    def function(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """``A sin(x - phase)``; amplitude and phase broadcast against x (e.g. ``[T, 1, 1]``)."""
        return amplitude * torch.sin(x - phase)

    def _uniform(self, shape, bounds, g) -> Tensor:
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)

    def sample(self, tasks: int, shots: int, queries: int = 0, *, device=None,
               dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None) -> SinusoidTasks:
        """Draws T tasks with K support and Q query points each (independent uniform x)."""
        owner = "pymeta.tasks.Sinusoid.sample"
        tasks = _check_int(tasks, "tasks", owner, 1)
        shots = _check_int(shots, "shots", owner, 1)
        queries = _check_int(queries, "queries", owner, 0)
        _float_dtype(owner, dtype)
        _check_generator(owner, generator)
        g = generator if generator is not None else self.generator
        amp = self._uniform((tasks,), self.amplitude, g)
        ph = self._uniform((tasks,), self.phase, g)
        x = self._uniform((tasks, shots + queries, 1), self.x_range, g)
        y = self.function(x, amp[:, None, None], ph[:, None, None])
        x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
        return SinusoidTasks(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:],
                             amp.to(device=device, dtype=dtype), ph.to(device=device, dtype=dtype))


class Episode(NamedTuple):
    """A batch of T N-way K-shot episodes with Q queries per class.

    ``x_support [T, N*K, ...]``, ``y_support [T, N*K]`` (labels 0..N-1, K of each, in class
    order), ``x_query [T, N*Q, ...]``, ``y_query [T, N*Q]``; ``classes [T, N]`` says which of
    the sampler's classes (an index into ``FewShotSampler.class_names``) each label stands for.
    """
    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor
    classes: Tensor


_ROTATIONS = (0, 90, 180, 270)


def _label_list(owner: str, name: str, classes: Any) -> list:
    """classes as a list of int labels: a sequence of ints (NumPy's too) or a 1-D integer
    tensor; floats and bools are refused (1.0 would pass a set lookup as label 1)."""
    if isinstance(classes, Tensor):
        if classes.dim() != 1 or classes.is_floating_point() or classes.is_complex() \
                or classes.dtype == torch.bool:
            raise TypeError(f"{owner}: {name} as a tensor must be 1-D of integer labels, got "
                            f"{classes.dtype} of shape {list(classes.shape)}")
        return classes.tolist()
    out = _not_str_seq(owner, name, classes, "int labels")
    for i, c in enumerate(out):
        if not _checks.is_int(c):
            raise TypeError(f"{owner}: {name}[{i}] must be an int label, not {type(c).__name__} {c!r}")
    return [int(c) for c in out]


def split_classes(classes: Union[int, Sequence], sizes: Union[Sequence[int], Dict[str, int]],
                  seed: Optional[int] = 0, shuffle: bool = True) -> Dict[str, list]:
    """Disjoint class splits, e.g. the Omniglot convention
    ``split_classes(names, {"train": 1100, "val": 100, "test": 423})``.

    Args:
        classes: the class labels, or an int C meaning ``range(C)``.
        sizes: the number of classes per split: a dict name -> count, or a sequence of
            counts (named train, val, test). A count of -1 (at most one) takes the rest.
        seed: shuffles the classes first with this seed (unless ``shuffle=False``).

    Returns:
        dict name -> list of classes; the lists are disjoint.
    """
    owner = "pymeta.tasks.split_classes"
    if _checks.is_int(classes):
        classes = list(range(_checks.integer(owner, "classes", classes, min=0)))
    else:
        classes = _not_str_seq(owner, "classes", classes, "class labels (or an int C)")
    try:
        distinct = len(set(classes))
    except TypeError:  # an unhashable label (a list, ...)
        raise TypeError(f"{owner}: classes must hold hashable labels (ints, names)") from None
    if distinct != len(classes):
        raise ValueError(f"{owner}: classes has repeated entries")
    if isinstance(sizes, Mapping):
        sizes = dict(sizes)
    else:
        sizes = _not_str_seq(owner, "sizes", sizes, "counts (or a dict name -> count)")
        names = ["train", "val", "test"] if len(sizes) <= 3 else [f"split{i}" for i in range(len(sizes))]
        sizes = dict(zip(names, sizes))
    for n, s in sizes.items():
        if not _checks.is_int(s):
            raise TypeError(f"{owner}: sizes[{n!r}] must be an int count >= 0 or -1, not "
                            f"{type(s).__name__} {s!r}")
        if s < -1:
            raise ValueError(f"{owner}: sizes[{n!r}] must be a count >= 0 or -1, got {s!r}")
        sizes[n] = int(s)
    if sum(s == -1 for s in sizes.values()) > 1:
        raise ValueError(f"{owner}: sizes may use -1 ('the rest') once, got {sizes}")
    seed = _seed(owner, "seed", seed, optional=True)
    fixed = sum(s for s in sizes.values() if s != -1)
    if fixed > len(classes):
        raise ValueError(f"{owner}: sizes ask for {fixed} classes but classes has only {len(classes)}")
    order = list(range(len(classes)))
    if shuffle:
        order = torch.randperm(len(classes), generator=_rng(seed)).tolist()
    out, start = {}, 0
    for n, s in sizes.items():
        count = len(classes) - fixed if s == -1 else s
        out[n] = [classes[i] for i in order[start:start + count]]
        start += count
    return out


class FewShotSampler:
    """N-way K-shot episodes from a labelled tensor dataset, batched over T tasks.

    Args:
        x: ``[M, ...]`` examples (for rotations: ``[M, ..., H, W]`` images).
        y: ``[M]`` integer labels.
        n_way: classes per episode (N).
        k_shot: support examples per class (K).
        q_queries: query examples per class (Q); every drawn example is distinct within its
            episode.
        classes: the labels this sampler draws from (a split); None: every label in y.
            Use ``split_classes`` or ``FewShotSampler.splits`` for disjoint meta-train /
            val / test samplers.
        rotations: the Omniglot augmentation: each (class, rotation) pair is a class of its
            own. ``True`` means (0, 90, 180, 270); or a sequence drawn from those angles;
            ``False``/None: no rotation. 90 and 270 need square images.
        seed: seeds the sampler's own generator (None: a random seed); a fixed seed gives
            the same episodes.
        device: where the episodes go (the data stays where it is; the gather runs there).

    ``sample(T)`` returns an ``Episode``. ``class_names[i]`` is ``(label, angle)`` with
    rotations, else the label.
    """

    def __init__(self, x: Tensor, y: Tensor, n_way: int, k_shot: int, q_queries: int = 15, *,
                 classes: Optional[Sequence] = None, rotations: Union[bool, Sequence[int], None] = False,
                 seed: Optional[int] = None, device=None):
        owner = "pymeta.tasks.FewShotSampler"
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"{owner}: x and y must be tensors, not {type(x).__name__} and {type(y).__name__}")
        if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"{owner}: y must be a 1-D integer label tensor, got {y.dtype} of shape {list(y.shape)}")
        if x.dim() < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{owner}: x has {x.shape[0] if x.dim() else 0} examples but y has "
                             f"{y.shape[0]} labels; they must agree")
        n_way = _check_int(n_way, "n_way", owner, 1)
        k_shot = _check_int(k_shot, "k_shot", owner, 1)
        q_queries = _check_int(q_queries, "q_queries", owner, 0)
        seed = _seed(owner, "seed", seed, optional=True)
        if rotations is True:
            rotations = _ROTATIONS
        elif rotations is False or rotations is None:
            rotations = (0,)
        elif isinstance(rotations, (str, bytes, Mapping)) or not isinstance(rotations, Iterable):
            raise TypeError(f"{owner}: rotations must be True, False, None or a sequence of angles "
                            f"from {_ROTATIONS}, not {type(rotations).__name__} {rotations!r}")
        rotations = tuple(rotations)
        if not all(_checks.is_int(r) for r in rotations):  # 90.0 would give float quarter turns
            raise TypeError(f"{owner}: rotations must hold int angles from {_ROTATIONS}, got "
                            f"{rotations!r}")
        rotations = tuple(int(r) for r in rotations)
        if not rotations or any(r not in _ROTATIONS for r in rotations) or len(set(rotations)) != len(rotations):
            raise ValueError(f"{owner}: rotations must be True, False or distinct angles from "
                             f"{_ROTATIONS}, got {rotations!r}")
        if any(r in (90, 270) for r in rotations):
            if x.dim() < 3 or x.shape[-1] != x.shape[-2]:
                raise ValueError(f"{owner}: rotations by 90/270 need square images [M, ..., H, W] "
                                 f"with H == W; x has shape {list(x.shape)}")
        # Counted by sorting, not bincount: sparse labels (e.g. 0 and 10**12) would make a
        # dense count over the label range allocate gigabytes.
        y_cpu = y.cpu()
        label_t, count_t = torch.unique(y_cpu, sorted=True, return_counts=True)
        labels = label_t.tolist()
        counts = dict(zip(labels, count_t.tolist()))
        if classes is None:
            classes = labels
        else:
            classes = _label_list(owner, "classes", classes)
            missing = [c for c in classes if c not in counts]
            if missing:
                raise ValueError(f"{owner}: classes lists labels not present in y: {missing[:10]}")
            if len(set(classes)) != len(classes):
                raise ValueError(f"{owner}: classes has repeated entries")
        if not classes:
            raise ValueError(f"{owner}: classes is empty; the sampler needs at least n_way classes")
        need = k_shot + q_queries
        per_class = {c: counts[c] for c in classes}
        poor = [(c, n) for c, n in per_class.items() if n < need]
        if poor:
            raise ValueError(f"{owner}: k_shot + q_queries = {need} examples per class are needed, "
                             f"but class {poor[0][0]!r} has only {poor[0][1]} "
                             f"({len(poor)} classes are short); lower k_shot or q_queries")
        class_names: List = [(c, r) for c in classes for r in rotations] if rotations != (0,) else list(classes)
        if n_way > len(class_names):
            raise ValueError(f"{owner}: n_way={n_way} but the sampler has only {len(class_names)} classes "
                             f"({len(classes)} labels x {len(rotations)} rotations)")
        device = torch.device(device) if device is not None else x.device
        # Padded index table: row j lists the examples of base class classes[j], in dataset
        # order (a stable sort groups each label's examples; start[c] is where c's begin).
        order = torch.argsort(y_cpu, stable=True)
        start = dict(zip(labels, (torch.cumsum(count_t, 0) - count_t).tolist()))
        width = max(per_class.values())
        table = torch.full((len(classes), width), -1, dtype=torch.long)
        for j, c in enumerate(classes):
            table[j, :per_class[c]] = order[start[c]:start[c] + per_class[c]]
        self.n_way, self.k_shot, self.q_queries = n_way, k_shot, q_queries
        self.rotations = rotations
        self.class_names = class_names
        self._table = table
        self._counts = torch.tensor([per_class[c] for c in classes], dtype=torch.long)
        self._n_rot = len(rotations)
        self._rot_k = torch.tensor([r // 90 for r in rotations], dtype=torch.long)
        # Any non-zero angle rotates (a lone [180] too, not only when angles are mixed).
        self._rotates = any(rotations)
        self.x, self.y = x, y
        self.device = device
        self.seed = seed
        self.generator = _rng(seed)

    # ---- constructors -------------------------------------------------------------------

    @classmethod
    def splits(cls, x: Tensor, y: Tensor, n_way: int, k_shot: int, q_queries: int = 15, *,
               classes: Dict[str, Sequence], seed: Optional[int] = None, **kwargs) -> Dict[str, "FewShotSampler"]:
        """One sampler per split of ``classes`` (a dict name -> labels, e.g. from
        ``split_classes``), checked disjoint. Split i is seeded with ``seed + i``."""
        owner = "pymeta.tasks.FewShotSampler.splits"
        if not isinstance(classes, Mapping):
            raise TypeError(f"{owner}: classes must be a dict split name -> labels (e.g. from "
                            f"split_classes), not {type(classes).__name__}")
        seed = _seed(owner, "seed", seed, optional=True)
        names = list(classes)
        # None would mean "every label" in the constructor: a split must list its labels
        classes = {n: _label_list(owner, f"classes[{n!r}]", classes[n]) for n in names}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = set(classes[a]) & set(classes[b])
                if both:
                    raise ValueError(f"pymeta.tasks.FewShotSampler.splits: classes of splits {a!r} "
                                     f"and {b!r} overlap: {sorted(both)[:10]}; splits must be disjoint")
        out = {}
        for i, n in enumerate(names):
            try:
                out[n] = cls(x, y, n_way, k_shot, q_queries, classes=classes[n],
                             seed=None if seed is None else seed + i, **kwargs)
            except ValueError as e:
                raise ValueError(f"split {n!r}: {e}") from None
        return out

    @classmethod
    def from_folder(cls, root: Union[str, os.PathLike], n_way: int, k_shot: int, q_queries: int = 15, *,
                    size: Union[int, Tuple[int, int], None] = 28, grayscale: bool = True,
                    invert: bool = False, **kwargs) -> "FewShotSampler":
        """A sampler over an image-folder tree (see ``load_image_folder``); ``classes`` may
        name class folders (``"alphabet/character"``) instead of indices."""
        classes = kwargs.get("classes")
        named = classes is not None and not isinstance(classes, Tensor)
        if named:  # checked before the (slow) load; a str would be read as one-letter names
            classes = _not_str_seq("pymeta.tasks.FewShotSampler.from_folder", "classes", classes,
                                   "class folder names or labels")
        x, y, names = load_image_folder(root, size=size, grayscale=grayscale, invert=invert)
        if named:
            index = {n: i for i, n in enumerate(names)}
            kwargs["classes"] = [index.get(c, c) if isinstance(c, str) else c for c in classes]
            unknown = [c for c in kwargs["classes"] if isinstance(c, str)]
            if unknown:
                raise ValueError(f"pymeta.tasks.FewShotSampler.from_folder: classes names folders that "
                                 f"are not classes under {str(root)!r}: {unknown[:5]}")
        sampler = cls(x, y, n_way, k_shot, q_queries, **kwargs)
        sampler.folder_names = names
        return sampler

    # ---- sampling -----------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def sample(self, tasks: int, *, generator: Optional[torch.Generator] = None) -> Episode:
        """Draws T episodes: N distinct classes each, K + Q distinct examples per class."""
        tasks = _check_int(tasks, "tasks", "pymeta.tasks.FewShotSampler.sample", 1)
        _check_generator("pymeta.tasks.FewShotSampler.sample", generator)
        g = generator if generator is not None else self.generator
        T, N, K, Q = tasks, self.n_way, self.k_shot, self.q_queries
        # N distinct classes per task (class id = base * n_rot + rotation index).
        cls_ids = torch.rand(T, self.num_classes, generator=g).argsort(dim=1)[:, :N]
        base, rot = cls_ids // self._n_rot, cls_ids % self._n_rot
        # K + Q distinct examples per class: random keys, padding sorted last.
        counts = self._counts[base]                                     # [T, N]
        keys = torch.rand(T, N, self._table.shape[1], generator=g)
        keys = keys.masked_fill(torch.arange(self._table.shape[1]) >= counts[..., None], 2.0)
        pick = keys.argsort(dim=2)[..., :K + Q]                         # [T, N, K+Q]
        idx = torch.gather(self._table[base], 2, pick)                 # dataset indices
        data = self.x[idx.to(self.x.device)]                            # [T, N, K+Q, ...]
        if self._rotates:
            k = self._rot_k[rot]                                        # quarter turns, [T, N]
            for quarter in (1, 2, 3):
                # (the selection is found on the CPU, where k lives, and moved as indices: a
                # mask's any() or nonzero on a GPU would wait for the device)
                sel = (k == quarter).nonzero(as_tuple=True)
                if sel[0].numel():
                    sel = tuple(i.to(data.device) for i in sel)
                    data[sel] = torch.rot90(data[sel], quarter, dims=(-2, -1))
        data = data.to(self.device)
        labels = torch.arange(N, device=self.device)
        feat = data.shape[3:]
        xs = data[:, :, :K].reshape(T, N * K, *feat)
        xq = data[:, :, K:].reshape(T, N * Q, *feat)
        ys = labels.repeat_interleave(K).expand(T, -1).contiguous()
        yq = labels.repeat_interleave(Q).expand(T, -1).contiguous()
        return Episode(xs, ys, xq, yq, cls_ids.to(self.device))

    def __repr__(self) -> str:
        return (f"FewShotSampler({self.n_way}-way {self.k_shot}-shot, {self.q_queries} queries, "
                f"{self.num_classes} classes, rotations={self.rotations})")


_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image_folder(root: Union[str, os.PathLike], size: Union[int, Tuple[int, int], None] = 28,
                      grayscale: bool = True, invert: bool = False,
                      extensions: Sequence[str] = _IMAGE_EXTENSIONS) -> Tuple[Tensor, Tensor, List[str]]:
    """Loads an image-folder tree: every folder that directly holds image files is a class.

    Layouts: Omniglot's ``root/<alphabet>/<character>/*.png`` (class name
    ``"alphabet/character"``) and the flat ``root/<class>/*.png`` (mini-ImageNet as folders).

    Args:
        root: the tree's top folder.
        size: resize every image to ``size x size`` (or ``(H, W)``); None keeps the sizes,
            which must then agree.
        grayscale: one channel (Pillow mode "L") instead of RGB.
        invert: ``1 - x`` (Omniglot draws black strokes on white).

    Returns:
        ``(x [M, C, H, W] float32 in [0, 1], y [M] long, class_names)``, classes in sorted
        path order, files in sorted order within a class.
    """
    owner = "pymeta.tasks.load_image_folder"
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise ImportError(f"{owner} needs Pillow: pip install Pillow") from None
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{owner}: root {root!r} is not a folder")
    if size is not None:
        hw = [size, size] if _checks.is_int(size) else None
        if hw is None and isinstance(size, (tuple, list)) and len(size) == 2:
            hw = list(size)
        if hw is None or not all(_checks.is_int(s) for s in hw):
            raise TypeError(f"{owner}: size must be an int >= 1, (H, W) or None, not "
                            f"{type(size).__name__} {size!r}")
        if any(s < 1 for s in hw):
            raise ValueError(f"{owner}: size must be an int >= 1, (H, W) or None, got {size!r}")
        hw = [int(s) for s in hw]
    # one str is one extension (iterating it would match every file ending in "p", "n", ...)
    exts = [extensions] if isinstance(extensions, str) else \
        _not_str_seq(owner, "extensions", extensions, "file name endings such as '.png'")
    if not all(isinstance(e, str) and e for e in exts):
        raise TypeError(f"{owner}: extensions must be a str or a sequence of non-empty str "
                        f"(such as '.png'), got {extensions!r}")
    exts = tuple(e.lower() for e in exts)
    classes: List[Tuple[str, List[str]]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files = sorted(f for f in filenames if f.lower().endswith(exts) and not f.startswith("."))
        if files and os.path.abspath(dirpath) != os.path.abspath(root):
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            classes.append((rel, [os.path.join(dirpath, f) for f in files]))
    if not classes:
        raise ValueError(f"{owner}: root {root!r} holds no class folders with images "
                         f"({', '.join(exts)}); expected root/<class>/*.png or "
                         f"root/<alphabet>/<character>/*.png")
    classes.sort(key=lambda c: c[0])
    mode = "L" if grayscale else "RGB"
    images, labels = [], []
    for label, (_, files) in enumerate(classes):
        for path in files:
            try:
                with Image.open(path) as im:
                    im = im.convert(mode)
                    if size is not None and im.size != (hw[1], hw[0]):
                        im = im.resize((hw[1], hw[0]), Image.BILINEAR)
                    data = im.tobytes()
                    w, h = im.size
            except (PermissionError, FileNotFoundError):
                raise
            except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
                # Pillow's errors for a corrupt / truncated file do not say which file it was
                raise FileFormatError(f"{owner}: cannot read the image {path!r}: "
                                      f"{type(e).__name__}: {e}") from e
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            images.append(buf.view(h, w, len(mode)).permute(2, 0, 1))
            labels.append(label)
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise ValueError(f"{owner}: images under {root!r} have different sizes {sorted(shapes)[:3]}; "
                         f"pass size= to resize them")
    x = torch.stack(images).float().div_(255.0)
    if invert:
        x = 1.0 - x
    return x, torch.tensor(labels, dtype=torch.long), [c[0] for c in classes]


def digits_dataset(dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """scikit-learn's digits (1797 handwritten digits, 8x8, 10 classes, shipped inside the
    package: nothing is downloaded). Returns ``(x [1797, 1, 8, 8] in [0, 1], y [1797])``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("pymeta.tasks.digits_dataset needs scikit-learn: pip install scikit-learn") from None
    _float_dtype("pymeta.tasks.digits_dataset", dtype)
    d = load_digits()
    x = torch.tensor(d.images, dtype=dtype).div_(16.0).unsqueeze(1)
    return x, torch.tensor(d.target, dtype=torch.long)
