"""The learned optimizer of "Learning to learn by gradient descent by gradient descent"
(Andrychowicz et al. 2016): a coordinatewise two-layer LSTM, one fused op per step."""
from __future__ import annotations

import operator
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from pymeta import ops, reference
from pymeta._io import FileFormatError, atomic_save, safe_load

__all__ = ["LSTMOptimizerNet", "LSTMOptimizer", "PRETRAINED_FILE"]

NET_FORMAT = "pymeta.LSTMOptimizerNet"
OPT_FORMAT = "pymeta.LSTMOptimizer"
# The shipped default (package data): meta-trained on 10-d quadratics by
# scripts/reproduce_l2l.py (see docs/RESULTS.md).
PRETRAINED_FILE = "lstm_optimizer_quadratic.pt"


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
        super().__init__()
        if preprocessing not in ("log_sign", "none"):
            raise ValueError(f"LSTMOptimizerNet: preprocessing must be 'log_sign' or 'none', "
                             f"not {preprocessing!r}")
        if not 1 <= hidden_size <= 64:
            raise ValueError(f"LSTMOptimizerNet: hidden_size must be in [1, 64], got {hidden_size}")
        self.hidden_size = hidden_size
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
        """
        w = self.out.weight
        device = device if device is not None else w.device
        dtype = dtype if dtype is not None else w.dtype
        if layout == "blocked":
            return torch.zeros((n + 15) // 16, 4, self.hidden_size, 16, device=device,
                               dtype=dtype)
        if layout != "feature_major":
            raise ValueError(f"LSTMOptimizerNet.init_state: layout must be 'feature_major' or "
                             f"'blocked', not {layout!r}")
        return torch.zeros(4, self.hidden_size, n, device=device, dtype=dtype)

    def forward(self, grad: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """grad of any shape (N elements), state ``[4, H, N]`` or ``[ceil(N / 16), 4, H, 16]``
        -> (update of grad's shape, new_state of state's shape)."""
        update, new_state = ops.lstm_optimizer_step(
            grad.reshape(-1), state, *self.weights(), self.preprocessing, self.p, self.out_scale)
        return update.reshape(grad.shape), new_state

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
        obj = safe_load(path, "LSTMOptimizerNet weights", NET_FORMAT)
        cfg, sd = obj.get("config"), obj.get("state_dict")
        if not isinstance(cfg, dict) or not isinstance(sd, dict):
            raise FileFormatError(f"pymeta: {os.fspath(path)!r} lacks the config or the weights "
                                  f"of an LSTMOptimizerNet")
        return obj

    @classmethod
    def load(cls, path, map_location=None) -> "LSTMOptimizerNet":
        """A net built from the config in ``path`` with its weights. ``net.info`` holds the
        file's notes."""
        obj = cls._read(path)
        try:
            net = cls(**obj["config"])
        except (TypeError, ValueError) as e:
            raise FileFormatError(f"pymeta: {os.fspath(path)!r} has an invalid config "
                                  f"{obj['config']!r}: {e}") from e
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

    def _load_checked(self, sd: dict, where: str) -> None:
        own = self.state_dict()
        bad = [k for k in own if k not in sd or not isinstance(sd[k], Tensor)
               or sd[k].shape != own[k].shape]
        extra = [k for k in sd if k not in own]
        if bad or extra:
            got = {k: list(sd[k].shape) if isinstance(sd.get(k), Tensor) else None for k in bad}
            raise FileFormatError(f"pymeta: the weights in {where!r} do not fit an LSTMOptimizerNet "
                                  f"with hidden_size={self.hidden_size}: missing or misshapen "
                                  f"{got}, unexpected {extra}")
        with torch.no_grad():
            for k, v in own.items():
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
                                        f"`python scripts/reproduce_l2l.py --pretrain-only`")
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
            learning-rate schedulers work as usual.
        state_dtype: the storage dtype of the recurrent state: None (each parameter's dtype)
            or ``torch.bfloat16`` for float32 parameters. The state is 4 H values per
            parameter coordinate (80 at H = 20: 320 bytes in float32, 20x Adam's), so
            bfloat16 halves the optimizer's memory; the math stays float32 and only the
            stored state is rounded (see ``pymeta.ops.lstm_optimizer_step``). Parameters of
            other dtypes keep their own dtype for the state.
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
    are refused.

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
        if net is None:
            net = LSTMOptimizerNet.pretrained()
        if not isinstance(net, LSTMOptimizerNet):
            raise TypeError(f"pymeta.LSTMOptimizer: net must be an LSTMOptimizerNet or None, "
                            f"not {type(net).__name__}")
        if not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"pymeta.LSTMOptimizer: invalid lr {lr!r} (a float >= 0)")
        super().__init__(params, {"lr": float(lr)})
        self.net = net
        self.state_dtype = state_dtype
        self.bucket_coords = bucket_coords
        self.state_layout = state_layout
        # (device, dtype, bucket) -> (joint state [4, H, N] of the last step, per-param views
        # of it), so that a step over the same parameters as the last one skips re-concatenating.
        self._joint: Dict[Tuple[torch.device, torch.dtype, int], Tuple[Tensor, List[Tensor]]] = {}

    # ---- the step --------------------------------------------------------------------------

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
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.grad.layout != torch.strided:
                    raise RuntimeError("pymeta.LSTMOptimizer does not support sparse gradients "
                                       f"(a parameter of shape {list(p.shape)} has a "
                                       f"{p.grad.layout} gradient); use a dense embedding or "
                                       f"another optimizer for it")
                if not p.is_floating_point():
                    raise TypeError(f"pymeta.LSTMOptimizer: parameters must be real floating "
                                    f"point, got {p.dtype}")
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

    def _storage_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The state's dtype for parameters of `dtype` (bfloat16 only for float32)."""
        if self.state_dtype is torch.bfloat16 and dtype == torch.float32:
            return torch.bfloat16
        return dtype

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
        sdtype = self._storage_dtype(dtype)
        blocked = self.state_layout == "blocked"
        states = []
        for p, _ in items:
            st = self.state[p]
            shape = self._state_shape(p, H)
            if "lstm_state" not in st:
                st["lstm_state"] = torch.zeros(shape, device=device, dtype=sdtype)
                st["step"] = 0
            s = st["lstm_state"]
            if s.shape != shape:
                raise ValueError(f"pymeta.LSTMOptimizer: the state of a parameter of shape "
                                 f"{list(p.shape)} is {list(s.shape)}, expected "
                                 f"{list(shape)} (hidden size {H}, {self.state_layout} layout)")
            states.append(s)
        cached = self._joint.get((device, dtype, index))
        hit = cached is not None and len(cached[1]) == len(states) and all(
            a is b for a, b in zip(states, cached[1]))
        if hit:
            joint = cached[0]  # the last step's output, over the same parameters
        elif len(states) == 1:
            joint = states[0].to(device, sdtype).contiguous()
        else:
            joint = torch.cat([s.to(device, sdtype) for s in states], 0 if blocked else 2)
        grads = [p.grad.reshape(-1).to(dtype) for p, _ in items]
        if blocked:  # zeros up to whole blocks
            pads = [-g.numel() % 16 for g in grads]
            grads = [x for g, k in zip(grads, pads) for x in ((g, g.new_zeros(k)) if k else (g,))]
        flat = grads[0] if len(grads) == 1 else torch.cat(grads)
        weights = [w.detach().to(device, dtype) for w in net.weights()]
        update, new_joint = ops.lstm_optimizer_step(
            flat, joint, *weights, net.preprocessing, net.p, net.out_scale)
        views, off = [], 0
        for p, group in items:
            n = p.numel()
            p.add_(update[off:off + n].view_as(p), alpha=group["lr"])
            st = self.state[p]
            st["lstm_state"] = (new_joint[off // 16:(off + n + 15) // 16] if blocked
                                else new_joint[:, :, off:off + n])
            st["step"] += 1
            views.append(st["lstm_state"])
            off += self._coords(p)
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
        """Restores ``state_dict()``'s state. Checks, before changing anything, that every
        recurrent state fits its parameter and this net's hidden size, and that the saved
        net's config equals ``self.net``'s; then loads the saved net's weights into
        ``self.net``."""
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError("pymeta.LSTMOptimizer.load_state_dict: not an optimizer state_dict "
                             "(needs 'state' and 'param_groups')")
        H = self.net.hidden_size
        saved_net = state_dict.get("net")
        if saved_net is not None:
            cfg = saved_net.get("config") if isinstance(saved_net, dict) else None
            if cfg != self.net.config():
                raise ValueError(f"pymeta.LSTMOptimizer.load_state_dict: the state was saved with "
                                 f"a net {cfg} but this optimizer's net is {self.net.config()}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups) and all(
                len(a["params"]) == len(b["params"]) for a, b in zip(saved_groups, self.param_groups)):
            id_map = {i: p for a, b in zip(saved_groups, self.param_groups)
                      for i, p in zip(a["params"], b["params"])}
            for k, v in state_dict["state"].items():
                p = id_map.get(k)
                s = v.get("lstm_state") if isinstance(v, dict) else None
                if p is None or not isinstance(s, Tensor):
                    raise ValueError(f"pymeta.LSTMOptimizer.load_state_dict: state entry {k!r} "
                                     f"has no parameter or no 'lstm_state' tensor")
                n, b = p.numel(), (p.numel() + 15) // 16
                fm_fits = s.dim() == 3 and s.shape[0] == 4 and s.shape[2] == n
                blk_fits = s.dim() == 4 and (s.shape[0], s.shape[1], s.shape[3]) == (b, 4, 16)
                if not (fm_fits or blk_fits):
                    raise ValueError(f"pymeta.LSTMOptimizer.load_state_dict: the state of "
                                     f"parameter {k} is {list(s.shape)}, which does not fit "
                                     f"[4, H, {n}] or the blocked [{b}, 4, H, 16] for its shape "
                                     f"{list(p.shape)}")
                saved_h = s.shape[1] if fm_fits else s.shape[2]
                if saved_h != H:
                    raise ValueError(f"pymeta.LSTMOptimizer.load_state_dict: the state was saved "
                                     f"for hidden size {saved_h} but this optimizer's net has "
                                     f"hidden size {H}")
        rest = {k: v for k, v in state_dict.items() if k != "net"}
        super().load_state_dict(rest)  # checks the groups, casts to each param's device/dtype
        for group in self.param_groups:  # ... and back to the storage dtype (state_dtype),
            for p in group["params"]:      # in this optimizer's layout
                st = self.state.get(p)
                if st and isinstance(st.get("lstm_state"), Tensor):
                    s = st["lstm_state"]
                    if s.dim() == 3 and self.state_layout == "blocked":
                        s = reference.lstm_state_to_blocked(s)
                    elif s.dim() == 4 and self.state_layout == "feature_major":
                        s = reference.lstm_state_to_feature_major(s)[:, :, :p.numel()].contiguous()
                    st["lstm_state"] = s.to(self._storage_dtype(p.dtype))
        if saved_net is not None:
            self.net._load_checked(saved_net["state_dict"], "the optimizer state_dict")
        self._joint.clear()

    def save(self, path) -> None:
        """``state_dict()`` to ``path``, atomically (temporary file + os.replace)."""
        atomic_save({"format": OPT_FORMAT, "version": 1, "state_dict": self.state_dict()}, path)

    def load(self, path) -> None:
        """``load_state_dict`` from a ``save``d file, read with ``weights_only=True``."""
        obj = safe_load(path, "LSTMOptimizer state", OPT_FORMAT)
        if not isinstance(obj.get("state_dict"), dict):
            raise FileFormatError(f"pymeta: {os.fspath(path)!r} holds no optimizer state_dict")
        self.load_state_dict(obj["state_dict"])
