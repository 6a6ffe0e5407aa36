"""Meta-training of the learned LSTM optimizer (Andrychowicz et al. 2016), and running
optimizers (learned or torch.optim) on batches of optimizee problems.

One meta-iteration samples ``meta_batch`` problems of a family as ONE vectorized optimizee
(a flat ``theta`` over every problem's coordinates, see ``pymeta.tasks``) and runs it for
``horizon`` steps of the learned optimizer. Every ``unroll`` steps, the meta-loss

    L = sum_{t = k+1}^{k+unroll} mean_b f_b(theta_t)

is backpropagated into the net's weights (truncated BPTT) and Adam takes a step; theta and
the LSTM state carry into the next unroll, detached. The optimizee gradients fed to the net
are detached (the paper drops the second derivatives). Each step is one fused
``lstm_optimizer_step`` over all problems' coordinates.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from pymeta import _checks, reference
from pymeta._io import FileFormatError, atomic_save, safe_load
from pymeta.lstm_optimizer import LSTMOptimizerNet
from pymeta.tasks import OptimizeeProblem, autograd_losses_and_grad, derive_seed

__all__ = ["meta_train", "unroll", "run_learned", "run_torch_optimizer"]

CKPT_FORMAT = "pymeta.meta_train"
HISTORY_KEYS = ("iteration", "meta_loss", "final_loss", "seconds", "skipped")


class _MetaLossTerm(torch.autograd.Function):
    """``mean_b f_b(theta)`` as a node of theta's graph, from ``problem.losses_and_grad``'s
    values at theta: the losses ``[B]`` and ``grad = d sum_b f_b / d theta`` ``[N]``, which the
    net is fed anyway. Its backward, ``d_out * grad / B``, is the loss's own (exact, not an
    approximation), with no graph of the loss kept or walked; its jvp is ``grad . t / B``.
    A backward that is itself recorded (``create_graph``, for higher derivatives) runs
    ``losses_fn(theta, step)`` again and differentiates that, so that those derivatives see
    the loss's dependence on theta (``grad`` alone is a constant)."""

    @staticmethod
    def forward(ctx, theta, losses, grad, losses_fn, step):
        ctx.save_for_backward(theta, grad)
        ctx.save_for_forward(grad)
        ctx.losses_fn, ctx.step, ctx.batch = losses_fn, step, losses.numel()
        return losses.mean()

    @staticmethod
    def backward(ctx, d_out):
        theta, grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph
            value = ctx.losses_fn(theta, ctx.step).mean()
            (d_theta,) = torch.autograd.grad(value, theta, d_out, create_graph=True)
        else:
            d_theta = grad * (d_out / ctx.batch)
        return d_theta, None, None, None, None

    @staticmethod
    def jvp(ctx, theta_t, losses_t, grad_t, losses_fn_t, step_t):
        (grad,) = ctx.saved_tensors
        return (grad * theta_t).sum() / ctx.batch


def unroll(net: LSTMOptimizerNet, problem: OptimizeeProblem, theta: Tensor, state: Tensor,
           t0: int, steps: int, on_grad: Optional[Callable[[Tensor], None]] = None):
    """``steps`` learned-optimizer steps from step ``t0``, differentiable w.r.t. the net.

    Args:
        theta: flat parameters ``[N]`` at step t0 (treated as a constant: detached here).
        state: the LSTM state ``[4, H, N]`` at step t0 (detached here).
        on_grad: called with every gradient fed to the net, before the net sees it (tests
            check it is detached; an in-place edit changes what the net is fed, not the
            meta-loss).

    Returns ``(meta_loss, theta, state, last_losses)``: the meta-loss
    ``sum_{t=t0+1}^{t0+steps} mean_b f_b(theta_t)`` (a graph into the net's weights), theta and
    the state after the last step (still attached), and the per-problem losses ``[B]`` at
    the last step (detached).

    First order, as in the paper: the gradients fed to the net are constants. Each step calls
    ``problem.losses_and_grad`` once: its gradient is the net's next input and, over B, the
    meta-loss term's gradient at theta_t (``_MetaLossTerm``), so the loss's graph is never
    built into the unroll (a closed-form problem, such as the quadratics, builds none at all:
    a 20-step unroll at N = 10 took 13.8 ms through autograd, 8.1 this way).
    """
    theta = theta.detach()
    state = state.detach()
    # (a problem of a family's own that is not an OptimizeeProblem: autograd of its losses)
    losses_and_grad = getattr(problem, "losses_and_grad", None) or functools.partial(
        autograd_losses_and_grad, problem.losses)
    losses, g = losses_and_grad(theta, t0)
    meta_loss = theta.new_zeros(())
    for j in range(steps):
        if on_grad is not None:
            on_grad(g)
        update, state = net(g, state)
        theta = theta + update
        losses, g = losses_and_grad(theta, t0 + j + 1)
        # (on_grad may edit the next step's g in place, e.g. clip it for the net: the term
        # keeps the loss's own gradient)
        meta_loss = meta_loss + _MetaLossTerm.apply(
            theta, losses, g if on_grad is None else g.clone(), problem.losses, t0 + j + 1)
    return meta_loss, theta, state, losses


