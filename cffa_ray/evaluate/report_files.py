"""The evaluation's record: evaluation.json (every number), evaluation.md (the same, to read),
pairs.csv (one line per pair, to find the bad ones), and the lines printed at the end.

evaluation.json keys:
    generated   path, pairs, kind (parquet | pairs folder), identity (checkpoint, steps, scheduler, ...)
    real        path, pairs
    resolution  the side the images were compared at
    alignment   soft Dice of vessel maps: generated / real (ceiling) / mismatched (floor) as {mean, std, n},
                normalised = (generated - floor) / (real - floor), and generated_mismatched (CF and FA of
                different generated pairs: below it, a model's two vessel trees avoid each other)
    realism     SWD x 1e3 per modality: per pyramid level, their mean, and real_vs_real (two halves of the
                real set: what the metric reads for two samples of one distribution, a noise reference)
    fid         null, or per modality {fid, kid_mean, kid_std} with the weights file
    from_data   null, or SSIM / PSNR of generated pairs against their source pairs
    topology    per modality, per measure (density, loops, branch_points, end_points, segment_length):
                generated and real {mean, std, n} and d, the standardised difference; max_abs_d, worst, far
    memorisation null (memorisation_skipped says why), or per modality the nearest-training-image cosine of
                generated and held-out images (distributions), threshold (held-out 99th percentile),
                fraction_above (of generated); train, held_out (path, pairs), closest (generated-training pairs)
    utility     null, or TSTR: pairs, steps, seed, per score (psnr, ssim, dice) synthetic / real /
                real_seed2 {mean, std, n}, ratio (synthetic / real), seed_spread
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import numpy as np

from cffa_ray.evaluate import metrics
from cffa_ray.evaluate.config import EvaluateConfig
from cffa_ray.evaluate.inputs import GENERATED, REAL, GeneratedSet
from cffa_ray.evaluate.report_ruler import markdown_lines, summary_lines
from cffa_ray.evaluate.scoring import SCORE_COLUMNS
from cffa_ray.evaluate.second_ruler import NN_COLUMNS
from cffa_ray.evaluation_report import EVALUATION_JSON
from cffa_ray.io import atomic_write_text, filesystem
from cffa_ray.paths import join_path

EVALUATION_MD, PAIRS_CSV = "evaluation.md", "pairs.csv"
CHANNELS = {"cf": 3, "fa": 1}


def _realism(collected: dict, resolution: int, seed: int) -> dict:
    sizes = metrics.pyramid_sizes(resolution)
    out = {"method": "multi-scale sliced Wasserstein distance x1e3 on 7x7 Laplacian-pyramid neighbourhoods "
                     "(Karras et al. 2018); lower is closer to the real images"}
    for m, channels in CHANNELS.items():
        gen, real = collected[GENERATED][f"swd_{m}"], collected[REAL][f"swd_{m}"]
        levels = metrics.swd_per_level(gen, real, channels, seed)
        n_real = len(collected[REAL]["rows"])
        half = real.shape[1] // n_real * (n_real // 2)  # descriptors are grouped by image: split by image
        noise = metrics.swd_per_level(real[:, :half], real[:, half:], channels, seed)
        out[m] = {"levels": {str(s): round(v, 4) for s, v in zip(sizes, levels)},
                  "mean": round(float(np.mean(levels)), 4),
                  "real_vs_real": round(float(np.mean(noise)), 4)}
    return out


def _fid(cfg: EvaluateConfig, collected: dict) -> dict | None:
    if not cfg.inception_weights:
        return None
    out = {"weights": cfg.inception_weights}
    for m in CHANNELS:
        gen, real = collected[GENERATED][f"inception_{m}"], collected[REAL][f"inception_{m}"]
        kid_mean, kid_std = metrics.kernel_inception_distance(gen, real, cfg.seed)
        out[m] = {"fid": metrics.frechet_distance(gen, real), "kid_mean": kid_mean, "kid_std": kid_std}
    return out


def _from_data(generated: GeneratedSet, rows: list[dict], missing_sources: int) -> dict | None:
    n = sum(1 for r in generated.rows if r.get("mode") == "from_data")
    if not n:
        return None
    out = {"pairs": n, "pairs_without_source_in_real": missing_sources}
    for key in ("ssim_cf", "ssim_fa", "psnr_cf", "psnr_fa"):
        out[key] = metrics.mean_std(r[key] for r in rows)
    return out


def build_evaluation(cfg: EvaluateConfig, generated: GeneratedSet, collected: dict, resolution: int,
                     missing_sources: int, seconds: float, extra: dict | None = None) -> dict:
    """Every number of evaluation.json; `extra`: second_ruler.measure's sections (topology, memorisation,
    utility)."""
    gen_rows, real_rows = collected[GENERATED]["rows"], collected[REAL]["rows"]
    alignment = {
        "method": "soft Dice of Frangi vessel maps (CF: dark ridges, green channel; FA: bright ridges) inside "
                  "the fundus, rim eroded; higher is better aligned",
        "generated": metrics.mean_std(r["dice"] for r in gen_rows),
        "real": metrics.mean_std(r["dice"] for r in real_rows),
        "mismatched": metrics.mean_std(r["dice_mismatched"] for r in real_rows),
        # CF and FA of different generated pairs: the floor in the model's own image statistics. Generated
        # pairs below it have vessel trees that avoid each other, not unrelated ones
        "generated_mismatched": metrics.mean_std(r["dice_mismatched"] for r in gen_rows),
    }
    alignment["normalised"] = metrics.normalised_alignment(
        alignment["generated"]["mean"], alignment["real"]["mean"], alignment["mismatched"]["mean"])
    return {
        "generated": {"path": cfg.generated, "pairs": len(gen_rows),
                      "kind": "cffa generate parquet" if generated.from_parquet else "pairs folder",
                      "identity": generated.identity},
        "real": {"path": cfg.real, "pairs": len(real_rows)},
        "resolution": resolution,
        "alignment": alignment,
        "realism": _realism(collected, resolution, cfg.seed),
        "fid": _fid(cfg, collected),
        "from_data": _from_data(generated, gen_rows, missing_sources),
        **(extra or {}),
        "seed": cfg.seed,
        "seconds": round(seconds, 2),
    }


# ------------------------------------------------------------------ files

def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ms(stat: dict) -> str:
    return f"{_fmt(stat['mean'])} ± {_fmt(stat['std'])} (n={stat['n']})"


def markdown(ev: dict) -> str:
    a, r = ev["alignment"], ev["realism"]
    ident = ev["generated"]["identity"] or {}
    lines = [
        "# Evaluation", "",
        f"- generated: `{ev['generated']['path']}` ({ev['generated']['pairs']} pairs, {ev['generated']['kind']})",
        f"- real: `{ev['real']['path']}` ({ev['real']['pairs']} pairs)",
        f"- compared at {ev['resolution']} px; seed {ev['seed']}; {ev['seconds']} s",
    ]
    if ident:
        lines.append("- generation: " + ", ".join(f"{k} `{v}`" for k, v in ident.items() if v is not None))
    lines += ["", "## Paired alignment (vessel soft Dice, higher is better)", "",
              "| pairs | soft Dice |", "|---|---|",
              f"| generated | {_ms(a['generated'])} |", f"| real (ceiling) | {_ms(a['real'])} |",
              f"| real, mismatched (floor) | {_ms(a['mismatched'])} |",
              f"| generated, mismatched (CF and FA of different generated pairs) | {_ms(a['generated_mismatched'])} |",
              "",
              f"Normalised (generated - floor) / (real - floor): **{_fmt(a['normalised'], 3)}** "
              "(0: unrelated vessel trees, 1: as aligned as real pairs).", "",
              "## Realism (SWD x1e3, lower is better)", "",
              "| modality | " + " | ".join(f"{s} px" for s in r["cf"]["levels"]) + " | mean | real vs real |",
              "|---|" + "---|" * (len(r["cf"]["levels"]) + 2)]
    for m in CHANNELS:
        lines.append(f"| {m.upper()} | " + " | ".join(_fmt(v, 2) for v in r[m]["levels"].values())
                     + f" | {_fmt(r[m]['mean'], 2)} | {_fmt(r[m]['real_vs_real'], 2)} |")
    lines += ["", "_real vs real_: the SWD between two halves of the real set, the metric's reading for two "
                  "samples of one distribution."]
    if ev["fid"]:
        lines += ["", "## FID and KID (Inception pool features, lower is better)", "",
                  f"weights: `{ev['fid']['weights']}`", "", "| modality | FID | KID |", "|---|---|---|"]
        for m in CHANNELS:
            f = ev["fid"][m]
            lines.append(f"| {m.upper()} | {_fmt(f['fid'], 3)} | {_fmt(f['kid_mean'], 5)} ± {_fmt(f['kid_std'], 5)} |")
    if ev["from_data"]:
        d = ev["from_data"]
        lines += ["", "## Fidelity to the source pair (from_data)", "",
                  f"{d['pairs']} pairs; {d['pairs_without_source_in_real']} without their source in --real.", "",
                  "| modality | SSIM | PSNR (dB) |", "|---|---|---|",
                  f"| CF | {_ms(d['ssim_cf'])} | {_ms(d['psnr_cf'])} |",
                  f"| FA | {_ms(d['ssim_fa'])} | {_ms(d['psnr_fa'])} |"]
    lines += markdown_lines(ev)
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return "" if value is None else str(value)


def pairs_csv(collected: dict) -> str:
    """One line per pair of every set (generated, real, and real_test when memorisation ran): its scores,
    vessel topology per image, and its nearest training image per modality (memorisation)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    columns = [*SCORE_COLUMNS, *NN_COLUMNS]
    writer.writerow(["set", "pair_id", *columns])
    for set_name, c in collected.items():
        for row in c["rows"]:
            writer.writerow([set_name, row["pair_id"], *(_cell(row.get(k)) for k in columns)])
    return buf.getvalue()


