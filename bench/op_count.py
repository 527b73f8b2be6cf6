"""Kernel-like ops a training step and a sampling step dispatch, counted on the CPU.

On a GPU a LoRA step is launch-bound (H100: 191 ms wall for ~94 ms of kernels), so the number of
kernels a step dispatches is the lever, and it is the same on any device for the same code path and
dtypes. Counted below autograd with a TorchDispatchMode (bench/opcount_mode.py: categories).

training   the worker's step exactly as train/loop.py runs it: build_engine (the DeepSpeed engine,
           bf16, the configured ZeRO stage, AdamW fused as with --use_gpu), then per micro-step
           engine(batch) [forward], engine.backward [backward], engine.step [optimizer],
           LogWindow.add [logging]; cached fp16 moments as Ray Data hands them over. One warm-up
           step first (DeepSpeed's lazy set-up), then one counted step.
sampling   one denoising step as the generation actor runs it on a GPU: load, merge, prepare_for_sampling
           (bf16 weights; models/inference.py), then sampling.denoise_step (both UNets and the scheduler step).
           Where the GPU path samples under torch.autocast("cuda"), the counter applies CUDA autocast's
           casting rules itself (bench/opcount_mode.py): CPU autocast's lists differ (CUDA runs the norms in
           fp32), so counting under CPU autocast would not be the GPU's op graph. Where the GPU path uses
           no autocast, the CPU dispatches the very ops it does. The scheduler's host-side scalar math
           (a few 0-d CPU ops) is counted although on a GPU it launches nothing.

    python bench/op_count.py                      # sd15-random, batch 2, 64 px (counts do not depend on it)
    python bench/op_count.py --preset tiny --json counts.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from opcount_mode import CudaAutocastRules, OpCounter  # noqa: E402

from cffa_ray.models.build import build_model  # noqa: E402
from cffa_ray.models.inference import prepare_for_sampling  # noqa: E402
from cffa_ray.sampling import denoise_step, gpu_autocast_dtype, make_scheduler, pair_noise  # noqa: E402
from cffa_ray.train.config import TrainConfig  # noqa: E402

TARGETS = {"training": 5000, "sampling": 1600}


def _init_single_process_group() -> None:
    """A one-rank gloo group, as a Ray Train worker has (DeepSpeed needs one)."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)


def train_config(preset: str, batch_size: int, resolution: int, zero_stage: int = 2) -> TrainConfig:
    return TrainConfig(model="dual_unet", preset=preset, resolution=resolution, batch_size=batch_size,
                       data="unused", output_dir=tempfile.gettempdir(), mixed_precision="bf16",
                       zero_stage=zero_stage)


def cached_batch(model, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Cached fp16 VAE moments, as the worker gets them from Ray Data."""
    g = torch.Generator().manual_seed(0)
    pixels = {k: torch.randint(0, 256, (cfg.batch_size, 3, cfg.resolution, cfg.resolution), generator=g,
                               dtype=torch.uint8) for k in ("cf", "fa")}
    with torch.no_grad():
        return {k: v.half() for k, v in type(model).cache_moments(model.vae, pixels["cf"], pixels["fa"]).items()}


def count_training(cfg: TrainConfig) -> OpCounter:
    """Ops of one optimizer step of the worker (train/loop.py's step phase)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported (by build_engine)
    from cffa_ray.train.engine import build_engine  # imports deepspeed lazily
    from cffa_ray.train.loop import LogWindow

    _init_single_process_group()
    engine, optimizer, _ = build_engine(cfg, 1, 0, fused=True)  # fused: as with --use_gpu
    batch = cached_batch(engine.module, cfg)
    device = torch.device(engine.device)
    window = LogWindow(device, 0)
    counter = OpCounter()
    engine.train()
    for counted in (False, True):  # a warm-up step (DeepSpeed's lazy state), then the counted one
        with counter if counted else contextlib.nullcontext():
            for _ in range(cfg.gradient_accumulation_steps):
                counter.phase = "forward"
                out = engine(batch)
                counter.phase = "backward"
                engine.backward(out["loss"])
                counter.phase = "optimizer"
                engine.step()
                counter.phase = "logging"
                window.add(out, 1, 1.0 / cfg.gradient_accumulation_steps)
    return counter


def count_sampling(preset: str, batch_size: int, resolution: int, mixed_precision: str = "bf16",
                   scheduler: str = "ddim", steps: int = 50) -> OpCounter:
    """Ops of one denoising step of the generation actor (both UNets and the scheduler step)."""
    torch.manual_seed(0)
    model = build_model(train_config(preset, batch_size, resolution), share_base=False)
    sched = make_scheduler(scheduler, model.scheduler_config)
    sched.set_timesteps(steps)
    state = model.noise_to_state(pair_noise(model, resolution, 0, list(range(batch_size))))
    t = sched.timesteps[steps // 2]
    counter = OpCounter()
    prepare_for_sampling(model, "cpu", mixed_precision)
    dtype = gpu_autocast_dtype(model, mixed_precision)  # what torch.autocast("cuda") the GPU path uses
    with torch.no_grad(), CudaAutocastRules(dtype) if dtype else contextlib.nullcontext():
        counter.phase = "unets"
        with counter:
            eps = model.predict_noise(sched.scale_model_input(state, t), t).float()
    eps = torch.zeros(state.shape)  # the scheduler's step on real tensors (see the module docstring)
    counter.phase = "scheduler"
    with counter, torch.no_grad():
        denoise_step(None, sched, state, t, int(t), eps=eps)
    return counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd15-random")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--only", choices=("training", "sampling"))
    p.add_argument("--json", help="also write the counts here")
    args = p.parse_args()
    results = {}
    t0 = time.time()
    if args.only != "sampling":
        cfg = train_config(args.preset, args.batch_size, args.resolution, args.zero_stage)
        counter = count_training(cfg)
        print(counter.table(f"training step, the worker's form (DeepSpeed bf16, ZeRO-{args.zero_stage}, fused AdamW), "
                            f"{args.preset}, batch {args.batch_size}"))
        results["training"] = counter
    if args.only != "training":
        counter = count_sampling(args.preset, args.batch_size, args.resolution)
        print(counter.table(f"sampling step, generation actor on GPU (prepare_for_sampling bf16; CUDA autocast's "
                            f"rules where the GPU path autocasts), {args.preset}, batch {args.batch_size}"))
        results["sampling"] = counter
    print(f"\n{'step':10s} {'kernel-like':>12s} {'target':>8s}")
    for name, counter in results.items():
        n = counter.total()["kernel"]
        print(f"{name:10s} {n:12,d} {TARGETS[name]:8,d}  {'ok' if n <= TARGETS[name] else 'MISSES'}")
    print(f"({time.time() - t0:.0f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps({k: {"phases": {ph: dict(c) for ph, c in v.counts.items()},
                                                   "total": dict(v.total()),
                                                   "dtype_sources": dict(v.dtype_sources.most_common(20))}
                                               for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