def _config(net, family, unroll_, horizon, meta_lr, meta_batch, seed, dtype,
            state_dtype) -> Dict[str, Any]:
    cfg = {"family": repr(family), "net": net.config(), "unroll": int(unroll_),
           "horizon": int(horizon), "meta_lr": float(meta_lr), "meta_batch": int(meta_batch),
           "seed": int(seed), "dtype": str(dtype)}
    if state_dtype is not None:  # absent by default: checkpoints of earlier versions resume
        cfg["state_dtype"] = str(state_dtype)
    return cfg


# ---- argument and checkpoint validation ------------------------------------------------------
# meta_train validates everything (arguments, and a checkpoint to resume from) before it
# touches the net: an error leaves the net's weights, dtype and device as they were.

def _check_steps(steps, who: str) -> int:
    return _checks.integer(f"pymeta.{who}", "steps", steps, min=0)


def _check_problem(problem, who: str) -> None:
    if not isinstance(problem, OptimizeeProblem):
        raise TypeError(f"pymeta.{who}: problem must be an OptimizeeProblem (e.g. "
                        f"family.sample(...) of pymeta.tasks), not {type(problem).__name__}")


def _check_device(device, net: LSTMOptimizerNet) -> torch.device:
    """The device to run on: ``device``, or the net's (None): cpu, or a cuda device that is
    available."""
    if device is None:
        dev = net.out.weight.device
    else:
        if isinstance(device, bool):  # torch.device(True) would be cuda:1
            raise TypeError(f"pymeta.meta_train: device must be a torch.device, str or int, "
                            f"not {device!r}")
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"pymeta.meta_train: device {device!r} is not a device: {e}") from e
    where = "the net's device" if device is None else "device"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"pymeta.meta_train: {where} is {dev} but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"pymeta.meta_train: {where} is {dev} but there are only "
                             f"{torch.cuda.device_count()} CUDA devices")
    elif dev.type == "meta":  # holds no values: the net would lose its weights
        raise ValueError(f"pymeta.meta_train: {where} must hold values, not {dev}")
    return dev


def _check_checkpoint_path(checkpoint, folder: bool = True) -> Optional[str]:
    if checkpoint is None:
        return None
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"pymeta.meta_train: checkpoint must be None, a str or an os.PathLike, "
                        f"not {type(checkpoint).__name__} {checkpoint!r}")
    path = os.fspath(checkpoint)
    if not isinstance(path, str) or not path:
        raise ValueError(f"pymeta.meta_train: checkpoint must name a file, got {checkpoint!r}")
    # Found now rather than at the first write, after (part of) a run has changed the net.
    if os.path.isdir(path):
        raise ValueError(f"pymeta.meta_train: checkpoint {path!r} is a directory, not a file")
    if folder and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"pymeta.meta_train: the folder of checkpoint {path!r} does not exist")
    return path


