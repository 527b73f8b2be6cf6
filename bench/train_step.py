"""Training throughput: the Ray Train + DeepSpeed path against a plain single-process PyTorch loop.

Same model (preset), resolution, batch and number of steps in both; the plain loop is the
baseline (ratio 1.0). Rates are steady-state: the first `--warmup` steps are not timed in the
baseline, and the Ray path's rate is read from its last training_log window. With a GPU and
`--preset sd15-random` (or sdxl-random) it also prints achieved TFLOP/s from torch's FLOP counter.

    python bench/train_step.py --preset tiny --resolution 64 --batch_size 2 --steps 40
    python bench/train_step.py --preset sd15-random --resolution 512 --use_gpu --mixed_precision bf16
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cffa_ray.config import PRESETS, TrainConfig  # noqa: E402
from cffa_ray.models import build_model  # noqa: E402
from cffa_ray.sampling import autocast  # noqa: E402

MODEL_OF_PRESET = {preset: model for model, presets in PRESETS.items() for preset in presets}


def batch(n: int, resolution: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {k: (torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1).to(device) for k in ("cf", "fa")}


def plain_loop(cfg: TrainConfig, steps: int, warmup: int) -> tuple[float, float]:
    """(steps/s, FLOP per step) of model + AdamW in this process: the baseline."""
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    torch.manual_seed(0)
    model = build_model(cfg, hf_lambda=cfg.hf_lambda, struct_lambda=cfg.struct_lambda,
                        offset_noise_strength=cfg.offset_noise_strength).to(device)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    data = batch(cfg.batch_size, cfg.resolution, device)

    def step():
        with autocast(device, cfg.mixed_precision):
            loss = model(data)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0), flops


def ray_path(cfg: TrainConfig, data_dir: str) -> float:
    """steps/s of `cffa train` (Ray Train + DeepSpeed + Ray Data), last log window."""
    from cffa_ray.train.launch import train

    train(cfg)
    lines = Path(cfg.run_dir, "training_log.txt").read_text().splitlines()
    return float(re.search(r"steps_per_s=([\d.e+-]+)", lines[-1]).group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_OF_PRESET))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--use_gpu", action="store_true")
    p.add_argument("--mixed_precision", default="no")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--cpus_per_worker", type=float, default=1.0,
                   help="CPUs per Ray worker; on CPU the baseline gets as many torch threads, for a fair ratio")
    args = p.parse_args()
    if not args.use_gpu:
        torch.set_num_threads(max(1, int(args.cpus_per_worker)))

    from cffa_ray.synth import write_synthetic_pairs

    work = tempfile.mkdtemp(prefix="cffa-bench-")
    n_pairs = max(16, 4 * args.batch_size * args.num_workers)
    write_synthetic_pairs(f"{work}/pairs", n_pairs, args.resolution)
    total = 2 * args.steps  # the Ray path's rate is its second log window: steps..2*steps, warmed up
    cfg = TrainConfig(model=MODEL_OF_PRESET[args.preset], preset=args.preset, resolution=args.resolution,
                      data=f"{work}/pairs", output_dir=f"{work}/runs", name="bench", batch_size=args.batch_size,
                      max_steps=total, num_workers=args.num_workers, zero_stage=args.zero_stage,
                      use_gpu=args.use_gpu, mixed_precision=args.mixed_precision, cpus_per_worker=args.cpus_per_worker,
                      gradient_checkpointing=args.gradient_checkpointing, val_every=total, sample_every=total,
                      num_sample_pairs=0, log_every=args.steps, checkpoint_every=total, val_fraction=0.1)
    cfg.validate()

    base_rate, flops = plain_loop(cfg, args.steps, args.warmup)
    ray_rate = ray_path(cfg, f"{work}/pairs")
    pairs = args.batch_size
    print(f"\npreset {args.preset}, {args.resolution}px, batch {args.batch_size}/worker, "
          f"{'GPU' if args.use_gpu else f'CPU ({torch.get_num_threads()} thread(s) per process)'}, "
          f"{args.mixed_precision}, {args.steps} timed steps")
    print(f"{'path':44s} {'steps/s':>9s} {'pairs/s':>9s} {'ratio':>7s}")
    print(f"{'plain PyTorch loop, 1 process (baseline)':44s} {base_rate:9.3f} {base_rate * pairs:9.3f} {1.0:7.2f}")
    label = f"Ray Train + DeepSpeed ZeRO-{args.zero_stage}, {args.num_workers} worker(s)"
    print(f"{label:44s} {ray_rate:9.3f} {ray_rate * pairs * args.num_workers:9.3f} "
          f"{ray_rate * args.num_workers / base_rate:7.2f}   (ratio of pairs/s)")
    print(f"FLOP per training step (torch counter): {flops / 1e9:.2f} GFLOP; plain loop achieves "
          f"{flops * base_rate / 1e12:.4f} TFLOP/s, Ray path {flops * ray_rate / 1e12:.4f} TFLOP/s per worker")


if __name__ == "__main__":
    main()
