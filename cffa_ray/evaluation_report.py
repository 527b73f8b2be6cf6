"""`cffa report EVAL_DIR`: report.html of a `cffa evaluate` output folder, from its evaluation.json.

One self-contained page: the headline of each ruler first (alignment, realism, vessel topology,
memorisation, utility), then their tables. It reads the JSON only (no evaluate/ import: this module
sits below the jobs), so it renders any evaluation.json the evaluate job wrote.
"""
from __future__ import annotations

import html
import json
import math

from cffa_ray.errors import DataError
from cffa_ray.io import atomic_write_text, read_text
from cffa_ray.paths import join_path

EVALUATION_JSON, REPORT_HTML = "evaluation.json", "report.html"


def is_evaluation(folder: str) -> bool:
    """Whether `folder` is a `cffa evaluate` output (it has evaluation.json)."""
    try:
        return read_text(join_path(folder, EVALUATION_JSON)) is not None
    except Exception:  # an unreadable location is not an evaluation; write_report names the problem
        return False


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def headline(ev: dict) -> list[str]:
    """One line per ruler, the numbers to read first."""
    a, r = ev["alignment"], ev["realism"]
    lines = [f"alignment normalised {_f(a.get('normalised'))} (0 unrelated, 1 as aligned as real pairs)",
             f"realism SWD CF {_f(r['cf']['mean'], 1)} / FA {_f(r['fa']['mean'], 1)} (real vs real "
             f"{_f(r['cf']['real_vs_real'], 1)} / {_f(r['fa']['real_vs_real'], 1)})"]
    if t := ev.get("topology"):
        lines.append("vessel topology, max |d| generated vs real: " + ", ".join(
            f"{m.upper()} {_f(t[m]['max_abs_d'], 2)} ({t[m]['worst']}){' FAR' if t[m]['far'] else ''}"
            for m in ("cf", "fa")))
    if mem := ev.get("memorisation"):
        flagged = ", ".join(f"{m.upper()} {_f(100 * mem[m]['fraction_above'], 1)}%" for m in ("cf", "fa"))
        lines.append(f"memorisation, generated images closer to a training image than 99% of held-out ones: {flagged}")
    elif ev.get("memorisation_skipped"):
        lines.append(f"memorisation not measured: {ev['memorisation_skipped']}")
    if u := ev.get("utility"):
        s = u["scores"]
        lines.append(f"utility (TSTR) ratio synthetic / real: vessel Dice {_f(s['dice']['ratio'])}, SSIM "
                     f"{_f(s['ssim']['ratio'])}, PSNR {_f(s['psnr']['ratio'])} "
                     f"(seed spread {_f(s['dice']['seed_spread'])})")
    return lines


def _sections(ev: dict) -> list[str]:
    a = ev["alignment"]
    out = ["<h2>Paired alignment (vessel soft Dice)</h2>", _table(
        ["pairs", "mean", "std", "n"],
        [[name, _f(a[k]["mean"], 4), _f(a[k]["std"], 4), _f(a[k]["n"])] for name, k in
         (("generated", "generated"), ("real (ceiling)", "real"), ("real, mismatched (floor)", "mismatched"),
          ("generated, mismatched", "generated_mismatched"))])]
    out += ["<h2>Realism (SWD x1e3)</h2>", _table(
        ["modality", "mean", "real vs real"],
        [[m.upper(), _f(ev["realism"][m]["mean"], 2), _f(ev["realism"][m]["real_vs_real"], 2)] for m in ("cf", "fa")])]
    if t := ev.get("topology"):
        rows = [[m.upper(), k, f"{_f(v['generated']['mean'])} ± {_f(v['generated']['std'])}",
                 f"{_f(v['real']['mean'])} ± {_f(v['real']['std'])}", _f(v["d"], 2)]
                for m in ("cf", "fa") for k, v in t[m].items() if isinstance(v, dict)]
        out += ["<h2>Vessel topology</h2>", f"<p>{html.escape(t.get('method', ''))}</p>",
                _table(["modality", "measure", "generated", "real", "d"], rows)]
    if mem := ev.get("memorisation"):
        rows = [[m.upper(), _f(mem[m]["generated"]["mean"]), _f(mem[m]["generated"]["max"]),
                 _f(mem[m]["held_out"]["mean"]), _f(mem[m]["held_out"]["max"]), _f(mem[m]["threshold"]),
                 f"{_f(100 * mem[m]['fraction_above'], 1)}%"] for m in ("cf", "fa")]
        out += ["<h2>Memorisation (cosine to the nearest training image)</h2>",
                _table(["modality", "generated mean", "generated max", "held-out mean", "held-out max",
                        "threshold", "flagged"], rows),
                "<h3>Closest generated-training pairs</h3>",
                _table(["modality", "generated pair", "training file", "cosine"],
                       [[c["modality"].upper(), _f(c["generated_pair_id"]), f"<code>{_f(c['train_file'])}</code>",
                         _f(c["similarity"])] for c in mem["closest"]])]
    if u := ev.get("utility"):
        rows = [[k, _f(s["synthetic"]["mean"]), _f(s["real"]["mean"]), f"<b>{_f(s['ratio'])}</b>", _f(s["seed_spread"])]
                for k, s in u["scores"].items()]
        out += ["<h2>Utility: train on synthetic, test on real</h2>",
                f"<p>{u['steps']} steps, seed {u['seed']}; pairs: {html.escape(json.dumps(u['pairs']))}</p>",
                _table(["score", "synthetic", "real", "ratio", "seed spread"], rows)]
    return out


def write_evaluation_report(folder: str) -> str:
    """Write folder/report.html from folder/evaluation.json; returns its path."""
    text = read_text(join_path(folder, EVALUATION_JSON))
    try:
        ev = json.loads(text or "")
        title = f"cffa evaluation: {ev['generated']['path']}"
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{join_path(folder, EVALUATION_JSON)} is not an evaluation written by `cffa evaluate`; "
                        "rerun `cffa evaluate --output` into this folder") from None
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}"
            "td,th{padding:3px 8px;border-bottom:1px solid #ddd;font-size:13px;text-align:left}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f"<p>{ev['generated']['pairs']} generated pairs against {ev['real']['pairs']} real pairs "
            f"(<code>{html.escape(str(ev['real']['path']))}</code>) at {ev['resolution']} px</p><ul>"]
    page += [f"<li>{line}</li>" for line in headline(ev)]
    page += ["</ul>", *_sections(ev), "</body></html>"]
    out = join_path(folder, REPORT_HTML)
    atomic_write_text(out, "\n".join(page))
    return out
