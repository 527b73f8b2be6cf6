"""Errors inside the training workers that no retry can heal end the run at once, in one line.

Ray Train restarts the worker group after any worker exception (--max_failures times): right for a
lost node, wrong for a base model that will not load or a loss that has diverged, which come back
on every attempt. For those, the workers agree (one collective, so no rank is left waiting in
another) that the run must stop, and return normally with the reason; the driver raises it as
RunStopped. (Validation losses need no extra collective: validate() already all-reduces them.)
Failures on some ranks only (a lost node, out of memory) still raise and are retried.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist

from cffa_ray.errors import disk_full

STOPPED = "stopped"  # key of the dict rank 0 returns when the run stopped early


def agreed_error(local: str) -> str:
    """The first rank's error message ("" when no rank has one), the same on every rank. Collective."""
    if not dist.is_initialized():
        return local
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, local)
    return next((m for m in messages if m), "")


def model_error(e: BaseException, rank: int) -> str:
    text = " ".join(str(e).split()).split(". ")[0][:200] or type(e).__name__  # its first sentence
    return (f"the model could not be built on worker {rank}: {type(e).__name__}: {text}; "
            "check --base_model (it must be readable on every node)")


def is_check_step(step: int, cfg) -> bool:
    """Steps that log, validate, sample or checkpoint: the loss is checked before any of them."""
    return any(step % every == 0 for every in (cfg.log_every, cfg.val_every, cfg.sample_every,
                                               cfg.checkpoint_interval)) or step == cfg.max_steps


def nonfinite_message(bad_step: int, start_step: int, cfg, what: str = "loss") -> str:
    """Why training stops at `bad_step`, the likely cause, and what is kept.

    Checkpoints are written only after these checks pass at their step (and after validation, at
    the default --checkpoint_every), so the last one written is the one a rerun resumes from.
    """
    if cfg.mixed_precision == "fp16":
        cause = "likely an fp16 overflow: use --mixed_precision bf16 (or a lower --lr)"
    else:
        cause = f"likely --lr {cfg.lr:g} is too high: try a lower one"
    last = max((bad_step - 1) // cfg.checkpoint_interval * cfg.checkpoint_interval, start_step)
    if last > 0:
        kept = f"the last checkpoint (step {last}) is kept, and rerunning with the same --name resumes from it"
    else:
        kept = "no checkpoint was written before it"
    return f"training stopped: the {what} became NaN or infinite at step {bad_step}, {cause}; {kept}"


def agreed_min(value: float, device) -> float:
    """The smallest of every rank's `value`, on every rank (decisions that gate collectives must agree)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


class DiskGuard:
    """Rank 0's RunFolder, whose writes on a full disk (or quota) are remembered instead of raised: a
    retry would meet the same full disk, so the ranks agree to stop (`agreed_error(guard.error)` at
    the next check step) with one line naming the folder. Other errors pass through."""

    def __init__(self, run):
        self._run = run
        self.error = ""

    def __getattr__(self, name: str):
        attr = getattr(self._run, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def guarded(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                full = disk_full(e)
                if full is None:
                    raise
                self.error = self.error or no_space_message(self._run.root, full)
        return guarded


def no_space_message(run_dir: str, file: str) -> str:
    where = os.path.dirname(file) if file else run_dir
    return (f"training stopped: no space left on the device of {where}"
            + (f" (writing {os.path.basename(file)})" if file else "")
            + "; free some space there, then rerun with the same --name: it resumes from the last checkpoint")
