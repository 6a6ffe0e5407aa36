"""The learned optimizer of "Learning to learn by gradient descent by gradient descent"
(Andrychowicz et al. 2016): a coordinatewise two-layer LSTM, one fused op per step."""
from __future__ import annotations

import operator
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from pymeta import _checks, ops, reference
from pymeta._io import FileFormatError, atomic_save, safe_load

__all__ = ["LSTMOptimizerNet", "LSTMOptimizer", "PRETRAINED_FILE"]

NET_FORMAT = "pymeta.LSTMOptimizerNet"
OPT_FORMAT = "pymeta.LSTMOptimizer"
# The shipped default (package data): meta-trained on 10-d quadratics by
# scripts/reproduce_l2l.py (see docs/RESULTS.md).
PRETRAINED_FILE = "lstm_optimizer_quadratic.pt"

# Real floating dtypes: those of parameters the optimizer steps and of states and weights it
# accepts (float8 is floating point too, but nothing here computes in it).
_REAL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # what the fused op stores


def _check_lr(lr: Any, name: str, where: str = "pymeta.LSTMOptimizer") -> None:
    """Raises unless lr is a finite real number >= 0 (`lr < 0` alone lets NaN through).
    name: what the message calls it, e.g. "param group 1's lr"."""
    _checks.real(where, name, lr, min=0)


def _check_net_args(hidden_size: Any = 20, preprocessing: Any = "log_sign", p: Any = 10.0,
                    out_scale: Any = 0.1) -> None:
    """LSTMOptimizerNet's arguments (and a file's config: same names, same defaults): raises
    TypeError / ValueError naming the first bad one. Checked up front, since the op only
    meets p and out_scale at the first forward (or never: NaN gives NaN updates). (p's upper
    bound depends on the dtype the net runs in: the op checks it, and LSTMOptimizer.step
    before it changes anything.)"""
    where = "pymeta.LSTMOptimizerNet"
    if not isinstance(preprocessing, str) or preprocessing not in ("log_sign", "none"):
        raise ValueError(f"{where}: preprocessing must be 'log_sign' or 'none', not "
                         f"{preprocessing!r}")
    hidden_size = _checks.integer(where, "hidden_size", hidden_size, min=1)
    if hidden_size > 64:
        raise ValueError(f"{where}: hidden_size must be in [1, 64], got {hidden_size}")
    _checks.real(where, "p", p, gt=0)
    _checks.real(where, "out_scale", out_scale)