_REAL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_weight(t, shape) -> bool:
    """A dense real floating tensor of ``shape`` (copy_ would round ints silently and drop a
    complex tensor's imaginary part)."""
    return (isinstance(t, Tensor) and t.dtype in _REAL_FLOATS and t.layout == torch.strided
            and t.shape == shape)


def _validated_checkpoint(ck: dict, path: str, config: Dict[str, Any], net: LSTMOptimizerNet,
                          iterations: int, meta_lr: float, device: torch.device,
                          dtype: torch.dtype):
    """Checks every entry of a loaded checkpoint without loading any of it; returns
    ``(net_state, adam_state, history, iteration)``. A malformed entry raises
    FileFormatError naming the file and the entry; a checkpoint of another configuration,
    or one past ``iterations``, a ValueError."""
    def bad(field: str, why: str) -> FileFormatError:
        return FileFormatError(f"pymeta: the checkpoint {path!r} has an invalid {field!r} "
                               f"entry: {why}")

    if ck.get("version") != 1:
        raise bad("version", f"{ck.get('version')!r} (this pymeta reads version 1)")
    saved = ck.get("config")
    if not isinstance(saved, dict):
        raise bad("config", f"a {type(saved).__name__}, not a dict")
    if saved != config:
        diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        diff.update({k: (v, None) for k, v in saved.items() if k not in config})
        raise ValueError(f"pymeta.meta_train: the checkpoint {path!r} is of another run; it "
                         f"differs in (checkpoint, now): {diff}")

    start = ck.get("iteration")
    if not (_checks.is_int(start) and start >= 0):
        raise bad("iteration", f"{start!r} is not an int >= 0")
    if start > iterations:
        raise ValueError(f"pymeta.meta_train: the checkpoint {path!r} has done {start} "
                         f"iterations, more than iterations={iterations}")

    hist = ck.get("history")
    if not isinstance(hist, dict) or set(hist) != set(HISTORY_KEYS):
        got = sorted(map(str, hist)) if isinstance(hist, dict) else type(hist).__name__
        raise bad("history", f"expected a dict of lists {list(HISTORY_KEYS)}, got {got}")
    for k in HISTORY_KEYS:
        v = hist[k]
        if not (isinstance(v, list) and len(v) == start and all(_checks.is_real(x) for x in v)):
            raise bad("history", f"{k!r} is not a list of {start} numbers (one per iteration done)")
    if hist["iteration"] != list(range(start)):
        raise bad("history", f"'iteration' is {hist['iteration']!r}, not 0..{start - 1}")

    # (training never makes a weight non-finite: a non-finite meta-loss makes no step)
    problem = net._weights_problem(ck.get("net"))
    if problem is not None:
        raise bad("net", f"the weights {problem[1]}")
    sd = ck["net"]

    adam = ck.get("adam")
    shapes = [p.shape for p in net.parameters()]
    if not (isinstance(adam, dict) and isinstance(adam.get("state"), dict)
            and isinstance(adam.get("param_groups"), list)):
        raise bad("adam", "not an optimizer state_dict (a dict of 'state' and 'param_groups')")
    groups = adam["param_groups"]
    if not (len(groups) == 1 and isinstance(groups[0], dict)
            and groups[0].get("params") == list(range(len(shapes)))):
        raise bad("adam", f"expected one parameter group of the net's {len(shapes)} parameters")
    lr = groups[0].get("lr")
    if not (_checks.is_real(lr) and float(lr) == float(meta_lr)):  # meta_lr itself is in the config
        raise bad("adam", f"its lr {lr!r} is not meta_lr={meta_lr!r}")
    for i, st in adam["state"].items():
        if not (_checks.is_int(i) and 0 <= i < len(shapes) and isinstance(st, dict)):
            raise bad("adam", f"state of an unknown parameter {i!r}")
        step = st.get("step")
        if isinstance(step, Tensor):
            step = float(step) if step.numel() == 1 and not step.is_complex() else None
        if not (_checks.is_real(step) and 0 <= step < math.inf):
            raise bad("adam", f"parameter {i}'s step {st.get('step')!r} is not a number >= 0")
        for k in ("exp_avg", "exp_avg_sq"):
            if not _is_weight(st.get(k), shapes[i]):
                raise bad("adam", f"parameter {i}'s {k!r} is not a real floating tensor of "
                                  f"shape {list(shapes[i])}")
    # What the checks above may miss, torch finds: load it into a scratch Adam (over scratch
    # tensors of the net's shapes, device and dtype) before the real one.
    scratch = [torch.zeros(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
    try:
        torch.optim.Adam(scratch, lr=meta_lr).load_state_dict(adam)
    except Exception as e:
        raise bad("adam", f"torch cannot load it: {e!r}") from e
    return sd, adam, {k: list(hist[k]) for k in HISTORY_KEYS}, int(start)


def meta_train(net: LSTMOptimizerNet, family, iterations: int, unroll: int = 20,
               horizon: int = 100, meta_lr: float = 1e-3, meta_batch: int = 128, seed: int = 0,
               checkpoint: Optional[str | os.PathLike] = None, progress: bool = True,
               checkpoint_every: int = 10, device=None,
               dtype: torch.dtype = torch.float32, distributed=False,
               state_dtype: Optional[torch.dtype] = None) -> Dict[str, List[float]]:
    """Meta-trains ``net`` (in place) on problems of ``family`` with Adam.

    Args:
        net: the ``LSTMOptimizerNet`` whose weights are trained.
        family: a task family with ``sample(batch, seed, device, dtype)`` (``pymeta.tasks``).
        iterations: the total number of meta-iterations (one is a fresh batch of problems run
            for ``horizon`` steps, i.e. ``ceil(horizon / unroll)`` Adam steps). With a
            checkpoint, a resumed run continues up to this total.
        unroll: truncation length of BPTT (steps per meta-gradient).
        horizon: optimizee steps per meta-iteration.
        meta_lr: Adam's learning rate.
        meta_batch: problems per meta-iteration, run as one vectorized optimizee.
        seed: iteration i's problems are ``family.sample(meta_batch, derive_seed(seed, i))``;
            nothing else is random, so a run is a pure function of its arguments.
        checkpoint: a path. If the file exists the run resumes from it (its configuration
            must match); it is (re)written atomically every ``checkpoint_every`` iterations
            and at the end. Resuming gives bitwise the same result as an uninterrupted run.
        progress: show a tqdm bar.
        device, dtype: of the optimizee (and of the net, which is moved there).
        distributed: False (one process, the default), True (the default
            ``torch.distributed`` process group) or a process group. Every rank samples the
            same ``meta_batch`` problems and runs its shard of them
            (``pymeta.distributed.shard_range``); after each unroll the net's gradients, the
            meta-loss and a divergence flag are all-reduced in one bucketed collective,
            weighted by each rank's problem count, so every Adam step equals the
            single-process one. The configuration (with the net's shapes) is checked on all
            ranks at the start; rank 0 writes the checkpoint, every rank reads it.
        state_dtype: the storage dtype of the net's recurrent state: None or ``dtype`` (the
            same), or ``torch.bfloat16`` with ``dtype=torch.float32``. Every step of an unroll
            keeps its input state for the backward (4 H values per optimizee coordinate), so
            bfloat16 about halves the unroll's memory; the math stays float32.

    Returns the history: ``{"iteration", "meta_loss", "final_loss", "seconds"}`` lists, one
    entry per meta-iteration: ``meta_loss`` is the iteration's total meta-loss divided by
    ``horizon`` (the mean optimizee loss along the trajectory), ``final_loss`` the mean loss
    at the last step, ``seconds`` the wall time of the iteration. Iterations whose meta-loss
    is not finite make no Adam step (``history["skipped"]`` counts them).

    Raises TypeError or ValueError for a bad argument, ValueError for a checkpoint of another
    configuration (or past ``iterations``) and ``pymeta.FileFormatError`` for a malformed one,
    all before the net is changed in any way (weights, dtype, device).
    """
    # Everything is validated before the net is touched (moved, loaded or trained): an error
    # leaves its weights, dtype and device as they were.
    if not isinstance(net, LSTMOptimizerNet):
        raise TypeError(f"pymeta.meta_train: net must be an LSTMOptimizerNet, not {type(net).__name__}")
    if net.out.weight.is_meta:  # nothing to train, nor to move to a real device
        raise ValueError("pymeta.meta_train: net's weights are on the meta device (they hold "
                         "no values)")
    if not callable(getattr(family, "sample", None)):
        raise TypeError(f"pymeta.meta_train: family must be a task family with a sample(batch, "
                        f"seed, device, dtype) method (pymeta.tasks), not {type(family).__name__}")
    for name, v in (("iterations", iterations), ("unroll", unroll), ("horizon", horizon),
                    ("meta_batch", meta_batch), ("checkpoint_every", checkpoint_every)):
        least = 0 if name == "iterations" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"pymeta.meta_train: {name} must be an int >= {least}, got {v!r}")
    _checks.real("pymeta.meta_train", "meta_lr", meta_lr, gt=0)  # inf: the first step ruins the net
    # (a float seed would be truncated silently by derive_seed, which takes ints >= 0 only)
    _checks.integer("pymeta.meta_train", "seed", seed, min=0)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"pymeta.meta_train: dtype must be torch.float32 or torch.float64, not "
                        f"{type(dtype).__name__} {dtype!r}")
    if dtype not in (torch.float32, torch.float64):  # the op and the net's math need these
        raise ValueError(f"pymeta.meta_train: dtype must be torch.float32 or torch.float64, "
                         f"got {dtype}")
    if net.preprocessing == "log_sign" and net.p > reference.LSTM_MAX_P[dtype]:
        raise ValueError(f"pymeta.meta_train: the net's p = {net.p} is too large for dtype="
                         f"{dtype}: p <= {reference.lstm_max_p_text(dtype)}")
    if state_dtype == dtype:
        state_dtype = None  # the default, spelled out
    if state_dtype is not None and not (state_dtype == torch.bfloat16 and dtype == torch.float32):
        raise ValueError(f"pymeta.meta_train: state_dtype must be None (dtype), dtype itself, or "
                         f"torch.bfloat16 with dtype=torch.float32; got state_dtype="
                         f"{state_dtype}, dtype={dtype}")
    device = _check_device(device, net)
    dist_on = distributed is not False and distributed is not None
    # (distributed: only rank 0 writes, and the folder may exist on its node alone)
    checkpoint = _check_checkpoint_path(checkpoint, folder=not dist_on)
    if dist_on and distributed is not True and not (
            torch.distributed.is_available()
            and isinstance(distributed, torch.distributed.ProcessGroup)):
        raise TypeError(f"pymeta.meta_train: distributed must be False, True or a "
                        f"torch.distributed process group, not {type(distributed).__name__}")

    config = _config(net, family, unroll, horizon, meta_lr, meta_batch, seed, dtype, state_dtype)
    history: Dict[str, List[float]] = {k: [] for k in HISTORY_KEYS}
    start = 0
    group, rank, world = None, 0, 1
    if dist_on:
        from pymeta import distributed as pdist
        group = None if distributed is True else distributed
        rank, world = pdist.rank_world(group)
        pdist.check_config({**config, "net_shapes": {k: list(v.shape) for k, v in
                                                     net.state_dict().items()}}, group)
        ck = (pdist.load_checkpoint(checkpoint, "meta-training checkpoint", CKPT_FORMAT, group)
              if checkpoint is not None else None)
        if meta_batch < world:
            raise ValueError(f"pymeta.meta_train: meta_batch {meta_batch} is smaller than the "
                             f"{world} ranks; every rank needs at least one problem")
        lo, hi = pdist.shard_range(meta_batch, rank, world)
    elif checkpoint is not None and os.path.exists(checkpoint):
        ck = safe_load(checkpoint, "meta-training checkpoint", CKPT_FORMAT)
    else:
        ck = None
    # (every rank reads the same file, so a bad one raises on all of them alike)
    resume = (_validated_checkpoint(ck, checkpoint, config, net, iterations, meta_lr, device,
                                    dtype) if ck is not None else None)

    # Valid: only now move the net and load the checkpoint into it.
    net.to(device=device, dtype=dtype)
    opt = torch.optim.Adam(net.parameters(), lr=meta_lr)
    if resume is not None:
        net_state, adam_state, history, start = resume
        net._load_checked(net_state, checkpoint)
        opt.load_state_dict(adam_state)

    def save(done: int) -> None:
        if dist_on:
            pdist.save_checkpoint({"format": CKPT_FORMAT, "version": 1, "config": config,
                                   "iteration": done,
                                   "net": {k: v.detach().cpu().clone()
                                           for k, v in net.state_dict().items()},
                                   "adam": opt.state_dict(), "history": history}, checkpoint, group)
            return
        atomic_save({"format": CKPT_FORMAT, "version": 1, "config": config, "iteration": done,
                     "net": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                     "adam": opt.state_dict(), "history": history}, checkpoint)

    from tqdm.auto import tqdm
    bar = tqdm(range(start, iterations), initial=start, total=iterations, disable=not progress,
               desc="meta-train", unit="it")
    for it in bar:
        if dist_on:
            history_step = _distributed_iteration(net, opt, family, it, seed, meta_batch, lo, hi,
                                                  unroll, horizon, device, dtype, group,
                                                  state_dtype)
            for k, v in history_step.items():
                history[k].append(v)
            bar.set_postfix(meta_loss=f"{history['meta_loss'][-1]:.4g}",
                            final=f"{history['final_loss'][-1]:.4g}")
            if checkpoint is not None and ((it + 1) % checkpoint_every == 0 or it + 1 == iterations):
                save(it + 1)
            continue
        t_start = time.perf_counter()
        problem = family.sample(meta_batch, derive_seed(seed, it), device, dtype)
        theta = problem.init_theta()
        state = net.init_state(problem.numel, device=device, dtype=state_dtype or dtype)
        total, skipped, last = 0.0, 0, None
        for t0 in range(0, horizon, unroll):
            steps = min(unroll, horizon - t0)
            meta_loss, theta, state, last = unroll_fn(net, problem, theta, state, t0, steps)
            value = float(meta_loss.detach())
            opt.zero_grad(set_to_none=True)
            if math.isfinite(value):
                meta_loss.backward()
                opt.step()
            else:
                skipped += 1
            total += value
            theta, state = theta.detach(), state.detach()
            if not torch.isfinite(theta).all():  # diverged: the rest of the horizon is noise
                skipped += math.ceil((horizon - t0 - steps) / unroll)
                break
        history["iteration"].append(it)
        history["meta_loss"].append(total / horizon)
        history["final_loss"].append(float(last.detach().mean()))
        history["seconds"].append(time.perf_counter() - t_start)
        history["skipped"].append(skipped)
        bar.set_postfix(meta_loss=f"{total / horizon:.4g}", final=f"{history['final_loss'][-1]:.4g}")
        if checkpoint is not None and ((it + 1) % checkpoint_every == 0 or it + 1 == iterations):
            save(it + 1)
    bar.close()
    return history


