"""What every Ray Train worker runs: one loop over optimizer steps, a phase per stage.

    set up      the model in a DeepSpeed engine, resumed from Ray Train's last checkpoint
    step        micro-steps of forward (the model's losses), backward and optimizer step
    stop?       a non-finite loss on any rank ends the run before anything is written from it
    log         training_log.txt and one console line, every --log_every steps
    validate    validation_log.txt, and best_checkpoint/ when the validation loss improves
    preview     step_XXXXXX_random_pairs/, every --sample_every steps
    checkpoint  latest_checkpoints/, and every rank's DeepSpeed state reported to Ray Train

All ranks take part in every phase (with ZeRO-3 a forward pass needs everyone, and exports gather
the weights); only rank 0 writes files, behind `is_rank0`.
"""
from __future__ import annotations

import math
import time

import ray.train
import torch

from cffa_ray.faults import maybe_fail
from cffa_ray.flags import from_dict
from cffa_ray.paths import join_path
from cffa_ray.quiet import quiet_ray
from cffa_ray.run_layout import RUN_RECORD, TRAINING_LOG, VALIDATION_LOG, log_line
from cffa_ray.shared_storage import unseen_record
from cffa_ray.train.config import TrainConfig
from cffa_ray.train.engine import build_engine, export_lora, report_checkpoint, resume
from cffa_ray.train.run_folder import RunFolder
from cffa_ray.train.stop import (
    STOPPED,
    DiskGuard,
    agreed_error,
    agreed_min,
    is_check_step,
    nonfinite_message,
)
from cffa_ray.train.validation import sample_previews, validate


class LogWindow:
    """The loss terms of the steps since the last log line, summed on the device (no host sync per
    step), and the first step whose loss was not finite (kept across windows)."""

    def __init__(self, device: torch.device, step: int):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.start_step, self.t0 = 0, step, time.time()
        self.first_bad = torch.tensor(math.inf, dtype=torch.float64, device=device)

    def add(self, out: dict[str, torch.Tensor], step: int, weight: float) -> None:
        """Add one micro-step's loss terms (times `weight`) to the window; `step` is the step being trained."""
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float() * weight
        bad = ~torch.isfinite(out["loss"].detach())
        self.first_bad = torch.where(bad, self.first_bad.clamp(max=step), self.first_bad)

    def close(self, step: int) -> tuple[dict[str, float], float]:
        """The window's mean loss terms and its rate in steps/s (one host sync); starts a new window."""
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in keys]).div(max(self.steps, 1)).tolist() if keys else []
        rate = (step - self.start_step) / max(time.time() - self.t0, 1e-9)
        self.sums, self.steps, self.start_step, self.t0 = {}, 0, step, time.time()
        return dict(zip(keys, means)), rate


def _endless_batches(shard, batch_size: int, device, shuffle_buffer: int):
    """Pass after pass of training batches on `device` (the dataset's columns: cached moments or uint8
    pixels, see train/datasets.py); every rank sees equal counts. Ray Data prefetches, collates and
    copies to the device (pinned, non-blocking) in a background thread while the step runs."""
    while True:
        yield from shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device, prefetch_batches=2,
                                            pin_memory=device.type == "cuda",
                                            local_shuffle_buffer_size=shuffle_buffer or None)


