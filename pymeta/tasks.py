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
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["OptimizeeProblem", "QuadraticFamily", "QuadraticProblem", "DigitsMLPFamily",
           "DigitsMLPProblem", "load_digits_split", "derive_seed",
           "Sinusoid", "SinusoidTasks", "FewShotSampler", "Episode", "load_image_folder",
           "split_classes", "digits_dataset"]


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

    def subset(self, start: int, stop: int) -> "OptimizeeProblem":
        """Problems ``start..stop-1`` of this batch as a problem of their own, identical to
        those problems here (used to shard a meta-batch across ranks)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be split into shards (it has "
                                  f"no subset method); distributed meta_train needs one")


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

    def subset(self, start: int, stop: int) -> "QuadraticProblem":
        d = self.dim
        return QuadraticProblem(self.W[start:stop], self.y[start:stop],
                                self.theta0[start * d:stop * d])


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
        self._rows = (0, batch, batch)  # (start, stop, full batch): see subset

    def subset(self, start: int, stop: int) -> "DigitsMLPProblem":
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
# Few-shot task samplers
# =============================================================================================
# Self-contained: depends on torch only (Pillow for image folders, scikit-learn for digits,
# both imported when used).

def _rng(seed: Optional[int]) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def _check_int(value, name: str, owner: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return value


def _check_range(value, name: str, owner: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: {name} must be a pair (low, high), got {value!r}") from None
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
        self.generator = _rng(seed)

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
        _check_int(tasks, "tasks", owner, 1)
        _check_int(shots, "shots", owner, 1)
        _check_int(queries, "queries", owner, 0)
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
    if isinstance(classes, int):
        classes = list(range(classes))
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise ValueError(f"{owner}: classes has repeated entries")
    if not isinstance(sizes, dict):
        sizes = list(sizes)
        names = ["train", "val", "test"] if len(sizes) <= 3 else [f"split{i}" for i in range(len(sizes))]
        sizes = dict(zip(names, sizes))
    rest = [n for n, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"{owner}: sizes may use -1 ('the rest') once, got {sizes}")
    for n, s in sizes.items():
        if isinstance(s, bool) or not isinstance(s, int) or (s < 0 and s != -1):
            raise ValueError(f"{owner}: sizes[{n!r}] must be a count >= 0 or -1, got {s!r}")
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
        self.n_way = _check_int(n_way, "n_way", owner, 1)
        self.k_shot = _check_int(k_shot, "k_shot", owner, 1)
        self.q_queries = _check_int(q_queries, "q_queries", owner, 0)
        if rotations is True:
            rotations = _ROTATIONS
        elif rotations is False or rotations is None:
            rotations = (0,)
        rotations = tuple(rotations)
        if not rotations or any(r not in _ROTATIONS for r in rotations) or len(set(rotations)) != len(rotations):
            raise ValueError(f"{owner}: rotations must be True, False or distinct angles from "
                             f"{_ROTATIONS}, got {rotations!r}")
        if any(r in (90, 270) for r in rotations):
            if x.dim() < 3 or x.shape[-1] != x.shape[-2]:
                raise ValueError(f"{owner}: rotations by 90/270 need square images [M, ..., H, W] "
                                 f"with H == W; x has shape {list(x.shape)}")
        self.rotations = rotations
        labels = sorted(torch.unique(y).tolist())
        if classes is None:
            classes = labels
        else:
            classes = list(classes)
            missing = [c for c in classes if c not in set(labels)]
            if missing:
                raise ValueError(f"{owner}: classes lists labels not present in y: {missing[:10]}")
            if len(set(classes)) != len(classes):
                raise ValueError(f"{owner}: classes has repeated entries")
        if not classes:
            raise ValueError(f"{owner}: classes is empty; the sampler needs at least n_way classes")
        need = self.k_shot + self.q_queries
        counts = torch.bincount(y - min(labels), minlength=1) if labels else torch.zeros(0)
        per_class = {c: int(counts[c - min(labels)]) for c in classes}
        poor = [(c, n) for c, n in per_class.items() if n < need]
        if poor:
            raise ValueError(f"{owner}: k_shot + q_queries = {need} examples per class are needed, "
                             f"but class {poor[0][0]!r} has only {poor[0][1]} "
                             f"({len(poor)} classes are short); lower k_shot or q_queries")
        self.class_names: List = [(c, r) for c in classes for r in rotations] if rotations != (0,) else list(classes)
        n_classes = len(self.class_names)
        if self.n_way > n_classes:
            raise ValueError(f"{owner}: n_way={self.n_way} but the sampler has only {n_classes} classes "
                             f"({len(classes)} labels x {len(rotations)} rotations)")
        # Padded index table: row j lists the examples of base class classes[j].
        width = max(per_class.values())
        table = torch.full((len(classes), width), -1, dtype=torch.long)
        for j, c in enumerate(classes):
            idx = torch.nonzero(y == c, as_tuple=False).flatten()
            table[j, :idx.numel()] = idx
        self._table = table
        self._counts = torch.tensor([per_class[c] for c in classes], dtype=torch.long)
        self._n_rot = len(rotations)
        self._rot_k = torch.tensor([r // 90 for r in rotations], dtype=torch.long)
        self.x, self.y = x, y
        self.device = torch.device(device) if device is not None else x.device
        self.seed = seed
        self.generator = _rng(seed)

    # ---- constructors -------------------------------------------------------------------

    @classmethod
    def splits(cls, x: Tensor, y: Tensor, n_way: int, k_shot: int, q_queries: int = 15, *,
               classes: Dict[str, Sequence], seed: Optional[int] = None, **kwargs) -> Dict[str, "FewShotSampler"]:
        """One sampler per split of ``classes`` (a dict name -> labels, e.g. from
        ``split_classes``), checked disjoint. Split i is seeded with ``seed + i``."""
        names = list(classes)
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
        x, y, names = load_image_folder(root, size=size, grayscale=grayscale, invert=invert)
        if kwargs.get("classes") is not None:
            index = {n: i for i, n in enumerate(names)}
            kwargs["classes"] = [index.get(c, c) if isinstance(c, str) else c for c in kwargs["classes"]]
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
        _check_int(tasks, "tasks", "pymeta.tasks.FewShotSampler.sample", 1)
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
        if self._n_rot > 1:
            k = self._rot_k[rot]                                        # quarter turns, [T, N]
            for quarter in (1, 2, 3):
                mask = (k == quarter).to(data.device)
                if mask.any():
                    data[mask] = torch.rot90(data[mask], quarter, dims=(-2, -1))
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
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in hw):
            raise ValueError(f"{owner}: size must be an int >= 1, (H, W) or None, got {size!r}")
    exts = tuple(e.lower() for e in extensions)
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
            with Image.open(path) as im:
                im = im.convert(mode)
                if size is not None and im.size != (hw[1], hw[0]):
                    im = im.resize((hw[1], hw[0]), Image.BILINEAR)
                buf = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                images.append(buf.view(im.size[1], im.size[0], len(mode)).permute(2, 0, 1))
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
    d = load_digits()
    x = torch.tensor(d.images, dtype=dtype).div_(16.0).unsqueeze(1)
    return x, torch.tensor(d.target, dtype=torch.long)