unroll_fn = unroll  # meta_train's `unroll` argument shadows the function inside it


def _distributed_iteration(net, opt, family, it, seed, meta_batch, lo, hi, unroll_len, horizon,
                           device, dtype, group, state_dtype=None) -> Dict[str, float]:
    """One meta-iteration of meta_train on this rank's problems ``lo..hi-1`` of the
    iteration's meta-batch, with one bucketed all-reduce per unroll (the net's gradients, the
    meta-loss, the final loss and a divergence flag, weighted by the problem counts)."""
    from pymeta.distributed import all_reduce_gradients
    t_start = time.perf_counter()
    problem = family.sample(meta_batch, derive_seed(seed, it), device, dtype).subset(lo, hi)
    count = hi - lo
    theta = problem.init_theta()
    state = net.init_state(problem.numel, device=device, dtype=state_dtype or dtype)
    total, skipped, final = 0.0, 0, float("nan")
    for t0 in range(0, horizon, unroll_len):
        steps = min(unroll_len, horizon - t0)
        meta_loss, theta, state, last = unroll_fn(net, problem, theta, state, t0, steps)
        local = float(meta_loss.detach())
        theta, state = theta.detach(), state.detach()
        diverged = 0.0 if bool(torch.isfinite(theta).all()) else 1.0
        opt.zero_grad(set_to_none=True)
        if math.isfinite(local):
            meta_loss.backward()
        _, (value, final, div) = all_reduce_gradients(
            list(net.parameters()), count, group,
            extras=[local, float(last.detach().mean()), diverged])
        if math.isfinite(value):
            opt.step()
        else:
            skipped += 1
        total += value
        if div != 0.0:  # some rank diverged: every rank stops here, as one process would
            skipped += math.ceil((horizon - t0 - steps) / unroll_len)
            break
    return {"iteration": it, "meta_loss": total / horizon, "final_loss": final,
            "seconds": time.perf_counter() - t_start, "skipped": skipped}


