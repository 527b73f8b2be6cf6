"""Quality of the two designs and their settings: which aligns CF and FA vessel trees, at what cost?

Trains each `--designs` on its toy-world base (dual_unet on `tiny-retina`, joint_sdxl on
`tiny-retina-joint`, both pre-trained on synthetic retinas) with the real `cffa train` path (Ray
Train + DeepSpeed, 2 CPU workers), once per setting of `--struct_lambda` (0.3 vs 0) x
`--loss_weighting` (none vs alpha_bar), all on the same synthetic pairs with the same training seed
and steps; generates the same pairs (same z0) from each run with `cffa generate`, once per
`--fa_noise` (same: both UNets start from z0, as the research design does; negated: the FA UNet
starts from -z0; the joint design has one latent, so only same) and per `--struct_guidance`
(sampling-time guidance between the two UNets, 0 = off; dual_unet only); scores them with
`cffa evaluate` against held-out synthetic pairs; prints one table. Every job runs in one Ray session
of this process. `--seeds 0 1` repeats the grid with other training seeds (the noise of the measurement;
a seed also draws its own validation split).

    python bench/quality.py                       # dual_unet: 4 runs x 2 generations, ~15 minutes on 2 CPU cores
    python bench/quality.py --designs dual_unet joint_sdxl --loss_weighting alpha_bar --seeds 0 1  # head to head
    python bench/quality.py --seeds 0 1 --out /tmp/quality
    python bench/quality.py --steps 600 --loss_weighting alpha_bar   # longer training, struct 0.3 vs 0
    python bench/quality.py --struct_lambda 0.3 --loss_weighting alpha_bar --struct_guidance 0 1 3 10  # guidance
    python bench/quality.py --struct_lambda 0.3 --loss_weighting alpha_bar --fa_noise negated \
        --struct_guidance 0 0.003 0.01 0.03 --struct_guidance_target vessels  # guided on vessel maps

Columns: alignment normalised = (generated - floor) / (real - floor) of the vessel soft Dice (0 =
unrelated vessel trees, 1 = as aligned as real pairs; floor = mismatched real pairs); Dice of the
generated pairs and of generated pairs mismatched (CF i with FA i+1: the floor in the model's own
images; pairs below it draw vessel trees that avoid each other); SWD x1e3 per modality (lower =
closer to the real images; the real-vs-real value under the table is the metric's own noise);
the second ruler (training pairs as --real_train, the held-out pairs as --real_test): FA vessel
topology max |d| against real (> 2 far), the fraction of generated images flagged as near-copies
of a training image (CF or FA, the larger), and with --utility the TSTR vessel-Dice ratio; training
time of the run; generation seconds per pair (the whole `cffa generate` job over the pairs it made,
Ray's start-up included).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cffa_ray.evaluate.config import EvaluateConfig
from cffa_ray.generate.config import GenerateConfig
from cffa_ray.models.designs import DESIGNS
from cffa_ray.train.config import TrainConfig

TRAIN_DATA_SEED, REAL_DATA_SEED, SIZE = 101, 202, 64
TOY_BASE = {"dual_unet": "tiny-retina", "joint_sdxl": "tiny-retina-joint"}  # each design's pre-trained toy base


def variants(args, design: str) -> list[tuple[str, float]]:
    """The (--fa_noise, --struct_guidance) generations a run of `design` is scored with: the ones it has."""
    facts = DESIGNS[design]
    guidance = args.struct_guidance if facts.struct_guidance else [0.0]
    return [(f, g) for f in args.fa_noise if f in facts.fa_noises for g in guidance]


def run_one(args, work: Path, design: str, struct: float, weighting: str, seed: int) -> list[dict]:
    """Train one setting, then generate and score the same pairs once per --fa_noise x --struct_guidance:
    one row each."""
    from cffa_ray.evaluate.job import evaluate
    from cffa_ray.generate.job import generate
    from cffa_ray.train.launch import train

    name = f"{design}_struct{struct:g}_{weighting}_seed{seed}"
    cfg = TrainConfig(data=str(work / "pairs"), output_dir=str(work / "runs"), name=name, model=design,
                      preset=TOY_BASE[design], resolution=SIZE, max_steps=args.steps, num_workers=2,
                      batch_size=args.batch_size, lr=args.lr, seed=seed, struct_lambda=struct, loss_weighting=weighting,
                      val_every=args.steps, sample_every=args.steps, num_sample_pairs=0, log_every=25)
    t0 = time.time()
    train(cfg)
    train_s = time.time() - t0
    rows = []
    for fa_noise, guidance in variants(args, design):
        tag = f"{name}_{fa_noise}" + (f"_guidance{guidance:g}" if guidance else "")
        target = args.struct_guidance_target if guidance else "latent_edges"  # (the flag needs S > 0)
        if target != "latent_edges":
            tag += f"_{target}"
        gen = GenerateConfig(checkpoint_dir=os.path.join(cfg.run_dir, "best_checkpoint"), num_samples=args.samples,
                             steps=args.sample_steps, seed=42, batch_size=16, concurrency="2", fa_noise=fa_noise,
                             struct_guidance=guidance, struct_guidance_target=target,
                             output_dir=str(work / "generated" / tag))
        summary = generate(gen)
        ev = evaluate(EvaluateConfig(generated=gen.output_dir, real=str(work / "real"),
                                     output=str(work / "eval" / tag),
                                     real_train=str(work / "pairs"), real_test=str(work / "real"),
                                     utility=args.utility))
        a, r = ev["alignment"], ev["realism"]
        rows.append({"design": design, "struct": struct, "weighting": weighting, "seed": seed, "fa_noise": fa_noise,
                     "guidance": guidance, "target": target,
                     "normalised": a["normalised"], "dice": a["generated"]["mean"], "dice_std": a["generated"]["std"],
                     "own_floor": a["generated_mismatched"]["mean"], "real": a["real"]["mean"],
                     "floor": a["mismatched"]["mean"], "swd_cf": r["cf"]["mean"], "swd_fa": r["fa"]["mean"],
                     "swd_cf_noise": r["cf"]["real_vs_real"], "swd_fa_noise": r["fa"]["real_vs_real"],
                     "topology_fa": ev["topology"]["fa"]["max_abs_d"],
                     "memorised": max(ev["memorisation"][m]["fraction_above"] for m in ("cf", "fa")),
                     "tstr_dice": ev["utility"]["scores"]["dice"]["ratio"] if ev["utility"] else None,
                     "train_s": train_s,
                     "gen_s_per_pair": summary["seconds"] / summary["pairs_made"] if summary["pairs_made"] else None})
    return rows


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"  # evaluate's normalised score is None when real <= floor


def _guidance(scale: float, target: str) -> str:
    return f"{scale:g}" + (f" ({target})" if scale else "")


def settings(args) -> list[tuple[str, float, str]]:
    return [(design, struct, weighting) for design in args.designs for struct in args.struct_lambda
            for weighting in args.loss_weighting]


def table(rows: list[dict], args) -> str:
    lines = ["| design | struct_lambda | loss_weighting | seed | fa_noise | struct_guidance | alignment normalised | "
             "Dice generated (std) | Dice generated, mismatched | SWD CF | SWD FA | FA topology max abs d | memorised "
             "| TSTR Dice ratio | train s | generate s/pair |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['design']} | {r['struct']:g} | {r['weighting']} | {r['seed']} | {r['fa_noise']} | "
                     f"{_guidance(r['guidance'], r['target'])} | "
                     f"**{_num(r['normalised'])}** | {r['dice']:.4f} ({r['dice_std']:.4f}) | {r['own_floor']:.4f} | "
                     f"{r['swd_cf']:.1f} | {r['swd_fa']:.1f} | {_num(r['topology_fa'])} | {r['memorised']:.0%} | "
                     f"{_num(r['tstr_dice'])} | {r['train_s']:.0f} | {_num(r['gen_s_per_pair'])} |")
    if len(args.seeds) > 1:
        import numpy as np

        lines += ["", "| design | struct_lambda | loss_weighting | fa_noise | struct_guidance | alignment "
                      "normalised, mean ± std over seeds | SWD CF | SWD FA | FA topology max abs d | train s |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for design, struct, weighting in settings(args):
            for fa_noise, guidance in variants(args, design):
                key = (design, struct, weighting, fa_noise, guidance)
                sel = [r for r in rows if tuple(r[k] for k in ("design", "struct", "weighting", "fa_noise",
                                                              "guidance")) == key]
                norm = np.array([np.nan if r["normalised"] is None else r["normalised"] for r in sel])
                topology = [r["topology_fa"] for r in sel if r["topology_fa"] is not None]
                lines.append(f"| {design} | {struct:g} | {weighting} | {fa_noise} | "
                             f"{_guidance(guidance, args.struct_guidance_target)} | "
                             f"{norm.mean():.3f} ± {norm.std(ddof=1):.3f} | "
                             f"{np.mean([r['swd_cf'] for r in sel]):.1f} | {np.mean([r['swd_fa'] for r in sel]):.1f} | "
                             f"{_num(np.mean(topology) if topology else None)} | "
                             f"{np.mean([r['train_s'] for r in sel]):.0f} |")
    first = rows[0]
    lines += ["", f"Real pairs {first['real']:.4f} (ceiling), mismatched real pairs {first['floor']:.4f} (floor). "
                  f"SWD real vs real (the metric's noise): CF {first['swd_cf_noise']:.1f}, "
                  f"FA {first['swd_fa_noise']:.1f}. "
                  f"{args.steps} steps x 2 workers x {args.batch_size} pairs, lr {args.lr:g}, {args.pairs} training "
                  f"pairs, {args.samples} generated pairs ({args.sample_steps} DDIM steps) each, "
                  f"{args.real_pairs} held-out real pairs, {SIZE} px."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="work folder (default: a new temporary folder)")
    p.add_argument("--steps", type=int, default=150, help="training steps per run")
    p.add_argument("--batch_size", type=int, default=2, help="pairs per worker per step (2 workers)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="as the demo: the LoRAs must first learn which modality each UNet makes")
    p.add_argument("--pairs", type=int, default=64, help="synthetic training pairs")
    p.add_argument("--real_pairs", type=int, default=64, help="held-out synthetic pairs the evaluation compares with")
    p.add_argument("--samples", type=int, default=64, help="pairs generated per run")
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument("--designs", nargs="+", default=["dual_unet"], choices=list(TOY_BASE),
                   help="designs to train, each on its toy base, at the same steps, pairs and lr")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (the grid runs once per seed)")
    p.add_argument("--struct_lambda", type=float, nargs="+", default=[0.3, 0.0], help="struct_lambda values to train")
    p.add_argument("--loss_weighting", nargs="+", default=["none", "alpha_bar"], choices=["none", "alpha_bar"],
                   help="loss_weighting values to train")
    p.add_argument("--utility", action="store_true", help="add cffa evaluate --utility (TSTR) to every score")
    p.add_argument("--fa_noise", nargs="+", default=["same", "negated"], choices=["same", "negated"],
                   help="generate and score each run's pairs once per value (cffa generate --fa_noise)")
    p.add_argument("--struct_guidance", type=float, nargs="+", default=[0.0],
                   help="and once per value of cffa generate --struct_guidance (sampling-time guidance, 0 = off)")
    p.add_argument("--struct_guidance_target", default="latent_edges", choices=["latent_edges", "vessels"],
                   help="what the guided generations make agree (cffa generate --struct_guidance_target)")
    args = p.parse_args()

    from cffa_ray.synth import write_synthetic_pairs

    work = Path(args.out or tempfile.mkdtemp(prefix="cffa-bench-quality-")).resolve()
    t0 = time.time()
    if not (work / "pairs" / "fa").is_dir():
        write_synthetic_pairs(work / "pairs", args.pairs, SIZE, seed=TRAIN_DATA_SEED)
        write_synthetic_pairs(work / "real", args.real_pairs, SIZE, seed=REAL_DATA_SEED)
    rows = [row for seed in args.seeds for design, struct, weighting in settings(args)
            for row in run_one(args, work, design, struct, weighting, seed)]
    trained = len(args.seeds) * len(settings(args))
    print(f"\n{table(rows, args)}\n\n[bench quality] {trained} training runs, {len(rows)} generations in "
          f"{time.time() - t0:.0f}s, work folder {work}",
          flush=True)


if __name__ == "__main__":
    main()