def train_loop_per_worker(config: dict) -> dict:
    """Train on this worker's shard until --max_steps.

    Args:
        config: {"cfg": TrainConfig as a dict, "shuffle_buffer": rows mixed locally (0: pre-shuffled)}.
    Returns:
        {"step": N} at the end, or {STOPPED: why} when the run must stop (train/stop.py).
    """
    # ---- set up: the engine, resumed where Ray Train's last checkpoint left off
    cfg = from_dict(TrainConfig, config["cfg"])
    quiet_ray()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    is_rank0 = rank == 0
    # every rank writes its checkpoint shard into the run folder: it must be the one the driver sees
    if error := agreed_error(unseen_record(join_path(cfg.run_dir, RUN_RECORD), "--output_dir", cfg.output_dir)):
        return {STOPPED: error}
    built = build_engine(cfg, world, rank)
    if isinstance(built, str):
        return {STOPPED: built}
    engine, optimizer, n_trainable = built
    device = torch.device(engine.device)  # where DeepSpeed put this rank's module
    run = DiskGuard(RunFolder(cfg.run_dir))  # a full disk: one agreed stop below, not a retried crash
    step, best_val = resume(engine, optimizer, cfg, run)
    start_step = step
    torch.manual_seed(cfg.seed * 100003 + rank * 7919 + step)  # fresh noise per rank, and after a resume
    record = {**cfg.model_record(), "trained_steps": step}
    if is_rank0:
        run.rewind(step)
        pairs_per_step = cfg.batch_size * world * cfg.gradient_accumulation_steps
        print(f"[cffa] {engine.module.name}: {n_trainable:,} trainable LoRA parameters, {world} worker(s) x "
              f"{cfg.batch_size} pairs x {cfg.gradient_accumulation_steps} accumulation = {pairs_per_step} "
              f"pairs/step, ZeRO-{cfg.zero_stage}, {'resuming at step ' + str(step) if step else 'starting'} "
              f"-> {cfg.max_steps}", flush=True)

    # ---- data: this rank's shard of the training pairs; the (small) validation set held in memory
    batches = _endless_batches(ray.train.get_dataset_shard("train"), cfg.batch_size, device,
                               config.get("shuffle_buffer", 0))
    val_batches = list(ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=cfg.batch_size,
                                                                             device="cpu"))
    if step == 0 and cfg.num_sample_pairs:  # the untrained base's pairs: the reference later ones improve on
        _preview(engine, cfg, run, 0, is_rank0)
    window = LogWindow(device, step)

    while step < cfg.max_steps:
        # ---- step: forward (the model's losses), backward, optimizer, per micro-step
        maybe_fail("train_step", step + 1, rank)
        engine.train()
        for _ in range(cfg.gradient_accumulation_steps):
            out = engine(next(batches))
            engine.backward(out["loss"])
            engine.step()
            window.add(out, step + 1, 1.0 / cfg.gradient_accumulation_steps)
        window.steps += 1
        step += 1
        record["trained_steps"] = step

        # ---- stop: before anything is logged, exported or checkpointed from a diverged model
        if is_check_step(step, cfg):
            first_bad = agreed_min(float(window.first_bad), device)  # the first bad step on any rank
            if math.isfinite(first_bad):
                return {STOPPED: nonfinite_message(int(first_bad), start_step, cfg)}

        # ---- log
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            _log(window, optimizer, cfg, run, step, world, device, is_rank0)

        # ---- validate, and export best_checkpoint/ when it improves
        if step % cfg.val_every == 0 or step == cfg.max_steps:
            val = validate(engine, val_batches, cfg, device)
            if not math.isfinite(val["loss"]):  # the same on every rank: validate all-reduces it
                return {STOPPED: nonfinite_message(step, start_step, cfg, "validation loss")}
            if is_rank0:
                run.append(VALIDATION_LOG, log_line(step, {f"val_{k}": v for k, v in val.items()}))
            if val["loss"] < best_val:  # the same number on every rank (validate all-reduces it)
                best_val = val["loss"]
                export_lora(engine, is_rank0, lambda m, s: run.export_best(m, {**record, "val_loss": best_val}, s))

        # ---- preview pairs
        if cfg.num_sample_pairs and step % cfg.sample_every == 0:
            _preview(engine, cfg, run, step, is_rank0)

        # ---- checkpoint: latest_checkpoints/ and the resumable DeepSpeed state of every rank
        checkpoint = step % cfg.checkpoint_interval == 0 or step == cfg.max_steps
        if checkpoint:
            export_lora(engine, is_rank0, lambda m, s: run.export_latest(m, record, step, cfg.keep_latest, s))
        if is_check_step(step, cfg) and (error := agreed_error(run.error)):  # rank 0's writes met a full disk
            return {STOPPED: error}
        if checkpoint:
            report_checkpoint(engine, step, best_val)
    return {"step": step}


def _log(window: LogWindow, optimizer, cfg: TrainConfig, run: RunFolder, step: int, world: int, device,
         is_rank0: bool) -> None:
    """One line in training_log.txt and on the console: the window's mean losses, rate and memory."""
    values, rate = window.close(step)
    values.update(lr=optimizer.param_groups[0]["lr"], steps_per_s=rate,
                  pairs_per_s=rate * cfg.batch_size * world * cfg.gradient_accumulation_steps)
    if device.type == "cuda":
        values["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if is_rank0:
        run.append(TRAINING_LOG, log_line(step, values))
        eta = (cfg.max_steps - step) / max(rate, 1e-9)
        print(f"[cffa] step {step}/{cfg.max_steps} loss {values['loss']:.4f} {rate:.2f} steps/s eta {eta:.0f}s",
              flush=True)


def _preview(engine, cfg: TrainConfig, run: RunFolder, step: int, is_rank0: bool) -> None:
    """step_XXXXXX_random_pairs/, sampled on every rank: ZeRO-3 needs all of them in each forward, and below
    it the others would wait out rank 0's preview inside the next step's all-reduce (with a real model on CPU,
    near the process group's timeout)."""
    cf, fa = sample_previews(engine.module, cfg)
    if is_rank0:
        run.write_samples(step, cf, fa)
