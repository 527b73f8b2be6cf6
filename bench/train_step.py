"""Training throughput: the Ray Train + DeepSpeed path against a plain single-process PyTorch loop.

Same model (preset), resolution, batch, input (cached VAE moments, or uint8 pixels with
--no-cache_latents) and number of steps in both; the plain loop is the baseline (ratio 1.0), written
as diffusers' LoRA scripts do it: frozen weights in the compute dtype, LoRA weights in fp32, autocast.
Rates are steady-state: the first `--warmup` steps are not timed in the baseline, and the Ray path's
rate is read from its last training_log window. Peak GPU memory is printed for both; with
--peak_tflops the fraction of the card's peak (FLOP per step from torch's counter).

    python bench/train_step.py --preset tiny --resolution 64 --batch_size 2 --steps 40
    python bench/train_step.py --preset sd15-random --resolution 512 --batch_size 4 --use_gpu \
        --mixed_precision bf16 --peak_tflops 989
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cffa_ray.config import PRESETS
from cffa_ray.models.build import build_model  # noqa: E402
from cffa_ray.models.inference import DTYPES  # noqa: E402
from cffa_ray.sampling import autocast  # noqa: E402
from cffa_ray.train.config import TrainConfig

MODEL_OF_PRESET = {preset: model for model, presets in PRESETS.items() for preset in presets}


def batch(model, cfg: TrainConfig, device) -> dict:
    """What a worker gets from Ray Data: cached fp16 moments, or uint8 pixels."""
    g = torch.Generator().manual_seed(0)
    pixels = {k: torch.randint(0, 256, (cfg.batch_size, 3, cfg.resolution, cfg.resolution), generator=g,
                               dtype=torch.uint8).to(device) for k in ("cf", "fa")}
    if not cfg.cache_latents:
        return pixels
    with torch.no_grad():
        return {k: v.half() for k, v in type(model).cache_moments(model.vae, pixels["cf"], pixels["fa"]).items()}


def plain_model(cfg: TrainConfig, device):
    """Frozen weights in the compute dtype, LoRA weights in fp32 (diffusers' cast_training_params)."""
    torch.manual_seed(0)
    model = build_model(cfg, **cfg.loss_settings()).to(device)
    if cfg.mixed_precision != "no":
        model.to(DTYPES[cfg.mixed_precision])
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def plain_loop(cfg: TrainConfig, steps: int, warmup: int, profile: int = 0) -> tuple[float, float, float, dict]:
    """(steps/s, FLOP per step, peak GiB, profile) of model + AdamW in this process: the baseline
    (profile: print_profile's figures, {} without --profile)."""
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    model = plain_model(cfg, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, fused=cfg.use_gpu or None)
    data = batch(model, cfg, device)

    def step():
        with autocast(device, cfg.mixed_precision):
            loss = model(data)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # as the DeepSpeed config does (gradient_clipping 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    prof = print_profile(step, profile, device) if profile else {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return steps / (time.perf_counter() - t0), flops, peak, prof


def print_profile(step, steps: int, device) -> dict:
    """torch.profiler over `steps` steps: the top kernels by device time, and kernel launches a step.

    Returns:
        {"wall_ms", "kernel_ms", "launches"} a step: kernel time is the GPU's (the CPU's ops' own time on CPU).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    print(f"per step: {launches / steps:.0f} kernel launches, "
          f"{sum(e.count for e in events if e.key == 'aten::mm') / steps:.0f} aten::mm, "
          f"{sum(e.count for e in events if e.key == 'aten::_to_copy') / steps:.0f} dtype copies")
    if device.type == "cuda":  # kernels only: the device time of events that ran on the GPU
        kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:  # the ops' own CPU time
        kernel_us = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::"))
    out = {"wall_ms": wall_ms, "kernel_ms": kernel_us / 1e3 / steps, "launches": launches / steps}
    print(f"per step: wall {out['wall_ms']:.1f} ms, kernels {out['kernel_ms']:.1f} ms (under the profiler)")
    return out


def ray_path(cfg: TrainConfig) -> tuple[float, float]:
    """(steps/s, peak GiB) of `cffa train` (Ray Train + DeepSpeed + Ray Data), last log window."""
    from cffa_ray.train.launch import train

    train(cfg)
    last = Path(cfg.run_dir, "training_log.txt").read_text().splitlines()[-1]
    peak = re.search(r"gpu_peak_gib=([\d.e+-]+)", last)
    return float(re.search(r"steps_per_s=([\d.e+-]+)", last).group(1)), float(peak.group(1)) if peak else 0.0


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
    p.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=True,
                   help="train from cached VAE moments (default) or from uint8 pixels encoded every step")
    p.add_argument("--cpus_per_worker", type=float, default=1.0,
                   help="CPUs per Ray worker; on CPU the baseline gets as many torch threads, for a fair ratio")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's dense bf16 peak, e.g. 989 (H100)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps of the plain loop (torch.profiler: top kernels, launches a step)")
    p.add_argument("--skip_ray", action="store_true", help="only the plain loop (with --profile)")
    p.add_argument("--json", default=None, help="also write the results here (bench/gpu_suite.py reads them)")
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
                      gradient_checkpointing=args.gradient_checkpointing, cache_latents=args.cache_latents,
                      val_every=total, sample_every=total, num_sample_pairs=0, log_every=args.steps,
                      checkpoint_every=total, val_fraction=0.1)
    cfg.validate()

    base_rate, flops, base_peak, prof = plain_loop(cfg, args.steps, args.warmup, args.profile)
    if args.use_gpu:
        torch.cuda.empty_cache()  # the Ray worker is another process on the same GPU
    ray_rate, ray_peak = (None, None) if args.skip_ray else ray_path(cfg)
    pairs = args.batch_size
    print(f"\npreset {args.preset}, {args.resolution}px, batch {args.batch_size}/worker, "
          f"{'GPU' if args.use_gpu else f'CPU ({torch.get_num_threads()} thread(s) per process)'}, "
          f"{args.mixed_precision}, {'cached latents' if args.cache_latents else 'pixels'}, {args.steps} timed steps")
    print(f"{'path':44s} {'steps/s':>9s} {'pairs/s':>9s} {'ratio':>7s} {'peak GiB':>9s}"
          + ("  % of peak" if args.peak_tflops else ""))

    def row(label, rate, workers, peak):
        line = f"{label:44s} {rate:9.3f} {rate * pairs * workers:9.3f} {rate * workers / base_rate:7.2f} {peak:9.2f}"
        if args.peak_tflops:
            line += f"  {flops * rate / 1e12 / args.peak_tflops:9.1%}"
        print(line)

    row("plain PyTorch loop, 1 process (baseline)", base_rate, 1, base_peak)
    if ray_rate is not None:
        row(f"Ray Train + DeepSpeed ZeRO-{args.zero_stage}, {args.num_workers} worker(s)", ray_rate, args.num_workers,
            ray_peak)
    print(f"FLOP per training step (torch counter): {flops / 1e9:.2f} GFLOP; plain loop achieves "
          f"{flops * base_rate / 1e12:.4f} TFLOP/s" + (f", Ray path {flops * ray_rate / 1e12:.4f} TFLOP/s per worker"
                                                       if ray_rate else ""))
    if args.json:
        pairs_per_step = args.batch_size  # per worker; no gradient accumulation here
        Path(args.json).write_text(json.dumps({
            "settings": vars(args), "flop_per_step": flops, "profile": prof,
            "plain": {"steps_per_s": base_rate, "pairs_per_s": base_rate * pairs_per_step, "peak_gib": base_peak},
            "ray": None if ray_rate is None else {"steps_per_s": ray_rate, "peak_gib": ray_peak,
                                                  "pairs_per_s": ray_rate * pairs_per_step * args.num_workers}},
            indent=1))


if __name__ == "__main__":
    main()
