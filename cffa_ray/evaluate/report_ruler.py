"""evaluation.md sections and printed lines of the second ruler: topology, memorisation, utility (TSTR)."""
from __future__ import annotations

import math

from cffa_ray.evaluate.topology import FAR, MEASURES

UTILITY_NAMES = {"dice": "vessel Dice", "ssim": "SSIM", "psnr": "PSNR"}


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pct(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def topology_line(t: dict) -> str:
    parts = []
    for m in ("cf", "fa"):
        loops = t[m]["loops"]
        parts.append(f"{m.upper()} loops {fmt(loops['generated']['mean'], 2)} vs {fmt(loops['real']['mean'], 2)}, "
                     f"max |d| {fmt(t[m]['max_abs_d'], 2)} ({t[m]['worst']}){', FAR' if t[m]['far'] else ''}")
    return (f"[cffa] topology (generated vs real vessel maps, loops per image; |d| standardised difference, > {FAR:g} "
            "= far): " + " | ".join(parts))


def memorisation_line(ev: dict) -> str:
    mem = ev.get("memorisation")
    if not mem:
        return f"[cffa] memorisation: not measured ({ev.get('memorisation_skipped', 'no training set')})"
    parts = [f"{m.upper()} {_pct(mem[m]['fraction_above'])} flagged (nearest {fmt(mem[m]['generated']['mean'])} vs "
             f"held-out {fmt(mem[m]['held_out']['mean'])}, threshold {fmt(mem[m]['threshold'])})" for m in ("cf", "fa")]
    return ("[cffa] memorisation (cosine to the nearest training image; flagged: above the held-out 99th percentile): "
            + " | ".join(parts))


def utility_line(u: dict) -> str:
    s = u["scores"]
    ratios = " | ".join(f"{UTILITY_NAMES[k]} {fmt(s[k]['ratio'])}" for k in UTILITY_NAMES)
    spread = " | ".join(fmt(s[k]["seed_spread"]) for k in UTILITY_NAMES)
    return (f"[cffa] utility (TSTR ratio synthetic / real, 1 = as useful as {u['pairs']['real']} real pairs): {ratios}"
            f" (seed spread {spread})")


def summary_lines(ev: dict) -> list[str]:
    lines = [topology_line(ev["topology"])] if ev.get("topology") else []
    if "memorisation" in ev:
        lines.append(memorisation_line(ev))
    if ev.get("utility"):
        lines.append(utility_line(ev["utility"]))
    return lines


def _ms(stat: dict, digits: int) -> str:
    return f"{fmt(stat['mean'], digits)} ± {fmt(stat['std'], digits)}"


def markdown_lines(ev: dict) -> list[str]:
    """The evaluation.md sections of topology, memorisation and utility (empty where absent)."""
    lines: list[str] = []
    t = ev.get("topology")
    if t:
        lines += ["", "## Vessel topology (are the vessels trees?)", "",
                  "Thresholded, skeletonised vessel maps; d = (generated - real) / pooled std, "
                  f"|d| > {FAR:g} flagged **far**. A tree has (almost) no loops; a mesh has many, short segments "
                  "and many branch points.", "",
                  "| modality | measure | generated | real | d |", "|---|---|---|---|---|"]
        for m in ("cf", "fa"):
            for k in MEASURES:
                r = t[m][k]
                far = " **far**" if math.isfinite(r["d"]) and abs(r["d"]) > FAR else ""
                lines.append(f"| {m.upper()} | {k} | {_ms(r['generated'], 3)} | {_ms(r['real'], 3)} | "
                             f"{fmt(r['d'], 2)}{far} |")
    mem = ev.get("memorisation")
    if mem:
        tr, ho = mem["train"], mem["held_out"]
        lines += ["", "## Memorisation (nearest training image)", "",
                  f"Training set `{tr['path']}` ({tr['pairs']} pairs, {tr['from']}); "
                  f"held-out `{ho['path']}` ({ho['pairs']} pairs, {ho['from']}). "
                  "Cosine of band-pass 64 px embeddings (1 = the same image). A generated image is flagged when it "
                  "is closer to a training image than 99% of held-out images are.", "",
                  "| modality | generated: mean / median / max | held-out: mean / median / max | threshold | flagged |",
                  "|---|---|---|---|---|"]
        for m in ("cf", "fa"):
            g, h = mem[m]["generated"], mem[m]["held_out"]
            lines.append(f"| {m.upper()} | {fmt(g['mean'])} / {fmt(g['median'])} / {fmt(g['max'])} | "
                         f"{fmt(h['mean'])} / {fmt(h['median'])} / {fmt(h['max'])} | {fmt(mem[m]['threshold'])} | "
                         f"{_pct(mem[m]['fraction_above'])} |")
        lines += ["", "Closest generated-training pairs (all in pairs.csv, columns nn_*):", "",
                  "| modality | generated pair | training file | cosine |", "|---|---|---|---|"]
        lines += [f"| {c['modality'].upper()} | {c['generated_pair_id']} | `{c['train_file']}` | "
                  f"{fmt(c['similarity'])} |" for c in mem["closest"]]
    elif "memorisation_skipped" in ev:
        lines += ["", "## Memorisation", "", f"Not measured: {ev['memorisation_skipped']}."]
    u = ev.get("utility")
    if u:
        p = u["pairs"]
        lines += ["", "## Utility: train on synthetic, test on real (TSTR)", "",
                  f"A small CF->FA UNet, {u['steps']} steps from seed {u['seed']}, trained on {p['synthetic']} "
                  f"generated pairs and on {p['real']} real training pairs, scored on {p['test']} held-out real "
                  "pairs. Ratio 1: the generated pairs teach as much as real ones. Seed spread: how far the real "
                  "training lands from itself with the next seed (the ratio's noise).", "",
                  "| score | synthetic | real | ratio | seed spread |", "|---|---|---|---|---|"]
        for k, name in UTILITY_NAMES.items():
            s = u["scores"][k]
            lines.append(f"| {name} | {_ms(s['synthetic'], 3)} | {_ms(s['real'], 3)} | **{fmt(s['ratio'])}** | "
                         f"{fmt(s['seed_spread'])} |")
    return lines