# ---- running optimizers on a batch of problems -------------------------------------------------

def run_learned(net: LSTMOptimizerNet, problem: OptimizeeProblem, steps: int) -> Tensor:
    """Runs the learned optimizer for ``steps`` steps (no meta-gradient); returns the
    per-problem losses ``[steps + 1, B]`` at steps 0..steps, and leaves the final flat
    parameters in ``problem.last_theta``."""
    if not isinstance(net, LSTMOptimizerNet):
        raise TypeError(f"pymeta.run_learned: net must be an LSTMOptimizerNet, not "
                        f"{type(net).__name__}")
    _check_problem(problem, "run_learned")
    steps = _check_steps(steps, "run_learned")
    if net.out.weight.is_meta:  # its weights are copied to the problem's device below
        raise ValueError("pymeta.run_learned: net's weights are on the meta device (they hold "
                         "no values)")
    theta = problem.init_theta()
    state = net.init_state(problem.numel, device=theta.device, dtype=theta.dtype)
    weights = [w.detach().to(theta.device, theta.dtype) for w in net.weights()]
    from pymeta import ops
    out = []
    for t in range(steps + 1):
        if t == steps:
            with torch.no_grad():
                out.append(problem.losses(theta, t))
            break
        loss, g = problem.losses_and_grad(theta, t)
        out.append(loss)
        with torch.no_grad():
            update, state = ops.lstm_optimizer_step(g, state, *weights, net.preprocessing,
                                                    net.p, net.out_scale)
            theta = theta + update
    problem.last_theta = theta.detach()
    return torch.stack(out)


