"""What every Ray Train worker runs: DeepSpeed engine, shard iteration, and the periodic phases.

Phases per optimizer step, in order: train micro-steps -> log -> validate (best_checkpoint) ->
sample pairs -> checkpoint (latest_checkpoints + DeepSpeed state reported to Ray Train).
All ranks take part in validation and sampling (with ZeRO-3 the weights are sharded, so a forward
pass needs everyone); only rank 0 writes files, behind `is_rank0`.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
import warnings

import torch

from cffa_ray.config import TrainConfig, from_dict

DS_TAG = "deepspeed"


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": cfg.use_gpu, "contiguous_gradients": True},
        "bf16": {"enabled": cfg.mixed_precision == "bf16"},
        "fp16": {"enabled": cfg.mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # The LoRA parameters are few; torch's AdamW needs no compiled DeepSpeed op (CPU or GPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def train_loop_per_worker(config: dict) -> dict:
    """Train; returns {"step": N} at the end, or {STOPPED: why} when the run must stop (train/stop.py)."""
    cfg = from_dict(TrainConfig, config["cfg"])
    if not cfg.use_gpu:  # also in the workers' runtime env; must precede the first deepspeed import
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import ray.train.torch

    from cffa_ray.models import build_model
    from cffa_ray.train.run_folder import RunFolder
    from cffa_ray.train.stop import STOPPED, agreed_error, is_check_step, model_error, nonfinite_message

    quiet_ray()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    is_rank0 = rank == 0

    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    model, error = None, ""
    try:
        model = build_model(cfg, **cfg.loss_settings())
    except Exception as e:  # a retry would meet it again: stop the run (see train/stop.py)
        error = model_error(e, rank)
    if error := agreed_error(error):
        return {STOPPED: error}
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)  # before ZeRO-3 partitions them away
    # one fused kernel for all LoRA tensors on GPU instead of a loop of small ones
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2, fused=cfg.use_gpu or None)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(cfg, world))
    device = torch.device(engine.device)  # where DeepSpeed put this rank's module
    record = {**cfg.model_record(), "trained_steps": 0}
    run = RunFolder(cfg.run_dir)

    step, best_val, bad_step = 0, math.inf, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            _, client = engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=False)
        for group in optimizer.param_groups:  # this run's --lr, not the saved one (e.g. lowered after a NaN)
            group["lr"] = cfg.lr
        # best_checkpoint/ may be newer than the resumed state when --checkpoint_every > --val_every
        step, best_val = client["step"], min(client["best_val"], run.best_val_loss())
        best_val = agreed_min(best_val, device)  # ranks that read another best_checkpoint would deadlock
    torch.manual_seed(cfg.seed * 100003 + rank * 7919 + step)  # fresh noise per rank, and after a resume

    if is_rank0:
        run.rewind(step)
        print(f"[cffa] {model.name}: {n_trainable:,} trainable LoRA parameters, "
              f"{world} worker(s) x {cfg.batch_size} pairs x {cfg.gradient_accumulation_steps} accumulation "
              f"= {cfg.batch_size * world * cfg.gradient_accumulation_steps} pairs/step, ZeRO-{cfg.zero_stage}, "
              f"{'resuming at step ' + str(step) if step else 'starting'} -> {cfg.max_steps}", flush=True)

    train_shard = ray.train.get_dataset_shard("train")
    # The validation set is small by design: hold it in memory instead of re-running Ray Data each time.
    val_batches = list(ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=cfg.batch_size, device="cpu"))
    batches = _endless_batches(train_shard, cfg.batch_size, device, config.get("shuffle_buffer", 0))
    if step == 0 and cfg.num_sample_pairs:  # the untrained base's pairs: the reference later ones improve on
        cf, fa = sample_previews(engine.module, cfg)
        if is_rank0:
            run.write_samples(0, cf, fa)
    window: dict[str, float] = {}
    t_window, step_window = time.time(), step  # rates are over the last log window (steady state)
    start_step = step

    while step < cfg.max_steps:
        engine.train()
        for _ in range(cfg.gradient_accumulation_steps):
            out = engine(next(batches))
            engine.backward(out["loss"])
            engine.step()
            for k, v in out.items():
                window[k] = window.get(k, 0.0) + float(v.detach()) / cfg.gradient_accumulation_steps
            if bad_step is None and not math.isfinite(window["loss"]):
                bad_step = step + 1
        step += 1
        window["n"] = window.get("n", 0) + 1
        # before anything is logged, exported or checkpointed from a diverged model; the first bad step on any rank
        if is_check_step(step, cfg) and math.isfinite(first_bad := agreed_min(bad_step or math.inf, device)):
            return {STOPPED: nonfinite_message(int(first_bad), start_step, cfg)}

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            n = window.pop("n")
            rate = (step - step_window) / max(time.time() - t_window, 1e-9)
            values = {k: v / n for k, v in window.items()}
            values.update(lr=optimizer.param_groups[0]["lr"], steps_per_s=rate,
                          pairs_per_s=rate * cfg.batch_size * world * cfg.gradient_accumulation_steps)
            if device.type == "cuda":
                values["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            window = {}
            if is_rank0:
                from cffa_ray.train.run_folder import TRAINING_LOG, log_line
                run.append(TRAINING_LOG, log_line(step, values))
                eta = (cfg.max_steps - step) / max(rate, 1e-9)
                print(f"[cffa] step {step}/{cfg.max_steps} loss {values['loss']:.4f} "
                      f"{rate:.2f} steps/s eta {eta:.0f}s", flush=True)
            t_window, step_window = time.time(), step

        record["trained_steps"] = step
        if step % cfg.val_every == 0 or step == cfg.max_steps:
            val = validate(engine, val_batches, cfg, device)
            if not math.isfinite(val["loss"]):  # the same on every rank: validate all-reduces it
                return {STOPPED: nonfinite_message(step, start_step, cfg, "validation loss")}
            if is_rank0:
                from cffa_ray.train.run_folder import VALIDATION_LOG, log_line
                run.append(VALIDATION_LOG, log_line(step, {f"val_{k}": v for k, v in val.items()}))
            if val["loss"] < best_val:  # the same number on every rank (validate all-reduces it)
                best_val = val["loss"]
                _export(engine, is_rank0, lambda m, s: run.export_best(m, {**record, "val_loss": best_val}, s))

        if cfg.num_sample_pairs and step % cfg.sample_every == 0:
            cf, fa = sample_previews(engine.module, cfg)
            if is_rank0:
                run.write_samples(step, cf, fa)

        if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps:
            _export(engine, is_rank0, lambda m, s: run.export_latest(m, record, step, cfg.keep_latest, s))
            _report(engine, step, best_val, cfg)
    return {"step": step}


def quiet_ray() -> None:
    """Ray Data's per-execution progress bars and Train's per-report lines drown the run's own log."""
    import logging

    import ray.data

    from cffa_ray.quiet import quiet_worker

    quiet_worker()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    from ray.train.v2._internal.execution import context as train_context

    # Train logs one INFO line per report under a logger named after its file.
    for name in ("ray.data", "ray.train", train_context.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)
    # DeepSpeed's ZeRO gathers call a torch collective deprecated in favour of another, once per step
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def _endless_batches(shard, batch_size: int, device, shuffle_buffer: int):
    """Pass after pass of training batches on `device` (the dataset's columns: cached moments or uint8
    pixels, see train/datasets.py); every rank sees equal counts. Ray Data prefetches, collates and
    copies to the device (pinned, non-blocking) in a background thread while the step runs."""
    while True:
        yield from shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device, prefetch_batches=2,
                                            pin_memory=device.type == "cuda",
                                            local_shuffle_buffer_size=shuffle_buffer or None)