def _finite(obj):
    """NaN / inf -> None, recursively: evaluation.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_outputs(output: str, evaluation: dict, collected: dict) -> None:
    """The three files appear together or not at all (each written atomically; when one fails, e.g. on a
    full disk, those already written by this call are removed); the JSON last, so its presence means a
    finished run."""
    files = [(PAIRS_CSV, pairs_csv(collected)), (EVALUATION_MD, markdown(evaluation)),
             (EVALUATION_JSON, json.dumps(_finite(evaluation), indent=2, allow_nan=False))]
    written = []
    try:
        for name, text in files:
            atomic_write_text(join_path(output, name), text)
            written.append(join_path(output, name))
    except OSError:
        for path in written:
            fs, p = filesystem(path)
            with contextlib.suppress(OSError):
                fs.delete_file(p)
        raise


def print_summary(output: str, ev: dict) -> None:
    a, r = ev["alignment"], ev["realism"]
    print(f"[cffa] alignment (vessel soft Dice, higher = better aligned): generated {_fmt(a['generated']['mean'])}"
          f" | real {_fmt(a['real']['mean'])} (ceiling) | mismatched real {_fmt(a['mismatched']['mean'])} (floor)"
          f" | normalised {_fmt(a['normalised'], 3)} | generated, mismatched {_fmt(a['generated_mismatched']['mean'])}",
          flush=True)
    print(f"[cffa] realism (SWD x1e3, lower = closer to real): CF {_fmt(r['cf']['mean'], 2)} "
          f"(real vs real {_fmt(r['cf']['real_vs_real'], 2)}) | FA {_fmt(r['fa']['mean'], 2)} "
          f"(real vs real {_fmt(r['fa']['real_vs_real'], 2)})", flush=True)
    if ev["fid"]:
        f = ev["fid"]
        print(f"[cffa] FID CF {_fmt(f['cf']['fid'], 3)} | FA {_fmt(f['fa']['fid'], 3)}; KID CF "
              f"{_fmt(f['cf']['kid_mean'], 5)} | FA {_fmt(f['fa']['kid_mean'], 5)}", flush=True)
    if ev["from_data"]:
        d = ev["from_data"]
        print(f"[cffa] from_data vs source: SSIM CF {_fmt(d['ssim_cf']['mean'], 3)} | "
              f"FA {_fmt(d['ssim_fa']['mean'], 3)}"
              f"; PSNR CF {_fmt(d['psnr_cf']['mean'], 2)} dB | FA {_fmt(d['psnr_fa']['mean'], 2)} dB", flush=True)
    for line in summary_lines(ev):
        print(line, flush=True)
    print(f"[cffa] evaluated {ev['generated']['pairs']} generated and {ev['real']['pairs']} real pairs in "
          f"{ev['seconds']:.1f}s -> {join_path(output, EVALUATION_JSON)}, {EVALUATION_MD}, {PAIRS_CSV}", flush=True)
