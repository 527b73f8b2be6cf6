"""Generation throughput and memory: the seed's loop vs the project's sampler vs the Ray Data job.

Paths, each run in a fresh process (no memory or compiled kernels carried between them):
  (a)  seed-style: one pair at a time, batch 1, fp32 weights, the CF loop then the FA loop (joint_sdxl:
       one joint loop per pair) -- the baseline, ratio 1.0;
  (a2) the same seed loop in the project's precision (batch 1, weights in --mixed_precision), so the
       ratio to it measures batching and the sampler, not fp32 vs bf16;
  (b)  the project's sampler in-process: merged LoRA, compute-dtype weights, fused QKV, sliced VAE
       decode, fixed --model_batch, torch.compile per --compile (`sample_in_fixed_batches`);
  (b') (path `bcl`, not run by default) the same with the UNets in channels_last memory format;
  (c)  the whole `cffa generate` Ray Data job; its steady-state rate (after the first model call) is
       reported apart from its start-up (Ray, actors, model load, compile).
Each path prints pairs/s and peak GPU memory; with --peak_tflops, the fraction of the card's peak
(FLOP per pair from torch's counter, VAE decode included).

    python bench/generate.py --preset tiny --resolution 64 --num_samples 32 --steps 10
    python bench/generate.py --preset sd15-random --resolution 512 --num_samples 256 --steps 50 --use_gpu \
        --peak_tflops 989
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cffa_ray.config import AUTO, PRESETS, auto_or_int
from cffa_ray.train.config import TrainConfig

MODEL_OF_PRESET = {preset: model for model, presets in PRESETS.items() for preset in presets}
PATHS = {"a": "(a) seed-style loop, batch 1, fp32", "a2": "(a2) seed-style loop, batch 1, {precision}",
         "b": "(b) project sampler in-process, model_batch {model_batch}, {precision}{compiled}",
         "bcl": "(b') the same with channels_last UNets",
         "c": "(c) cffa generate (Ray Data), {concurrency} actor(s), steady state"}


def make_checkpoint(args, work: Path) -> str:
    """A checkpoint of the preset with non-zero LoRA weights (so merging is not a no-op)."""
    import torch

    from cffa_ray.models.build import build_model
    from cffa_ray.train.run_folder import RunFolder

    cfg = TrainConfig(model=MODEL_OF_PRESET[args.preset], preset=args.preset, resolution=args.resolution)
    torch.manual_seed(0)
    model = build_model(cfg, share_base=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return RunFolder(str(work)).export(model, {**cfg.model_record(), "trained_steps": 0}, str(work / "ckpt"))


def seed_style(model, noise, steps: int, dtype) -> None:
    """The seed's generation loop: per pair, per UNet, its own scheduler walk; batch 1."""
    import torch

    from cffa_ray.sampling import make_scheduler

    for z0 in noise:
        state = model.noise_to_state(z0[None].to(dtype))
        parts = [state[:, 0], state[:, 1]] if model.name == "dual_unet" else [state]
        done = []
        for i, x in enumerate(parts):
            sched = make_scheduler("ddim", model.scheduler_config)
            sched.set_timesteps(steps, device=x.device)
            for t in sched.timesteps:
                eps = (model._unet_eps(model.unets()[i], x, t.expand(1)) if model.name == "dual_unet"
                       else model.predict_noise(x, t))
                x = sched.step(eps, t, x).prev_sample
            done.append(x)
        model.decode(torch.stack(done, dim=1) if model.name == "dual_unet" else done[0])


def run_path(path: str, args, ckpt: str, work: Path) -> dict:
    """One path, in this (fresh) process: {rate, peak_gib, ...}."""
    import torch

    from cffa_ray.models.build import load_for_generation
    from cffa_ray.models.inference import DTYPES, prepare_for_sampling
    from cffa_ray.sampling import sample_in_fixed_batches, warm_up
    from cffa_ray.seeds import noise_for

    device = torch.device("cuda" if args.use_gpu else "cpu")
    torch.set_grad_enabled(False)
    if path == "c":
        from cffa_ray.generate.config import GenerateConfig
        from cffa_ray.generate.job import generate

        s = generate(GenerateConfig(checkpoint_dir=ckpt, num_samples=args.num_samples, output_dir=str(work / "out"),
                                    steps=args.steps, batch_size=args.batch_size, model_batch=args.model_batch,
                                    concurrency=args.concurrency, use_gpu=args.use_gpu, compile=args.compile,
                                    mixed_precision=args.mixed_precision))
        return {"rate": s["steady_pairs_per_s"], "peak_gib": s["gpu_peak_gib"], "startup_s": s["startup_s"],
                "job_rate": s["pairs_per_s"]}
    model, record = load_for_generation(ckpt)
    precision = "no" if path == "a" else args.mixed_precision
    if path in ("b", "bcl"):
        prepare_for_sampling(model, device, precision, args.compile, channels_last=path == "bcl")
        compile_s = warm_up(model, args.resolution, args.model_batch, precision)
    else:  # the seed's form: peft model, weights cast as a whole
        model.to(device=device, dtype=DTYPES[precision]).eval()
    batched = path in ("b", "bcl")
    n = args.num_samples if batched else args.seed_style_pairs
    noise = noise_for(model.noise_shape(args.resolution), 42, range(n)).to(device)

    def work_fn(count):
        if batched:
            sample_in_fixed_batches(model, noise[:count], args.model_batch, steps=args.steps,
                                    mixed_precision=precision, as_uint8=True)
        else:
            seed_style(model, noise[:count], args.steps, DTYPES[precision])

    work_fn(min(n, args.model_batch if batched else 1))  # warm-up (cuDNN autotune, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    work_fn(n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"rate": n / (time.perf_counter() - t0),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0}
    if batched:
        out["compile_s"] = compile_s if args.compile else None
        if args.peak_tflops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                sample_in_fixed_batches(model, noise[:1], 1, steps=args.steps, mixed_precision=precision)
            out["tflop_per_pair"] = counter.get_total_flops() / 1e12
    return out


