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

import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from pymeta._io import FileFormatError, atomic_save, safe_load
from pymeta.lstm_optimizer import LSTMOptimizerNet
from pymeta.tasks import OptimizeeProblem, derive_seed

__all__ = ["meta_train", "unroll", "run_learned", "run_torch_optimizer"]

CKPT_FORMAT = "pymeta.meta_train"


def unroll(net: LSTMOptimizerNet, problem: OptimizeeProblem, theta: Tensor, state: Tensor,
           t0: int, steps: int, on_grad: Optional[Callable[[Tensor], None]] = None):
    """``steps`` learned-optimizer steps from step ``t0``, differentiable w.r.t. the net.

    Args:
        theta: flat parameters ``[N]`` at step t0 (treated as a constant: detached here).
        state: the LSTM state ``[4, H, N]`` at step t0 (detached here).
        on_grad: called with every gradient fed to the net (tests check it is detached).

    Returns ``(meta_loss, theta, state, last_losses)``: the meta-loss
    ``sum_{t=t0+1}^{t0+steps} mean_b f_b(theta_t)`` (a graph into the net's weights), theta and
    the state after the last step (still attached), and the per-problem losses ``[B]`` at
    the last step.
    """
    theta = theta.detach().requires_grad_()
    state = state.detach()
    loss = problem.losses(theta, t0)
    meta_loss = theta.new_zeros(())
    for j in range(steps):
        # First-order: the gradient is a constant to the net (no create_graph). The graph of
        # `loss` is kept (retain_graph) because the meta-loss backpropagates through it.
        (g,) = torch.autograd.grad(loss.sum(), theta, retain_graph=j > 0)
        if on_grad is not None:
            on_grad(g)
        update, state = net(g, state)
        theta = theta + update
        loss = problem.losses(theta, t0 + j + 1)
        meta_loss = meta_loss + loss.mean()
    return meta_loss, theta, state, loss


def _config(net, family, unroll_, horizon, meta_lr, meta_batch, seed, dtype,
            state_dtype) -> Dict[str, Any]:
    cfg = {"family": repr(family), "net": net.config(), "unroll": int(unroll_),
           "horizon": int(horizon), "meta_lr": float(meta_lr), "meta_batch": int(meta_batch),
           "seed": int(seed), "dtype": str(dtype)}
    if state_dtype is not None:  # absent by default: checkpoints of earlier versions resume
        cfg["state_dtype"] = str(state_dtype)
    return cfg


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
    """
    if not isinstance(net, LSTMOptimizerNet):
        raise TypeError(f"pymeta.meta_train: net must be an LSTMOptimizerNet, not {type(net).__name__}")
    for name, v in (("iterations", iterations), ("unroll", unroll), ("horizon", horizon),
                    ("meta_batch", meta_batch), ("checkpoint_every", checkpoint_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "iterations" else 1):
            raise ValueError(f"pymeta.meta_train: {name} must be a positive int, got {v!r}")
    if state_dtype == dtype:
        state_dtype = None  # the default, spelled out
    if state_dtype is not None and not (state_dtype == torch.bfloat16 and dtype == torch.float32):
        raise ValueError(f"pymeta.meta_train: state_dtype must be None (dtype), dtype itself, or "
                         f"torch.bfloat16 with dtype=torch.float32; got state_dtype="
                         f"{state_dtype}, dtype={dtype}")
    device = torch.device(device) if device is not None else net.out.weight.device
    net.to(device=device, dtype=dtype)
    opt = torch.optim.Adam(net.parameters(), lr=meta_lr)
    config = _config(net, family, unroll, horizon, meta_lr, meta_batch, seed, dtype, state_dtype)
    history: Dict[str, List[float]] = {"iteration": [], "meta_loss": [], "final_loss": [],
                                       "seconds": [], "skipped": []}
    start = 0
    group, rank, world = None, 0, 1
    dist_on = distributed is not False and distributed is not None
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
    if ck is not None:
        if ck.get("config") != config:
            saved = ck.get("config") or {}
            diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
            raise ValueError(f"pymeta.meta_train: the checkpoint {os.fspath(checkpoint)!r} is of "
                             f"another run; it differs in (checkpoint, now): {diff}")
        try:
            net._load_checked(ck["net"], os.fspath(checkpoint))
            opt.load_state_dict(ck["adam"])
            history = {k: list(v) for k, v in ck["history"].items()}
            start = int(ck["iteration"])
        except (KeyError, TypeError) as e:
            raise FileFormatError(f"pymeta: the checkpoint {os.fspath(checkpoint)!r} is "
                                  f"incomplete: {e!r}") from e

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
    theta = problem.init_theta()
    state = net.init_state(problem.numel, device=theta.device, dtype=theta.dtype)
    weights = [w.detach().to(theta.device, theta.dtype) for w in net.weights()]
    from pymeta import ops
    out = []
    for t in range(steps + 1):
        theta = theta.detach().requires_grad_()
        with torch.enable_grad():
            loss = problem.losses(theta, t)
            out.append(loss.detach())
            if t == steps:
                break
            (g,) = torch.autograd.grad(loss.sum(), theta)
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
    theta = problem.init_theta().requires_grad_()
    opt = make_optimizer([theta])
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