VAL_TIMESTEPS = 8  # every validation pair is scored at this many timesteps spread over the schedule


@torch.no_grad()
def validate(engine, val_batches: list[dict], cfg: TrainConfig, device) -> dict[str, float]:
    """Mean losses over the whole validation set, each pair at a fixed grid of timesteps and with
    fixed noise, so steps compare fairly and one unlucky draw of t cannot pick best_checkpoint.

    Every rank runs every batch (ZeRO-3 needs all ranks in each forward), then the results are
    averaged across ranks, so all ranks hold the very same numbers and take the same decisions
    (GPUs of different types would otherwise differ in the last bits and disagree on "best").
    """
    import torch.distributed as dist

    from cffa_ray.diffusion import timestep_grid

    engine.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    totals: dict[str, torch.Tensor] = {}
    count = 0
    grid = timestep_grid(VAL_TIMESTEPS, len(engine.module.alphas_cumprod))
    for batch in val_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = next(iter(batch.values())).shape[0]
        for t in grid:
            out = engine.module(batch, generator=gen, t=torch.full((n,), t, dtype=torch.long, device=device))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v.detach().double() * n
            count += n
    engine.train()
    keys = sorted(totals)
    stacked = torch.stack([totals[k] for k in keys]).to(device) / max(count, 1)  # NCCL reduces on the GPU
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.cpu().tolist()))


def agreed_min(value: float, device) -> float:
    """The smallest of every rank's `value`, on every rank (decisions that gate collectives must agree)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


@torch.no_grad()
def sample_previews(model, cfg: TrainConfig):
    """The --num_sample_pairs preview pairs, same z0 every time -> uint8 [N, H, W, 3] (cf, fa)."""
    import numpy as np

    from cffa_ray.images import to_uint8
    from cffa_ray.sampling import pair_noise, sample_pairs

    model.eval()
    cfs, fas = [], []
    ids = list(range(cfg.num_sample_pairs))
    for start in range(0, len(ids), 8):
        noise = pair_noise(model, cfg.resolution, cfg.seed, ids[start:start + 8])
        cf, fa = sample_pairs(model, noise, steps=cfg.sample_steps, mixed_precision="no")
        cfs.append(to_uint8(cf))
        fas.append(to_uint8(fa))
    model.train()
    return np.concatenate(cfs), np.concatenate(fas)


def lora_states(engine) -> dict[str, dict[str, torch.Tensor]]:
    """{adapter folder: {parameter name: fp32 CPU tensor}} from DeepSpeed's fp32 master weights.

    The module itself holds bf16/fp16 copies under mixed precision (and only shards under ZeRO-3);
    the optimizer's fp32 masters are the trained values. Collective: every rank calls it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    states = {}
    for folder, peft_model in engine.module.adapters().items():
        state = {}
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)
                state[name] = (full if full is not None else p.detach()).float().cpu()
        states[folder] = state
    return states


def _export(engine, is_rank0: bool, write) -> None:
    """Run `write(model, lora_states)` on rank 0 with the fp32 LoRA weights (all ranks call)."""
    import torch.distributed as dist

    states = lora_states(engine)
    if is_rank0:
        write(engine.module, states)
    dist.barrier()


def _report(engine, step: int, best_val: float, cfg: TrainConfig) -> None:
    """Every rank saves its DeepSpeed shard and reports it; Ray Train merges them into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": step, "best_val": best_val},
                               exclude_frozen_parameters=True)
        ray.train.report({"step": step, "best_val_loss": best_val},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")
