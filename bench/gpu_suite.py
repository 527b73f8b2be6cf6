"""Every GPU figure the project tracks, in one command, with each target beside its figure.

    python bench/gpu_suite.py                       # one H100/H200: under 8 minutes
    python bench/gpu_suite.py --peak_tflops 989 --json suite.json
    python bench/gpu_suite.py --smoke               # the same code on CPU with tiny presets (a test)

Each figure comes from the bench script that owns it, run in a fresh process (no memory or compiled
kernels carried between them), which writes JSON that this script reads:

    generation dual_unet  512 px, 50 DDIM steps  bench/generate.py --paths b,c: the in-process sampler and
                                                 the Ray Data job's steady state (pairs/s, % of bf16 peak,
                                                 peak GiB at the defaults: model_batch auto, compile)
    generation joint_sdxl 512x1024               bench/generate.py --paths b: peak GiB at the defaults
    training dual_unet    512 px, batch 4        bench/train_step.py: plain loop vs Ray Train + DeepSpeed
                                                 (pairs/s, peak GiB), and the profile's kernel vs wall time
    training joint_sdxl   512x1024, batch 1      bench/train_step.py --skip_ray: pairs/s, peak GiB

Targets are the H100's (issue 17), scaled by --peak_tflops / 989 for another card; peaks in GiB are
not scaled. --smoke checks that every figure is produced, not its value (targets print as n/a).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
H100_PEAK = 989.0  # dense bf16 TFLOP/s

FULL = {
    "gen_dual": ["generate.py", "--preset", "sd15-random", "--resolution", "512", "--steps", "50",
                 "--num_samples", "192", "--paths", "b,c", "--use_gpu"],
    "gen_sdxl": ["generate.py", "--preset", "sdxl-random", "--resolution", "512", "--steps", "4",
                 "--num_samples", "8", "--paths", "b", "--use_gpu"],
    "train_dual": ["train_step.py", "--preset", "sd15-random", "--resolution", "512", "--batch_size", "4",
                   "--steps", "30", "--use_gpu", "--mixed_precision", "bf16", "--profile", "3"],
    "train_sdxl": ["train_step.py", "--preset", "sdxl-random", "--resolution", "512", "--batch_size", "1",
                   "--steps", "10", "--use_gpu", "--mixed_precision", "bf16", "--skip_ray"],
}
SMOKE = {  # the two longest first: run two at a time, the short ones then fill in behind them (77 s -> 62 s)
    # (fp32 on CPU: CPU autocast in bf16 refuses the plain loop's latent sampling, "Unexpected floating ScalarType";
    # no latent cache: its actor start is the product's, tested by the end-to-end training tests)
    "train_dual": ["train_step.py", "--preset", "tiny", "--resolution", "64", "--batch_size", "2", "--steps", "2",
                   "--warmup", "1", "--mixed_precision", "no", "--profile", "1", "--no-cache_latents"],
    "gen_dual": ["generate.py", "--preset", "tiny", "--resolution", "64", "--steps", "2", "--num_samples", "8",
                 "--model_batch", "2", "--batch_size", "2", "--paths", "b,c"],  # 4 calls: a steady state
    "gen_sdxl": ["generate.py", "--preset", "tiny-sdxl", "--resolution", "64", "--steps", "2", "--num_samples", "2",
                 "--model_batch", "2", "--paths", "b"],
    "train_sdxl": ["train_step.py", "--preset", "tiny-sdxl", "--resolution", "64", "--batch_size", "1",
                   "--steps", "2", "--warmup", "1", "--mixed_precision", "bf16", "--skip_ray"],
}


def run(name: str, argv: list[str], work: Path, peak_tflops: float | None) -> dict:
    """One bench script in a fresh process; its JSON, with the seconds it took."""
    out = work / f"{name}.json"
    extra = ["--peak_tflops", str(peak_tflops)] if peak_tflops and argv[0] == "generate.py" else []
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:], *extra, "--json", str(out)],
                          capture_output=True, text=True)
    if proc.returncode or not out.is_file():
        sys.exit(f"{name} failed ({' '.join(argv)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return {**json.loads(out.read_text()), "seconds": time.time() - t0}


def figures(results: dict, peak_tflops: float | None) -> list[tuple[str, float | None, str, bool | None]]:
    """(figure, value, target, met) rows from the bench results (met None: no target, or a smoke run)."""
    scale = (peak_tflops or H100_PEAK) / H100_PEAK
    smoke = peak_tflops is None
    g, s = results["gen_dual"]["paths"], results["gen_sdxl"]["paths"]
    t, ts = results["train_dual"], results["train_sdxl"]
    gen_b, gen_c = g["b"]["rate"], g["c"]["rate"]
    tflop = g["b"].get("tflop_per_pair")
    ray_pairs = t["ray"]["pairs_per_s"]

    def check(ok: bool) -> bool | None:
        return None if smoke else ok

    rows = [
        ("generation dual_unet: in-process sampler, pairs/s", gen_b, f">= {3.0 * scale:.2f}",
         check(gen_b >= 3.0 * scale)),
        ("generation dual_unet: Ray job steady state, pairs/s", gen_c, f">= 0.9 x in-process ({0.9 * gen_b:.2f})",
         check(gen_c >= 0.9 * gen_b)),
        ("generation dual_unet: % of bf16 peak (in-process)",
         100 * gen_b * tflop / peak_tflops if tflop and peak_tflops else None, "", None),
        ("generation dual_unet: peak GiB (in-process)", g["b"]["peak_gib"], "<= 20", check(g["b"]["peak_gib"] <= 20)),
        ("generation dual_unet: peak GiB (Ray job)", g["c"]["peak_gib"], "<= 20", check(g["c"]["peak_gib"] <= 20)),
        ("generation joint_sdxl 512x1024: peak GiB", s["b"]["peak_gib"], "<= 20", check(s["b"]["peak_gib"] <= 20)),
        ("training dual_unet: plain loop, pairs/s", t["plain"]["pairs_per_s"], "", None),
        ("training dual_unet: Ray Train + DeepSpeed, pairs/s", ray_pairs,
         f">= {30 * scale:.1f} and >= 0.9 x plain ({0.9 * t['plain']['pairs_per_s']:.2f})",
         check(ray_pairs >= 30 * scale and ray_pairs >= 0.9 * t["plain"]["pairs_per_s"])),
        ("training dual_unet: peak GiB (plain / Ray)", t["plain"]["peak_gib"], f"Ray: {t['ray']['peak_gib']:.2f}",
         None),
        ("training dual_unet: profiled step, wall ms", t["profile"].get("wall_ms"), "", None),
        ("training dual_unet: profiled step, kernel ms", t["profile"].get("kernel_ms"), "", None),
        ("training joint_sdxl: plain loop, pairs/s", ts["plain"]["pairs_per_s"], "", None),
        ("training joint_sdxl: peak GiB", ts["plain"]["peak_gib"], "", None),
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny presets, a few steps: every figure is produced")
    p.add_argument("--peak_tflops", type=float, default=H100_PEAK,
                   help="the card's dense bf16 peak (H100 989, H200 989); targets scale with it")
    p.add_argument("--json", default=None, help="also write the table and every bench result here")
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(FULL) + " (no table)")
    args = p.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    peak = None if args.smoke else args.peak_tflops
    names = args.only.split(",") if args.only else list(plan)
    work = Path(tempfile.mkdtemp(prefix="cffa-gpu-suite-"))
    t0 = time.time()
    results = {}

    def one(name: str) -> None:
        print(f"[suite] {name}: {' '.join(plan[name])}", flush=True)
        results[name] = run(name, plan[name], work, peak)
        print(f"[suite] {name} done in {results[name]['seconds']:.0f}s", flush=True)

    # a card's figures are measured one script at a time; a smoke run checks that they come, and two at a
    # time fills the cores that one script's start-up (a single-threaded import) leaves idle
    with ThreadPoolExecutor(max_workers=2 if args.smoke else 1) as pool:
        list(pool.map(one, names))
    rows = figures(results, peak) if set(plan) <= set(results) else []
    print(f"\n{'figure':56s} {'value':>10s}  {'target':36s} ok")
    for label, value, target, met in rows:
        shown = "n/a" if value is None else f"{value:10.3f}"
        print(f"{label:56s} {shown:>10s}  {target:36s} {'-' if met is None else ('yes' if met else 'MISSES')}")
    print(f"({'smoke, CPU' if args.smoke else f'peak {peak:g} TFLOP/s'}; {time.time() - t0:.0f}s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [dict(zip(("figure", "value", "target", "met"), r))
                                                        for r in rows], "results": results}, indent=1))
    return 1 if any(met is False for *_, met in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