def run_torch_optimizer(problem: OptimizeeProblem, steps: int,
                        make_optimizer: Callable[[List[Tensor]], torch.optim.Optimizer]) -> Tensor:
    """Runs a torch optimizer, built by ``make_optimizer([theta])``, on the flat parameters of
    every problem at once (the loss is the sum of the problems' losses, so each problem
    gets its own gradient; coordinatewise optimizers then run every problem independently).
    Returns the per-problem losses ``[steps + 1, B]`` at steps 0..steps; the final flat
    parameters are left in ``problem.last_theta``."""
    _check_problem(problem, "run_torch_optimizer")
    steps = _check_steps(steps, "run_torch_optimizer")
    if not callable(make_optimizer):
        raise TypeError(f"pymeta.run_torch_optimizer: make_optimizer must be callable (params -> "
                        f"optimizer), not {type(make_optimizer).__name__}")
    theta = problem.init_theta().requires_grad_()
    opt = make_optimizer([theta])
    if not (callable(getattr(opt, "step", None)) and callable(getattr(opt, "zero_grad", None))):
        raise TypeError(f"pymeta.run_torch_optimizer: make_optimizer returned a "
                        f"{type(opt).__name__}, not an optimizer (with step and zero_grad)")
    out = []
    for t in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = problem.losses(theta, t)
            out.append(loss.detach())
            if t == steps:
                break
            loss.sum().backward()
        opt.step()
    problem.last_theta = theta.detach()
    return torch.stack(out)