class LSTMOptimizerNet(nn.Module):
    """Coordinatewise LSTM optimizer: every coordinate of the optimizee is one batch element.

    Parameters are exactly those of ``cell1 = nn.LSTMCell(n_in, H)``, ``cell2 =
    nn.LSTMCell(H, H)`` and ``out = nn.Linear(H, 1)`` (n_in = 2 for ``"log_sign"``, 1 for
    ``"none"``), so state_dicts of that shape load. The step itself runs as one fused op,
    ``pymeta.ops.lstm_optimizer_step`` (native kernel or reference, per ``pymeta.set_backend``).

    State: ``[4, H, N]`` = (h1, c1, h2, c2), feature-major, or the blocked layout
    ``[ceil(N / 16), 4, H, 16]`` (see ``init_state``).
    """

    def __init__(self, hidden_size: int = 20, preprocessing: str = "log_sign", p: float = 10.0,
                 out_scale: float = 0.1):
        _check_net_args(hidden_size, preprocessing, p, out_scale)
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.preprocessing = preprocessing
        self.p = float(p)
        self.out_scale = float(out_scale)
        n_in = 2 if preprocessing == "log_sign" else 1
        self.cell1 = nn.LSTMCell(n_in, hidden_size)
        self.cell2 = nn.LSTMCell(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)

    def weights(self) -> tuple[Tensor, ...]:
        """The 10 weights in the op's order."""
        # Read from the submodules' parameter dicts: what nn.Module.__getattr__ returns for
        # them (torch.func.functional_call swaps tensors there too), without its cost (~1 us a
        # name, ~12 us a step on the 2-core VM). A parametrized or replaced submodule takes the
        # attribute path.
        try:
            m = self._modules
            c1, c2, o = m["cell1"], m["cell2"], m["out"]
            if type(c1) is nn.LSTMCell and type(c2) is nn.LSTMCell and type(o) is nn.Linear:
                p1, p2, po = c1._parameters, c2._parameters, o._parameters
                return (p1["weight_ih"], p1["weight_hh"], p1["bias_ih"], p1["bias_hh"],
                        p2["weight_ih"], p2["weight_hh"], p2["bias_ih"], p2["bias_hh"],
                        po["weight"], po["bias"])
        except KeyError:
            pass
        c1, c2, o = self.cell1, self.cell2, self.out
        return (c1.weight_ih, c1.weight_hh, c1.bias_ih, c1.bias_hh, c2.weight_ih, c2.weight_hh,
                c2.bias_ih, c2.bias_hh, o.weight, o.bias)

    def init_state(self, n: int, device=None, dtype=None, layout: str = "feature_major") -> Tensor:
        """Zero state for n coordinates (h1, c1, h2, c2). Device and dtype default to the
        parameters'.

        layout: ``"feature_major"``, ``[4, H, n]``; or ``"blocked"``, ``[ceil(n / 16), 4, H,
        16]``, the rows of 16 coordinates together (the GPU forward's faster layout at H 17..20
        and 25..32: see ``pymeta.ops.lstm_optimizer_step``). The op keeps the layout it is given.

        n: an int >= 0; dtype: float32, float64 or bfloat16 (the state dtypes the op takes).
        """
        # (n = -1 would round to 0 blocks in the blocked layout: no error of its own)
        n = _checks.integer("pymeta.LSTMOptimizerNet.init_state", "n", n, min=0)
        if layout not in ("feature_major", "blocked"):
            raise ValueError(f"pymeta.LSTMOptimizerNet.init_state: layout must be "
                             f"'feature_major' or 'blocked', not {layout!r}")
        w = self.out.weight
        device = device if device is not None else w.device
        dtype = dtype if dtype is not None else w.dtype
        if dtype not in _STATE_DTYPES:
            raise TypeError(f"pymeta.LSTMOptimizerNet.init_state: dtype must be torch.float32, "
                            f"torch.float64 or torch.bfloat16, not {dtype!r}")
        if layout == "blocked":
            return torch.zeros((n + 15) // 16, 4, self.hidden_size, 16, device=device,
                               dtype=dtype)
        return torch.zeros(4, self.hidden_size, n, device=device, dtype=dtype)

    def forward(self, grad: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """grad of any shape (N elements), state ``[4, H, N]`` or ``[ceil(N / 16), 4, H, 16]``
        -> (update of grad's shape, new_state of state's shape)."""
        # A flat grad (meta_train's) skips the reshapes: each adds an autograd view node on
        # update (~18 us of a ~60 us step at N = 10 on the 2-core VM, ~28 with the backward).
        flat = not isinstance(grad, Tensor) or grad.dim() == 1  # (a non-tensor: the op names it)
        update, new_state = ops.lstm_optimizer_step(
            grad if flat else grad.reshape(-1), state, *self.weights(), self.preprocessing, self.p,
            self.out_scale)
        return (update if flat else update.reshape(grad.shape)), new_state

    # ---- files ---------------------------------------------------------------------------

    def config(self) -> Dict[str, Any]:
        """The constructor arguments: ``LSTMOptimizerNet(**net.config())`` has this shape."""
        return {"hidden_size": self.hidden_size, "preprocessing": self.preprocessing,
                "p": self.p, "out_scale": self.out_scale}

    def save(self, path, **info: Any) -> None:
        """Writes config and weights (plain tensors, moved to the CPU) to ``path``, atomically. ``info``: extra notes kept in the file (numbers, or
        strings: anything else is stored as its str), e.g. what the net was trained on."""
        atomic_save({"format": NET_FORMAT, "version": 1, "config": self.config(),
                     "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
                     "info": {str(k): v if type(v) in (int, float, bool) else str(v)
                              for k, v in info.items()}}, path)

    @staticmethod
    def _read(path) -> dict:
        """The file's contents, its config and info checked (the weights are checked against
        the net they go into)."""
        obj = safe_load(path, "LSTMOptimizerNet weights", NET_FORMAT)
        cfg, sd, info = obj.get("config"), obj.get("state_dict"), obj.get("info")
        if not isinstance(cfg, dict) or not isinstance(sd, dict):
            raise FileFormatError(f"pymeta: {os.fspath(path)!r} lacks the config or the weights "
                                  f"of an LSTMOptimizerNet")
        if info is not None and not isinstance(info, dict):
            raise FileFormatError(f"pymeta: {os.fspath(path)!r} has an invalid 'info' (a "
                                  f"{type(info).__name__}, not a dict)")
        try:
            _check_net_args(**cfg)  # unknown or non-str keys: a TypeError too
        except (TypeError, ValueError) as e:
            raise FileFormatError(f"pymeta: {os.fspath(path)!r} has an invalid config "
                                  f"{cfg!r}: {e}") from e
        return obj

    @classmethod
    def load(cls, path, map_location=None) -> "LSTMOptimizerNet":
        """A net built from the config in ``path`` with its weights. ``net.info`` holds the
        file's notes."""
        obj = cls._read(path)
        net = cls(**obj["config"])  # (checked by _read)
        net._load_checked(obj["state_dict"], os.fspath(path))
        net.info = dict(obj.get("info") or {})
        return net.to(map_location) if map_location is not None else net

    def load_weights(self, path) -> "LSTMOptimizerNet":
        """Loads the weights in ``path`` into this net (in place, keeping its device and dtype);
        the file's config must equal this net's (hidden size, preprocessing, p, out_scale)."""
        obj = self._read(path)
        if obj["config"] != self.config():
            diff = {k: (obj["config"].get(k), v) for k, v in self.config().items()
                    if obj["config"].get(k) != v}
            raise ValueError(f"pymeta: {os.fspath(path)!r} holds an LSTMOptimizerNet that differs "
                             f"from this one in {', '.join(f'{k} (file {a!r}, this net {b!r})' for k, (a, b) in diff.items())}")
        self._load_checked(obj["state_dict"], os.fspath(path))
        return self

    def _weights_problem(self, sd: Any) -> Optional[Tuple[type, str]]:
        """Why ``sd`` cannot be loaded as this net's weights: (exception type, the reason,
        phrased after "the weights ..."), or None if it can. Checked before anything is
        copied, so that a bad file or state_dict leaves the net as it was."""
        if not isinstance(sd, dict):
            return TypeError, f"are a {type(sd).__name__}, not a dict of tensors"
        own = self.state_dict()
        bad = [k for k in own if k not in sd or not isinstance(sd[k], Tensor)
               or sd[k].shape != own[k].shape]
        extra = [k for k in sd if k not in own]
        if bad or extra:
            got = {k: list(sd[k].shape) if isinstance(sd.get(k), Tensor) else None for k in bad}
            return ValueError, (f"do not fit an LSTMOptimizerNet with hidden_size="
                                f"{self.hidden_size}: missing or misshapen {got}, unexpected "
                                f"{extra}")
        for k in own:
            v = sd[k]
            # copy_ would round ints silently and drop a complex tensor's imaginary part
            if v.dtype not in _REAL_FLOATS or v.layout != torch.strided:
                return TypeError, (f"hold {k} as a {v.dtype} ({v.layout}) tensor, not a dense "
                                   f"real floating one")
            if not bool(torch.isfinite(v).all()):
                return ValueError, f"hold NaN or inf values in {k}"
        return None

    def _load_checked(self, sd: Any, where: str) -> None:
        """Loads a file's weights, or raises FileFormatError (changing nothing)."""
        problem = self._weights_problem(sd)
        if problem is not None:
            raise FileFormatError(f"pymeta: the weights in {where!r} {problem[1]}")
        self._copy_weights(sd)

    def _copy_weights(self, sd: dict) -> None:
        """Copies checked weights (see _weights_problem) in, keeping device and dtype."""
        with torch.no_grad():
            for k, v in self.state_dict().items():
                v.copy_(sd[k])

    @classmethod
    def pretrained(cls) -> "LSTMOptimizerNet":
        """The net shipped with pymeta (package data ``pymeta/data/{PRETRAINED_FILE}``):
        meta-trained on random 10-d quadratics; ``net.info`` says how."""
        from importlib import resources
        ref = resources.files("pymeta").joinpath("data", PRETRAINED_FILE)
        with resources.as_file(ref) as path:
            if not os.path.exists(path):
                raise FileNotFoundError(f"pymeta: the pretrained LSTM optimizer {path} is missing "
                                        f"from this install; rebuild it with "
                                        f"`python scripts/reproduce_l2l.py pretrain`")
            return cls.load(path)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, preprocessing={self.preprocessing!r}, "
                f"p={self.p}, out_scale={self.out_scale}")


