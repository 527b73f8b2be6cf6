"""Generation throughput: the seed's loop vs the batched sampler vs the full Ray Data job.

(a) seed-style: one pair at a time, batch 1, fp32, the CF and FA sampling loops one after another
    (for joint_sdxl: one joint loop per pair) — the baseline, ratio 1.0;
(b) the project's batched sampler in this process (`sample_in_fixed_batches`, one scheduler walk);
(c) the full `cffa generate` Ray Data job (actors, PNG encoding, parquet + PNG shards).
Same model, steps and number of pairs in all three. On a GPU with sd15-random it also prints the
fraction of the GPU's peak FLOP/s reached (DESIGN.md: ~85 TFLOP per dual-UNet pair at 50 steps).

    python bench/generate.py --preset tiny --resolution 64 --num_samples 32 --steps 10
    python bench/generate.py --preset sd15-random --resolution 512 --num_samples 256 --steps 50 \
        --use_gpu --mixed_precision bf16 --model_batch 16 --peak_tflops 989
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cffa_ray.config import PRESETS, GenerateConfig, TrainConfig  # noqa: E402
from cffa_ray.models import build_model  # noqa: E402
from cffa_ray.sampling import make_scheduler, pair_noise, sample_in_fixed_batches  # noqa: E402

MODEL_OF_PRESET = {preset: model for model, presets in PRESETS.items() for preset in presets}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def seed_style(model, noise: torch.Tensor, steps: int) -> None:
    """The seed's generation loop: per pair, per UNet, its own scheduler walk; batch 1, fp32."""
    from cffa_ray.models.vae import decode_latents

    for z0 in noise:
        z0 = z0[None]
        if model.name == "dual_unet":
            for unet in (model.unet_cf, model.unet_fa):
                sched = make_scheduler("ddim", model.scheduler_config)
                sched.set_timesteps(steps, device=z0.device)
                x = z0.clone()
                for t in sched.timesteps:
                    x = sched.step(model._unet_eps(unet, x, t.expand(1)), t, x).prev_sample
                decode_latents(model.vae, x)
        else:
            sched = make_scheduler("ddim", model.scheduler_config)
            sched.set_timesteps(steps, device=z0.device)
            x = z0.clone()
            for t in sched.timesteps:
                x = sched.step(model.predict_noise(x, t), t, x).prev_sample
            model.decode(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_OF_PRESET))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model_batch", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--use_gpu", action="store_true")
    p.add_argument("--mixed_precision", default="no")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's dense peak, for the FLOP fraction")
    p.add_argument("--skip_seed_style", action="store_true", help="(a) is slow on big models; reuse a number")
    args = p.parse_args()

    device = torch.device("cuda" if args.use_gpu else "cpu")
    work = Path(tempfile.mkdtemp(prefix="cffa-bench-gen-"))
    cfg = TrainConfig(model=MODEL_OF_PRESET[args.preset], preset=args.preset, resolution=args.resolution)
    torch.manual_seed(0)
    model = build_model(cfg, share_base=False).eval()
    from cffa_ray.train.run_folder import RunFolder

    ckpt = RunFolder(str(work)).export(model, {**cfg.model_record(), "trained_steps": 0}, str(work / "ckpt"))
    model.to(device)
    noise = pair_noise(model, args.resolution, 42, list(range(args.num_samples))).to(device)
    n = args.num_samples
    rows = []

    if not args.skip_seed_style:
        seed_style(model, noise[:2], args.steps)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        seed_style(model, noise, args.steps)
        sync(device)
        rows.append(("(a) seed-style loop, batch 1, fp32", n / (time.perf_counter() - t0)))

    sample_in_fixed_batches(model, noise[:args.model_batch], args.model_batch, steps=2,
                            mixed_precision=args.mixed_precision)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    sample_in_fixed_batches(model, noise, args.model_batch, steps=args.steps, mixed_precision=args.mixed_precision)
    sync(device)
    rows.append((f"(b) batched sampler, model_batch {args.model_batch}, {args.mixed_precision}",
                 n / (time.perf_counter() - t0)))

    from cffa_ray.generate.job import generate

    summary = generate(GenerateConfig(checkpoint_dir=ckpt, num_samples=n, output_dir=str(work / "out"),
                                      steps=args.steps, batch_size=args.batch_size, model_batch=args.model_batch,
                                      concurrency=args.concurrency, use_gpu=args.use_gpu,
                                      mixed_precision=args.mixed_precision))
    rows.append((f"(c) Ray Data job, {args.concurrency} actor(s), incl. PNG+parquet", summary["pairs_per_s"]))

    base = rows[0][1]
    print(f"\npreset {args.preset}, {args.resolution}px, {n} pairs, {args.steps} DDIM steps, {device.type}")
    print(f"{'path':56s} {'pairs/s':>9s} {'ratio':>7s}")
    for label, rate in rows:
        print(f"{label:56s} {rate:9.3f} {rate / base:7.2f}")
    if args.peak_tflops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            sample_in_fixed_batches(model, noise[:1], 1, steps=args.steps, mixed_precision=args.mixed_precision)
        per_pair = counter.get_total_flops() / 1e12
        for label, rate in rows:
            print(f"{label:56s} {rate * per_pair:8.1f} TFLOP/s = {rate * per_pair / args.peak_tflops:6.1%} of peak")
        print(f"(FLOP per pair, torch counter: {per_pair:.1f} TFLOP)")


if __name__ == "__main__":
    main()
