"""DeepSpeed on a Ray Train worker: the engine around the model, the resumable state each rank
reports to Ray Train, and the LoRA weights exported from DeepSpeed's fp32 masters.

deepspeed is imported inside `build_engine` and `lora_states`, in the workers only: it must come
after DS_ACCELERATOR is set (the workers' runtime env sets it on CPU clusters), and the driver,
which imports this module to hand the training function to Ray, never needs it (seconds saved).
"""
from __future__ import annotations

import math
import tempfile

import ray.train
import torch
import torch.distributed as dist

from cffa_ray.internals import skip_deepspeed_shm_op
from cffa_ray.models.build import build_model
from cffa_ray.train.config import TrainConfig
from cffa_ray.train.run_folder import RunFolder
from cffa_ray.train.stop import agreed_error, agreed_min, model_error

DS_TAG = "deepspeed"  # the tag of the DeepSpeed state inside each Ray Train checkpoint


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config of a run: batch sizes, ZeRO stage, mixed precision, clipping."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": cfg.use_gpu, "contiguous_gradients": True},
        # bf16 has fp32's range: no loss scale to adjust, so DeepSpeed's per-tensor overflow walk over the
        # LoRA gradients (~5,000 ops a step at SD1.5, BENCHMARKS.md) buys nothing; a non-finite loss still
        # stops the run before anything is written from it (train/stop.py).
        "bf16": {"enabled": cfg.mixed_precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": cfg.mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # The LoRA parameters are few; torch's AdamW needs no compiled DeepSpeed op (CPU or GPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def build_engine(cfg: TrainConfig, world_size: int, rank: int, fused: bool | None = None):
    """The model with fresh LoRA adapters inside a DeepSpeed engine, the same on every rank.

    Args:
        fused: AdamW's fused kernel (default: with --use_gpu; bench/op_count.py counts the GPU form on CPU).

    Returns:
        (engine, optimizer, trainable parameter count), or the reason the run must stop (str) when
        the model cannot be built on some rank (all ranks agree; see train/stop.py).
    """
    import deepspeed  # after DS_ACCELERATOR (see the module docstring)

    if not cfg.use_gpu:
        skip_deepspeed_shm_op()  # no C++ build of a CPU all-reduce at start-up (internals.py)
    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    model, error = None, ""
    try:
        model = build_model(cfg, **cfg.loss_settings())
    except Exception as e:  # a retry would meet it again: stop the run
        error = model_error(e, rank)
    if error := agreed_error(error):
        return error
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)  # before ZeRO-3 partitions them away
    # one fused kernel for all LoRA tensors on GPU instead of a loop of small ones
    fused = fused if fused is not None else (cfg.use_gpu or None)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2, fused=fused)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(cfg, world_size))
    return engine, optimizer, n_trainable


def resume(engine, optimizer, cfg: TrainConfig, run: RunFolder) -> tuple[int, float]:
    """Load Ray Train's latest checkpoint into the engine, if there is one.

    Returns:
        (step to continue from, best validation loss so far), the same on every rank (0, inf: a fresh run).
    """
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, math.inf
    with checkpoint.as_directory() as ckpt_dir:
        _, client = engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=False)
    for group in optimizer.param_groups:  # this run's --lr, not the saved one (e.g. lowered after a NaN)
        group["lr"] = cfg.lr
    # best_checkpoint/ may be newer than the resumed state when --checkpoint_every > --val_every
    best_val = min(client["best_val"], run.best_val_loss())
    # ranks that read another best_checkpoint would take other decisions and deadlock in a collective
    return client["step"], agreed_min(best_val, torch.device(engine.device))


def lora_states(engine) -> dict[str, dict[str, torch.Tensor]]:
    """{adapter folder: {parameter name: fp32 CPU tensor}} from DeepSpeed's fp32 master weights.

    The module itself holds bf16/fp16 copies under mixed precision (and only shards under ZeRO-3);
    the optimizer's fp32 masters are the trained values. Collective: every rank calls it.
    """
    from deepspeed.utils import safe_get_full_fp32_param  # after DS_ACCELERATOR (module docstring)

    states = {}
    for folder, peft_model in engine.module.adapters().items():
        state = {}
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)
                state[name] = (full if full is not None else p.detach()).float().cpu()
        states[folder] = state
    return states


def export_lora(engine, is_rank0: bool, write) -> None:
    """Run `write(model, lora_states)` on rank 0 with the fp32 LoRA weights. Collective: all ranks call."""
    states = lora_states(engine)
    if is_rank0:
        write(engine.module, states)
    dist.barrier()


def report_checkpoint(engine, step: int, best_val: float) -> None:
    """Every rank saves its DeepSpeed shard and reports it; Ray Train merges them into one checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": step, "best_val": best_val},
                               exclude_frozen_parameters=True)
        ray.train.report({"step": step, "best_val_loss": best_val},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")
