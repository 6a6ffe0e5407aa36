"""Meta-training on several processes with ``torch.distributed``: the meta-batch of tasks is
sharded across ranks, and one meta-step on K ranks equals one meta-step of a single process
on the whole meta-batch (up to float rounding).

Each rank computes the meta-loss of its own tasks (the mean over its ``T_r`` tasks) and its
gradients; ``all_reduce_gradients`` sums ``T_r * grad_r`` over ranks in one flat bucket per
25 MB (one ``all_reduce`` per bucket, not one per tensor) together with the task counts, and
divides by the total ``T``: the result is the gradient of the full-batch mean. Every rank
then takes the same optimizer step, so the parameters stay identical on all ranks.

Launch (one node, 2 processes; gloo on CPUs, NCCL on GPUs)::

    torchrun --nproc_per_node=2 -m pymeta.examples.distributed_maml --steps 20

Several nodes (run on every node, with NODE_RANK 0..N-1 and the first node's address)::

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 --rdzv-id=job1 \\
        --max-restarts=3 -m pymeta.examples.distributed_maml --checkpoint /shared/ckpt.pt

With ``--max-restarts``, a failed worker makes torchrun restart every rank; they resume from
the last checkpoint (written atomically by rank 0, read by all).

API:
    init(backend=None, timeout_s=60)       init_process_group from torchrun's environment
    rank_world(group=None)                 (rank, world); (0, 1) without a process group
    shard_range(n, rank, world)            this rank's [start, stop) of n items
    shard(tensors, rank, world)            the rank's slice of dim 0 of each tensor
    rank_seed(seed, rank, step)            a per-(rank, step) seed: no two ranks draw alike
    check_config(config, group=None)       all ranks compare a hash; mismatch raises on all
    maml_config(maml, meta_batch, **more)  the configuration of a MAML run to check
    all_reduce_gradients(params, count)    task-weighted mean of the grads, bucketed
    maml_meta_step(maml, opt, batch, fn)   one sharded, all-reduced meta-step
    save_checkpoint / load_checkpoint      rank 0 writes atomically; a barrier; all read
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from pymeta import _checks
from pymeta._io import CHECKSUM_KEY, atomic_save, safe_load
from pymeta.tasks import derive_seed

__all__ = ["init", "rank_world", "shard_range", "shard", "rank_seed", "check_config",
           "maml_config", "all_reduce_gradients", "maml_meta_step", "save_checkpoint",
           "load_checkpoint", "ConfigMismatchError", "BUCKET_BYTES"]

BUCKET_BYTES = 25 * 1024 * 1024


class ConfigMismatchError(RuntimeError):
    """The ranks of a distributed run were started with different configurations."""


def init(backend: Optional[str] = None, timeout_s: float = 60.0) -> Tuple[int, int]:
    """Initializes the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) if it is not yet initialized; returns
    ``(rank, world)``. ``backend``: None picks NCCL when CUDA is available, else gloo.
    Without ``WORLD_SIZE`` in the environment, nothing is initialized and (0, 1) returned.
    Collectives time out after ``timeout_s`` (a lost rank raises instead of hanging)."""
    timeout_s = _checks.real("pymeta.distributed.init", "timeout_s", timeout_s, gt=0)
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            return 0, 1
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(seconds=timeout_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            # Under torchrun the store outlives a restart of the workers; without a fresh
            # prefix, restarted ranks can read the dead ranks' addresses from the previous
            # round (seen as 'connection refused' or a hang in the gloo mesh set-up).
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                 is_master=(rank == 0 and not agent_store), timeout=timeout,
                                 wait_for_workers=False)
            store = dist.PrefixStore(f"pymeta/restart{restart}", base)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def rank_world(group=None) -> Tuple[int, int]:
    """``(rank, world)`` in ``group``; ``(0, 1)`` when no process group is initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _active(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def shard_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Rank ``rank``'s contiguous ``[start, stop)`` of ``n`` items: sizes differ by at most
    one, the first ``n % world`` ranks get the extra item. A rank may get none (n < world).
    n, rank and world are ints (not bools): n >= 0, world >= 1, 0 <= rank < world."""
    return _shard_range("pymeta.distributed.shard_range", n, rank, world)


def _shard_range(where: str, n, rank, world) -> Tuple[int, int]:
    n = _checks.integer(where, "n", n, min=0)
    rank = _checks.integer(where, "rank", rank, min=0)
    world = _checks.integer(where, "world", world, min=1)
    if rank >= world:
        raise ValueError(f"{where}: rank {rank} is not in [0, world) = [0, {world})")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(tensors: Sequence[Tensor], rank: Optional[int] = None, world: Optional[int] = None,
          group=None) -> List[Tensor]:
    """The rank's slice (dim 0, the task dimension) of each of ``tensors`` (views). All
    (at least one) must have the same ``T``. rank/world default to the process group's."""
    where = "pymeta.distributed.shard"
    if rank is None or world is None:
        r, w = rank_world(group)
        rank = r if rank is None else rank
        world = w if world is None else world
    if isinstance(tensors, Tensor):
        raise TypeError(f"{where}: tensors must be a sequence of tensors (e.g. [x]), not one "
                        f"Tensor")
    try:
        tensors = list(tensors)
    except TypeError:
        raise TypeError(f"{where}: tensors must be a sequence of tensors, not "
                        f"{type(tensors).__name__}") from None
    if not tensors:
        raise ValueError(f"{where}: tensors is empty; give at least one tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: tensors[{i}] must be a Tensor, not {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{where}: tensors[{i}] is a 0-d tensor; each needs a task "
                             f"dimension (dim 0) to shard")
    T = {t.shape[0] for t in tensors}
    if len(T) != 1:
        raise ValueError(f"{where}: the tensors have different task counts "
                         f"{sorted(T)}; they must agree")
    start, stop = _shard_range(where, T.pop(), rank, world)
    return [t[start:stop] for t in tensors]


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for rank ``rank``'s tasks at meta-step ``step``: distinct, well-mixed streams for
    every (seed, rank, step) (``pymeta.tasks.derive_seed``). All three are ints >= 0."""
    where = "pymeta.distributed.rank_seed"
    return derive_seed(_checks.integer(where, "seed", seed, min=0),
                       _checks.integer(where, "rank", rank, min=0),
                       _checks.integer(where, "step", step, min=0))


# ---- the configuration check --------------------------------------------------------------

def _hash(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=repr).encode()).hexdigest()


def check_config(config: Dict[str, Any], group=None) -> str:
    """All ranks exchange a SHA-256 of ``config`` (a JSON-able dict: meta-batch size,
    parameter shapes, ...) with one ``all_gather``. If they differ, every rank raises
    ``ConfigMismatchError`` naming the ranks and the keys that differ (instead of hanging
    later in a collective of mismatched sizes). Returns the hash."""
    h = _hash(config)
    if not _active(group):
        return h
    world = dist.get_world_size(group)
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, (h, config), group=group)
    hashes = [g[0] for g in gathered]
    if len(set(hashes)) > 1:
        ref = gathered[0][1]
        lines = []
        for r, (hr, cr) in enumerate(gathered):
            if hr != hashes[0]:
                keys = sorted(k for k in set(ref) | set(cr) if ref.get(k) != cr.get(k))
                lines.append(f"rank {r} differs from rank 0 in {keys}: "
                             + ", ".join(f"{k}={cr.get(k)!r} (rank 0: {ref.get(k)!r})" for k in keys))
        raise ConfigMismatchError(
            "pymeta.distributed: the ranks were started with different configurations; "
            + "; ".join(lines))
    return h


def maml_config(maml, meta_batch: int, **more: Any) -> Dict[str, Any]:
    """The configuration of a distributed MAML run that all ranks must share: the meta-batch
    size (an int >= 1), the inner loop's settings and every parameter's name, shape and
    dtype."""
    meta_batch = _checks.integer("pymeta.distributed.maml_config", "meta_batch", meta_batch, min=1)
    return {"meta_batch": meta_batch, "inner_steps": maml.inner_steps,
            "lr_mode": maml.lr_mode, "first_order": maml.first_order,
            "adapted": list(maml.adapted_names),
            "params": [[n, list(p.shape), str(p.dtype)] for n, p in maml.named_parameters()],
            **more}


# ---- the gradient all-reduce --------------------------------------------------------------

def all_reduce_gradients(params: Sequence[Tensor], count: float, group=None,
                         extras: Optional[Sequence[float]] = None,
                         bucket_bytes: int = BUCKET_BYTES) -> Tuple[float, List[float]]:
    """Replaces each parameter's ``.grad`` (the gradient of this rank's mean over its
    ``count`` tasks; None counts as zeros) by the task-weighted mean over all ranks,
    ``sum_r count_r * grad_r / sum_r count_r``: the gradient of the full-batch mean.

    The grads are flattened into buckets of at most ``bucket_bytes`` per (device, dtype) and
    reduced with one ``all_reduce`` (SUM) per bucket; the counts and ``extras`` (numbers to
    sum as ``count * x``, e.g. the loss) ride in the first bucket, so a small model costs one
    collective per step. Returns ``(total count, [sum_r count_r * x_r / total for x in extras])``.
    Without a process group (or world 1) the grads are left as they are.

    ``count``: a finite number >= 0 (a rank without tasks passes 0); ``extras``: real
    numbers (NaN and inf travel as they are); ``bucket_bytes``: an int >= 1.
    """
    where = "pymeta.distributed.all_reduce_gradients"
    count = _checks.real(where, "count", count, min=0)
    extras = [_checks.real(where, f"extras[{i}]", x, finite=False)
              for i, x in enumerate(extras or [])]
    bucket_bytes = _checks.integer(where, "bucket_bytes", bucket_bytes, min=1)
    params = [p for p in params if p.requires_grad]
    if not _active(group):
        return count, extras
    groups: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    if not groups:
        raise ValueError("pymeta.distributed.all_reduce_gradients: no parameter needs a gradient")
    buckets: List[List[Tensor]] = []
    for plist in groups.values():
        cur, size = [], 0
        for p in plist:
            nbytes = p.numel() * p.element_size()
            if cur and size + nbytes > bucket_bytes:
                buckets.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += nbytes
        buckets.append(cur)
    total, sums = None, None
    for i, bucket in enumerate(buckets):
        ref = bucket[0]
        # the counts and extras travel in float64 in the first bucket when it is float64
        head_dtype = ref.dtype
        flats = [(p.grad.detach().reshape(-1) if p.grad is not None
                  else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)) for p in bucket]
        flat = torch.cat(flats).mul_(count)
        if i == 0:
            head = torch.tensor([float(count)] + [count * x for x in extras],
                                device=ref.device, dtype=torch.float64).to(head_dtype)
            flat = torch.cat([head, flat])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if i == 0:
            total = float(flat[0])
            sums = [float(v) / total if total > 0 else float("nan") for v in flat[1:1 + len(extras)]]
            flat = flat[1 + len(extras):]
        flat.div_(total)
        off = 0
        for p in bucket:
            n = p.numel()
            g = flat[off:off + n].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += n
    return total, sums


def maml_meta_step(maml, optimizer: torch.optim.Optimizer, batch: Sequence[Tensor], loss_fn,
                   step_weights=None, group=None, sharded: bool = True) -> float:
    """One meta-step of ``maml`` on the ranks' tasks: zero the grads, the local meta-loss
    (mean over this rank's tasks), backward, ``all_reduce_gradients``, ``optimizer.step()``.

    Args:
        batch: ``(x_support, y_support, x_query, y_query)``. ``sharded=True``: these are this
            rank's own tasks (e.g. sampled with ``rank_seed``); ``sharded=False``: the full
            meta-batch, identical on every rank, of which this rank takes its ``shard``.

    Returns the meta-loss of the whole meta-batch (the task-weighted mean over ranks).
    """
    batch = list(batch)
    if not sharded:
        batch = shard(batch, group=group)
    T = batch[0].shape[0]
    optimizer.zero_grad(set_to_none=True)
    if T > 0:
        loss = maml.meta_loss(*batch, loss_fn, step_weights)
        loss.backward()
        value = float(loss.detach())
    else:  # a rank without tasks still takes part in the collective
        value = 0.0
    _, (mean_loss,) = all_reduce_gradients(list(maml.parameters()), T, group, extras=[value])
    optimizer.step()
    return mean_loss


# ---- checkpoints --------------------------------------------------------------------------

def _barrier(group=None) -> None:
    if _active(group):
        dist.barrier(group=group)


# What ``torch.load(weights_only=True)`` (hence ``load_checkpoint``) reads back, as exact
# types: a subclass (numpy's float64 is a float, an IntEnum an int) is pickled as its own
# class, which the loader refuses. (Sets load too, but the file's checksum hashes their
# printed form, whose order can differ between processes: refused.) Types registered with
# torch.serialization.add_safe_globals count as leaves too.
_CONTAINERS = (dict, collections.OrderedDict, list, tuple, torch.Size)
_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Tensor,
           torch.nn.Parameter, torch.dtype, torch.device, torch.layout)


def _user_safe_types() -> tuple:
    return tuple(g for g in torch.serialization.get_safe_globals() if isinstance(g, type))


def _check_loadable(v: Any, name: str, path_ids: set) -> None:
    """Raises TypeError naming the first entry of v (named ``name``) that load_checkpoint
    would refuse: anything but tensors, plain containers, numbers, strings and None."""
    t = type(v)
    if t in _LEAVES or t in _user_safe_types():
        return
    if t not in _CONTAINERS:
        raise TypeError(
            f"pymeta.distributed.save_checkpoint: {name} is a {t.__module__}.{t.__qualname__} "
            f"({v!r:.80}); a checkpoint holds only tensors, dicts, lists, tuples, str, int, "
            f"float, bool and None (load_checkpoint refuses anything else): convert it, e.g. "
            f"with float(), int(), .tolist() or torch.as_tensor()")
    if id(v) in path_ids:
        raise ValueError(f"pymeta.distributed.save_checkpoint: {name} contains itself")
    path_ids.add(id(v))
    if isinstance(v, dict):
        for k, x in v.items():
            _check_loadable(k, f"a key of {name}", path_ids)
            _check_loadable(x, f"{name}[{k!r}]", path_ids)
    else:
        for i, x in enumerate(v):
            _check_loadable(x, f"{name}[{i}]", path_ids)
    path_ids.discard(id(v))


def save_checkpoint(obj: dict, path, group=None) -> None:
    """Rank 0 writes ``obj`` atomically (``pymeta._io.atomic_save``: a crash mid-write leaves
    the previous checkpoint); then all ranks meet at a barrier, so none runs ahead of a
    checkpoint that is not on disk yet.

    ``obj`` is a dict of tensors, plain containers (dict, list, tuple), numbers, strings and
    None, which ``load_checkpoint`` reads back; anything else (a NumPy number or array, an
    object) is refused with a TypeError naming the entry before any file is touched, as is
    the key ``"sha256"`` (the checksum's)."""
    # (checked on every rank, so that a bad obj raises on all of them, not on rank 0 alone
    # while the others wait at the barrier)
    if not isinstance(obj, dict):
        raise TypeError(f"pymeta.distributed.save_checkpoint: obj must be a dict, not "
                        f"{type(obj).__name__}")
    if CHECKSUM_KEY in obj:
        raise ValueError(f"pymeta.distributed.save_checkpoint: obj has the key "
                         f"{CHECKSUM_KEY!r}, which the file's checksum takes; rename it")
    _check_loadable(obj, "obj", set())
    rank, _ = rank_world(group)
    if rank == 0:
        atomic_save(obj, path)
    _barrier(group)


def load_checkpoint(path, what: str = "distributed checkpoint", kind: Optional[str] = None,
                    group=None) -> Optional[dict]:
    """All ranks meet at a barrier, then each reads ``path`` (``safe_load``); None when
    there is no file yet. Every rank sees the same file, so they all resume from the same
    step."""
    _barrier(group)
    path = os.fspath(path)
    exists = os.path.exists(path)
    if _active(group):  # all ranks must agree whether to resume (e.g. not a shared disk)
        flags: List[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(flags, exists, group=group)
        if len(set(flags)) > 1:
            raise RuntimeError(f"pymeta.distributed: the checkpoint {path!r} exists on ranks "
                               f"{[r for r, f in enumerate(flags) if f]} but not on the others; "
                               f"it must be on a file system that every rank sees")
    if not exists:
        return None
    return safe_load(path, what, kind)