def in_child(path: str, args, ckpt: str, work: Path) -> dict:
    """Run one path in a fresh Python process and read back its JSON line."""
    argv = [sys.executable, __file__, *sys.argv[1:], "--_path", path, "--_ckpt", ckpt, "--_work", str(work),
            "--model_batch", str(args.model_batch), "--compile" if args.compile else "--no-compile",
            "--mixed_precision", args.mixed_precision, "--batch_size", str(args.batch_size)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode or not lines:
        sys.exit(f"path {path} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][6:])


def resolve_auto(args, ckpt: str) -> None:
    """--model_batch auto, --compile and --mixed_precision auto: the choices `cffa generate` makes."""
    from cffa_ray.generate.memory import CPU_MODEL_BATCH, calibrate

    if args.mixed_precision == AUTO:
        args.mixed_precision = "bf16" if args.use_gpu else "no"
    if args.compile is None:
        args.compile = args.use_gpu
    if args.model_batch == AUTO:
        args.model_batch = calibrate(ckpt, args.mixed_precision)["model_batch"] if args.use_gpu else CPU_MODEL_BATCH


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_OF_PRESET))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=32, help="pairs for (b) and (c)")
    p.add_argument("--seed_style_pairs", type=int, default=8, help="pairs for (a) and (a2), which are slow")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model_batch", type=auto_or_int, default=AUTO)
    p.add_argument("--batch_size", type=int, default=None, help="(c)'s pairs per actor call (default: 2 x model_batch)")
    p.add_argument("--concurrency", default="1")
    p.add_argument("--use_gpu", action="store_true")
    p.add_argument("--mixed_precision", default=AUTO, choices=(AUTO, "no", "fp16", "bf16"))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the UNets in (b) and (c) (default: on with --use_gpu)")
    p.add_argument("--paths", default="a,a2,b,c", help="which paths to run, e.g. b,c")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's dense bf16 peak, e.g. 989 (H100)")
    p.add_argument("--json", default=None, help="also write the results here (bench/gpu_suite.py reads them)")
    for hidden in ("--_path", "--_ckpt", "--_work"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._path:  # a child: one path, one JSON line
        print("BENCH " + json.dumps(run_path(args._path, args, args._ckpt, Path(args._work))), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="cffa-bench-gen-"))
    ckpt = make_checkpoint(args, work)
    resolve_auto(args, ckpt)
    args.batch_size = args.batch_size or 2 * args.model_batch  # (c) needs several calls for a steady state
    results = {path: in_child(path, args, ckpt, work) for path in args.paths.split(",")}

    device = "GPU" if args.use_gpu else "CPU"
    print(f"\npreset {args.preset}, {args.resolution}px, {args.steps} DDIM steps, {device}, "
          f"{args.num_samples} pairs for (b)/(c), {args.seed_style_pairs} for (a)/(a2)")
    base = results.get("a", results.get("a2", next(iter(results.values()))))["rate"]
    per_pair = results.get("b", {}).get("tflop_per_pair")
    print(f"{'path':66s} {'pairs/s':>9s} {'ratio':>7s} {'peak GiB':>9s}" + ("  % of peak" if per_pair else ""))
    for path, r in results.items():
        label = PATHS[path].format(precision=args.mixed_precision, model_batch=args.model_batch,
                                   compiled=", compiled" if args.compile else "", concurrency=args.concurrency)
        line = f"{label:66s} {r['rate']:9.3f} {r['rate'] / base:7.2f} {r['peak_gib']:9.2f}"
        if per_pair:
            line += f"  {r['rate'] * per_pair / args.peak_tflops:9.1%}"
        print(line)
    if "c" in results:
        c = results["c"]
        print(f"(c) start-up {c['startup_s']:.1f}s (Ray, actors, model load{', compile' if args.compile else ''}); "
              f"whole job incl. start-up {c['job_rate']:.3f} pairs/s")
        if "b" in results:
            print(f"(c) steady state / (b): {c['rate'] / results['b']['rate']:.2f}")
    if results.get("b", {}).get("compile_s"):
        print(f"(b) compile + warm-up: {results['b']['compile_s']:.0f}s, paid once per process")
    if per_pair:
        print(f"FLOP per pair (torch counter, VAE decode included): {per_pair:.1f} TFLOP")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        Path(args.json).write_text(json.dumps({"settings": settings, "paths": results}, indent=1))


if __name__ == "__main__":
    main()