def _group_by_storage(tensors: List[Tensor], items: list) -> List[Tuple[bool, list]]:
    """items[i] grouped by the storage tensors[i] lives on, each group with whether its
    tensors cover their storage exactly (no bytes of it held for anything else)."""
    groups: Dict[int, Tuple[Any, list, int]] = {}
    for t, item in zip(tensors, items):
        st = t.untyped_storage()
        key = st.data_ptr() if st.nbytes() else -id(t)  # empty storages share no bytes
        _, members, total = groups.get(key, (st, [], 0))
        groups[key] = (st, members + [item], total + t.nbytes)
    return [(total == st.nbytes(), members) for st, members, total in groups.values()]


class LSTMOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` driven by a learned ``LSTMOptimizerNet``:
    ``p <- p + lr * update``, where ``(update, state) = net(p.grad, state)`` coordinatewise.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        net: the learned optimizer; None loads the pretrained net shipped with pymeta
            (``LSTMOptimizerNet.pretrained()``). The optimizer only reads it (no gradients
            flow into it from ``step``); it runs on each parameter's device and dtype.
        lr: a per-group factor on the net's update (1.0: the update as meta-trained), so
            learning-rate schedulers work as usual: a finite real number >= 0 (checked here,
            in ``add_param_group`` and, for values set later, at every ``step``).
        state_dtype: the storage dtype of the recurrent state: None (each parameter's dtype;
            float32 for float16 and bfloat16 parameters) or ``torch.bfloat16`` for float32,
            float16 and bfloat16 parameters. The state is 4 H values per
            parameter coordinate (80 at H = 20: 320 bytes in float32, 40x Adam's two values), so
            bfloat16 halves the optimizer's memory; the math stays float32 and only the
            stored state is rounded (see ``pymeta.ops.lstm_optimizer_step``). float64
            parameters keep a float64 state.
        bucket_coords: the most coordinates one fused op call covers (parameters in order;
            one larger than this gets a call of its own). A step's transient memory is a new
            state for one bucket, so this bounds it for large models (default 2^24: 5 GiB of
            float32 state at H = 20); the native kernels' results do not depend on it (bit
            for bit).
        state_layout: ``"feature_major"`` (each parameter's state ``[4, H, numel]``) or
            ``"blocked"`` (``[ceil(numel / 16), 4, H, 16]``, each parameter padded to whole
            blocks of 16 coordinates; see ``pymeta.ops.lstm_optimizer_step``). The GPU forward
            reads the blocked layout directly at H 17..20 and 25..32 (H100, H = 20, one op
            call at 10M coordinates: 3.09 vs 3.27 ms with a float32 state, 2.43 vs 3.22 with
            bfloat16); elsewhere the op converts it, so on the CPU it only costs. The
            parameters' updates are the same either way (bit for bit on one device).

    ``step()`` concatenates the flat gradients of the parameters that share a device and dtype
    into ``[N]`` vectors of at most ``bucket_coords`` coordinates and runs ONE fused
    ``pymeta.ops.lstm_optimizer_step`` per vector, then splits the update back. Parameters
    without ``.grad`` are skipped (their recurrent state is left as it was); sparse gradients
    are refused. Every parameter, state and group's lr is checked before any is changed: a
    step that raises leaves parameters, states and step counters as they were.

    float16 and bfloat16 parameters are stepped in float32: the gradient is cast to float32,
    the net runs in float32 with a float32 state (bfloat16 with ``state_dtype=torch.bfloat16``),
    and the float32 ``lr * update`` is added into the parameter (one rounding to its dtype per
    step, as ``p.add_`` of a float32 tensor does). The update is thus the one a float32 copy of
    the parameter would get from the same gradients, bit for bit.

    State: ``self.state[p]`` holds ``"lstm_state"`` (``[4, H, p.numel()]``, the net's
    (h1, c1, h2, c2) for p's coordinates, or blocked ``[ceil(p.numel() / 16), 4, H, 16]``) and
    ``"step"`` (an int). ``load_state_dict`` converts a saved state of the other layout. ``state_dict()`` adds the
    net (config and weights) under ``"net"``, so that ``load_state_dict`` restores the run
    exactly (it loads those weights into ``self.net`` after checking the config); everything
    in it is tensors and plain containers, loadable with ``torch.load(weights_only=True)``. Like
    torch's optimizers it returns the live states, not copies (saving one costs no memory).
    ``save(path)`` / ``load(path)`` do both with atomic writes and safe loads.
    """

    def __init__(self, params, net: Optional[LSTMOptimizerNet] = None, lr: float = 1.0,
                 state_dtype: Optional[torch.dtype] = None, bucket_coords: int = 1 << 24,
                 state_layout: str = "feature_major"):
        try:
            bucket_coords = operator.index(bucket_coords) if not isinstance(bucket_coords, bool) \
                else 0
        except TypeError:
            bucket_coords = 0
        if bucket_coords < 1:
            raise ValueError(f"pymeta.LSTMOptimizer: bucket_coords must be an int >= 1")
        if state_dtype not in (None, torch.bfloat16):
            raise ValueError(f"pymeta.LSTMOptimizer: state_dtype must be None (the parameters' "
                             f"dtype) or torch.bfloat16, not {state_dtype!r}")
        if state_layout not in ("feature_major", "blocked"):
            raise ValueError(f"pymeta.LSTMOptimizer: state_layout must be 'feature_major' or "
                             f"'blocked', not {state_layout!r}")
        _check_lr(lr, "lr")
        if net is None:
            net = LSTMOptimizerNet.pretrained()
        if not isinstance(net, LSTMOptimizerNet):
            raise TypeError(f"pymeta.LSTMOptimizer: net must be an LSTMOptimizerNet or None, "
                            f"not {type(net).__name__}")
        super().__init__(params, {"lr": float(lr)})  # (group dicts: via add_param_group)
        self.net = net
        self.state_dtype = state_dtype
        self.bucket_coords = bucket_coords
        self.state_layout = state_layout
        # (device, dtype, bucket) -> (joint state [4, H, N] of the last step, per-param views
        # of it), so that a step over the same parameters as the last one skips re-concatenating.
        self._joint: Dict[Tuple[torch.device, torch.dtype, int], Tuple[Tensor, List[Tensor]]] = {}

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's ``add_param_group``, its "lr" checked first (the constructor's group dicts
        come here too)."""
        if isinstance(param_group, dict) and "lr" in param_group:
            _check_lr(param_group["lr"], "a param group's lr")
        super().add_param_group(param_group)

    # ---- the step --------------------------------------------------------------------------

    def _checked_step_items(self) -> List[Tuple[Tensor, dict]]:
        """(param, group) for every parameter with a grad, in order, after checking all that
        step() will use: every group's lr, every such parameter and its grad, and its existing
        state. Done before any parameter changes, since buckets are stepped one after another
        (only one bucket's new state is alive at a time): a bad later bucket must not leave
        the earlier ones stepped."""
        net = self.net
        H = net.hidden_size
        items, dtypes = [], set()
        for gi, group in enumerate(self.param_groups):
            if "lr" not in group:
                raise ValueError(f"pymeta.LSTMOptimizer: param group {gi} has no 'lr'")
            _check_lr(group["lr"], f"param group {gi}'s lr")
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                # (the name only when a message needs it: ~1 us a parameter every step)
                what = lambda: f"parameter {pi} of param group {gi} (shape {list(p.shape)})"
                if g.layout is not torch.strided:
                    raise RuntimeError("pymeta.LSTMOptimizer does not support sparse gradients "
                                       f"({what()} has a {g.layout} gradient); use a dense "
                                       f"embedding or another optimizer for it")
                dtype = p.dtype
                if dtype not in _REAL_FLOATS:
                    raise TypeError(f"pymeta.LSTMOptimizer: parameters must be real floating "
                                    f"point (float16, bfloat16, float32 or float64); {what()} is "
                                    f"{dtype}")
                # (torch checks these when .grad is assigned, but not when .data is swapped)
                if g.dtype != dtype or g.get_device() != p.get_device() or g.shape != p.shape:
                    raise TypeError(f"pymeta.LSTMOptimizer: the gradient of {what()} is "
                                    f"{g.dtype} {list(g.shape)} on {g.device}, not its "
                                    f"parameter's {dtype} on {p.device}")
                st = self.state.get(p)  # (get: indexing the defaultdict would add an entry)
                if st and "lstm_state" in st:
                    s = st["lstm_state"]
                    if not isinstance(s, Tensor) or s.dtype not in _REAL_FLOATS \
                            or s.layout is not torch.strided:
                        desc = (f"a {s.dtype} {s.layout} tensor" if isinstance(s, Tensor)
                                else f"a {type(s).__name__}")
                        raise TypeError(f"pymeta.LSTMOptimizer: the 'lstm_state' of {what()} is "
                                        f"{desc}, not a dense real floating tensor")
                    shape = self._state_shape(p, H)
                    if s.shape != shape:
                        raise ValueError(f"pymeta.LSTMOptimizer: the 'lstm_state' of {what()} is "
                                         f"{list(s.shape)}, expected {list(shape)} (hidden "
                                         f"size {H}, {self.state_layout} layout)")
                    step = st.get("step")
                    if not (type(step) is int and step >= 0):  # (else the full check)
                        _checks.integer("pymeta.LSTMOptimizer", f"the 'step' of the state of "
                                        f"{what()}", step, min=0)
                dtypes.add(dtype)
                items.append((p, group))
        # p's bound in each dtype the net will run in (the op checks it only when that
        # bucket's turn comes, after earlier buckets have been stepped)
        for cdtype in {self._compute_dtype(d) for d in dtypes}:
            if net.preprocessing == "log_sign" and net.p > reference.LSTM_MAX_P[cdtype]:
                raise ValueError(f"pymeta.LSTMOptimizer: the net's p = {net.p} is too large for "
                                 f"{str(cdtype)[6:]} math, which some parameters run in: p <= "
                                 f"{reference.lstm_max_p_text(cdtype)}")
        return items

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter with a ``.grad``. Returns ``closure()``'s loss if
        given (evaluated with gradients enabled, before the step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: Dict[Tuple[torch.device, torch.dtype], List[Tuple[Tensor, dict]]] = {}
        changed = False
        for p, group in self._checked_step_items():
            buckets.setdefault((p.device, p.dtype), []).append((p, group))
        for (device, dtype), items in buckets.items():
            chunks: List[List[Tuple[Tensor, dict]]] = [[]]
            size = 0
            for item in items:  # in order; a new bucket when this one would overflow
                n = self._coords(item[0])
                if chunks[-1] and size + n > self.bucket_coords:
                    chunks.append([])
                    size = 0
                chunks[-1].append(item)
                size += n
            for i, chunk in enumerate(chunks):
                changed |= self._step_bucket(device, dtype, i, chunk)
        if changed:
            self._release_stale()
        return loss

    def _release_stale(self) -> None:
        """After a step whose buckets differ from the last one's: forgets the cached joint
        buffers that some of their parameters have left, and replaces states that are views of
        a buffer other (stale) states share with compact copies, so that no memory is held for
        states nobody has any more (e.g. frozen parameters on a joint with trained ones)."""
        live = [st for st in self.state.values() if isinstance(st.get("lstm_state"), Tensor)]
        ids = {id(st["lstm_state"]) for st in live}
        for key, (_, views) in list(self._joint.items()):
            if not all(id(v) in ids for v in views):
                del self._joint[key]
        for group in _group_by_storage([st["lstm_state"] for st in live], live):
            if not group[0]:
                for st in group[1]:
                    st["lstm_state"] = st["lstm_state"].clone()

    @staticmethod
    def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype the net runs in for parameters of `dtype` (the op has no half kernels)."""
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def _storage_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The state's dtype for parameters of `dtype`: the compute dtype, or bfloat16 with
        state_dtype=bfloat16 where that is float32."""
        cdtype = self._compute_dtype(dtype)
        if self.state_dtype is torch.bfloat16 and cdtype == torch.float32:
            return torch.bfloat16
        return cdtype

    def _coords(self, p: Tensor) -> int:
        """The coordinates p takes in a bucket (blocked: whole blocks of 16)."""
        n = p.numel()
        return n if self.state_layout == "feature_major" else (n + 15) // 16 * 16

    def _state_shape(self, p: Tensor, H: int) -> Tuple[int, ...]:
        n = p.numel()
        return (4, H, n) if self.state_layout == "feature_major" else ((n + 15) // 16, 4, H, 16)

    def _step_bucket(self, device, dtype, index: int, items: List[Tuple[Tensor, dict]]) -> bool:
        """One fused call for `items`. Returns whether the bucket differs from the last step's
        (no cached joint buffer to reuse). Blocked: each parameter's blocks follow the last
        one's (the joint state is their concatenation along dim 0), its grad padded with zeros
        to whole blocks, so the joint call has no padding of its own."""
        net = self.net
        H = net.hidden_size
        cdtype, sdtype = self._compute_dtype(dtype), self._storage_dtype(dtype)
        blocked = self.state_layout == "blocked"
        # (states checked by _checked_step_items; new ones are only stored once the op is done)
        states, fresh = [], []
        for p, _ in items:
            s = self.state.get(p, {}).get("lstm_state")
            fresh.append(s is None)
            states.append(torch.zeros(self._state_shape(p, H), device=device, dtype=sdtype)
                          if s is None else s)
        cached = self._joint.get((device, dtype, index))
        hit = cached is not None and len(cached[1]) == len(states) and all(
            a is b for a, b in zip(states, cached[1]))
        if hit:
            joint = cached[0]  # the last step's output, over the same parameters
        elif len(states) == 1:
            joint = states[0].to(device, sdtype).contiguous()
        else:
            joint = torch.cat([s.to(device, sdtype) for s in states], 0 if blocked else 2)
        grads = [p.grad.reshape(-1) for p, _ in items]
        if blocked:  # zeros up to whole blocks
            pads = [-g.numel() % 16 for g in grads]
            grads = [x for g, k in zip(grads, pads) for x in ((g, g.new_zeros(k)) if k else (g,))]
        flat = grads[0] if len(grads) == 1 else torch.cat(grads)
        flat = flat.to(cdtype)  # (float16 / bfloat16: one cast for the bucket)
        weights = [w.detach().to(device, cdtype) for w in net.weights()]
        update, new_joint = ops.lstm_optimizer_step(
            flat, joint, *weights, net.preprocessing, net.p, net.out_scale)
        # Every parameter's share of update and of the new state in one split each, and the
        # updates added by one foreach call per lr (per-parameter slicing and add_ took ~8 us
        # a parameter of the step's host time).
        coords = [self._coords(p) for p, _ in items]
        ups = update.split(coords)
        views = list(new_joint.split([c // 16 for c in coords], 0) if blocked
                     else new_joint.split(coords, 2))
        adds: Dict[float, Tuple[List[Tensor], List[Tensor]]] = {}
        for (p, group), new, u, view in zip(items, fresh, ups, views):
            n = p.numel()
            ps, us = adds.setdefault(float(group["lr"]), ([], []))
            ps.append(p)
            us.append((u if u.numel() == n else u[:n]).view_as(p))
            st = self.state[p]
            st["lstm_state"] = view
            st["step"] = 1 if new else st["step"] + 1
        for lr, (ps, us) in adds.items():
            # (a float16/bfloat16 p: the float32 sum is rounded once, into p, as by p.add_.
            # A parameter listed twice, or two that start at one address, get one add_ at a
            # time, in order: a foreach call would race on a GPU.)
            if len({p.data_ptr() for p in ps}) == len(ps):
                torch._foreach_add_(ps, us, alpha=lr)
            else:
                for p, u in zip(ps, us):
                    p.add_(u, alpha=lr)
        self._joint[(device, dtype, index)] = (new_joint, views)
        return not hit

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        # The live states are views of their bucket's joint buffer. Where the states cover
        # their storage exactly (the usual case, see _release_stale) they go in as they are,
        # as torch's optimizers return their live state: torch.save stores each joint once and
        # nothing is copied (a large model's state is not doubled to save it). Others become
        # compact copies, so that a file holds no stale state.
        states = [v["lstm_state"] for v in sd["state"].values()
                  if isinstance(v.get("lstm_state"), Tensor)]
        whole = {id(t) for ok, ts in _group_by_storage(states, states) if ok for t in ts}
        sd["state"] = {k: {kk: (vv if not isinstance(vv, Tensor) or id(vv) in whole
                                else vv.clone(memory_format=torch.contiguous_format))
                           for kk, vv in v.items()}
                       for k, v in sd["state"].items()}
        sd["net"] = {"format": NET_FORMAT, "config": self.net.config(),
                     "state_dict": {k: v.detach().clone()
                                    for k, v in self.net.state_dict().items()}}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores ``state_dict()``'s state. Checks everything before changing anything: the
        param groups (their sizes, each one's lr), every state entry (an ``"lstm_state"``
        real floating tensor that fits its parameter and this net's hidden size, in either
        layout; an int ``"step"``), and the saved net (its config equal to ``self.net``'s, its
        weights real floating, finite, of this net's shapes); then loads the saved net's
        weights into ``self.net``."""
        where = "pymeta.LSTMOptimizer.load_state_dict"
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError(f"{where}: not an optimizer state_dict (needs 'state' and "
                             f"'param_groups')")
        saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
        if not isinstance(saved_state, dict):
            raise TypeError(f"{where}: 'state' is a {type(saved_state).__name__}, not a dict")
        if not isinstance(saved_groups, (list, tuple)) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), (list, tuple))
                for g in saved_groups):
            raise TypeError(f"{where}: 'param_groups' must be a list of dicts, each with a "
                            f"'params' list")
        sizes = [len(g["params"]) for g in saved_groups]
        if sizes != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(f"{where}: the saved parameter groups (sizes {sizes}) do not match "
                             f"this optimizer's parameter groups (sizes "
                             f"{[len(g['params']) for g in self.param_groups]})")
        for gi, g in enumerate(saved_groups):
            if "lr" not in g:
                raise ValueError(f"{where}: saved param group {gi} has no 'lr'")
            _check_lr(g["lr"], f"saved param group {gi}'s lr", where)
        ids = [i for g in saved_groups for i in g["params"]]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) \
                or len(set(ids)) != len(ids):
            raise ValueError(f"{where}: the saved param groups' 'params' must be distinct int "
                             f"ids, not {ids!r}")
        id_map = dict(zip(ids, (p for g in self.param_groups for p in g["params"])))

        saved_net = state_dict.get("net")
        if saved_net is not None:
            if not isinstance(saved_net, dict):
                raise TypeError(f"{where}: 'net' is a {type(saved_net).__name__}, not a dict")
            cfg = saved_net.get("config")
            if cfg != self.net.config():
                raise ValueError(f"{where}: the state was saved with a net {cfg} but this "
                                 f"optimizer's net is {self.net.config()}")
            if "state_dict" not in saved_net:
                raise ValueError(f"{where}: the saved net has no weights "
                                 f"(state_dict['net']['state_dict'])")
            problem = self.net._weights_problem(saved_net["state_dict"])
            if problem is not None:
                raise problem[0](f"{where}: the saved net's weights "
                                 f"(state_dict['net']['state_dict']) {problem[1]}")

        H = self.net.hidden_size
        states: Dict[Tensor, Tensor] = {}  # param -> its state, converted
        for k, v in saved_state.items():
            p = id_map.get(k)
            s = v.get("lstm_state") if isinstance(v, dict) else None
            if p is None or not isinstance(s, Tensor):
                raise ValueError(f"{where}: state entry {k!r} has no parameter or no "
                                 f"'lstm_state' tensor")
            if s.dtype not in _REAL_FLOATS or s.layout != torch.strided:
                raise TypeError(f"{where}: the 'lstm_state' of state entry {k!r} is a "
                                f"{s.dtype} {s.layout} tensor, not a dense real floating one")
            n, b = p.numel(), (p.numel() + 15) // 16
            fm_fits = s.dim() == 3 and s.shape[0] == 4 and s.shape[2] == n
            blk_fits = s.dim() == 4 and (s.shape[0], s.shape[1], s.shape[3]) == (b, 4, 16)
            if not (fm_fits or blk_fits):
                raise ValueError(f"{where}: the state of parameter {k} is {list(s.shape)}, "
                                 f"which does not fit [4, H, {n}] or the blocked "
                                 f"[{b}, 4, H, 16] for its shape {list(p.shape)}")
            saved_h = s.shape[1] if fm_fits else s.shape[2]
            if saved_h != H:
                raise ValueError(f"{where}: the state was saved for hidden size {saved_h} but "
                                 f"this optimizer's net has hidden size {H}")
            _checks.integer(where, f"state entry {k!r}'s 'step'", v.get("step"), min=0)
            states[p] = self._loaded_state(s, p)

        # torch's load_state_dict casts floating state to the parameter's dtype, which would
        # round a float16 parameter's float32 state: it gets the states without "lstm_state",
        # and the converted ones go in after.
        rest = {k: v for k, v in state_dict.items() if k != "net"}
        rest["state"] = {k: {kk: vv for kk, vv in v.items() if kk != "lstm_state"}
                         for k, v in saved_state.items()}
        super().load_state_dict(rest)
        for p, s in states.items():
            self.state[p] = {"lstm_state": s, **self.state[p]}
        if saved_net is not None:
            self.net._copy_weights(saved_net["state_dict"])
        self._joint.clear()

    def _loaded_state(self, s: Tensor, p: Tensor) -> Tensor:
        """A saved (checked) state of p in this optimizer's layout, on p's device, in the
        storage dtype (state_dtype); `s` itself where nothing changes."""
        if s.dim() == 3 and self.state_layout == "blocked":
            s = reference.lstm_state_to_blocked(s)
        elif s.dim() == 4 and self.state_layout == "feature_major":
            s = reference.lstm_state_to_feature_major(s)[:, :, :p.numel()].contiguous()
        return s.to(p.device, self._storage_dtype(p.dtype))

    def save(self, path) -> None:
        """``state_dict()`` to ``path``, atomically (temporary file + os.replace)."""
        atomic_save({"format": OPT_FORMAT, "version": 1, "state_dict": self.state_dict()}, path)

    def load(self, path) -> None:
        """``load_state_dict`` from a ``save``d file, read with ``weights_only=True``."""
        obj = safe_load(path, "LSTMOptimizer state", OPT_FORMAT)
        if not isinstance(obj.get("state_dict"), dict):
            raise FileFormatError(f"pymeta: {os.fspath(path)!r} holds no optimizer state_dict")
        self.load_state_dict(obj["state_dict"])
