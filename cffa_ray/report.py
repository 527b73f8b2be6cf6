"""`cffa report RUN_DIR`: one self-contained report.html of a training run, and PNGs beside it.

    RUN_DIR/report.html          loss curves and the preview gallery, images inlined (base64): one file to open
    RUN_DIR/report_losses.png    training (solid) and validation (dashed) curves, one panel per term
    RUN_DIR/report_gallery.png   preview pairs over steps: rows = steps, columns = pairs, each CF | FA | chessboard

Read from the run folder (local or s3:// / gs://): training_log.txt and validation_log.txt
(`step=000010 loss=... loss_cf=...` lines), step_XXXXXX_random_pairs/pair_NN/{cf,fa,cf_fa_chessboard}.png.
Also written at the end of every `cffa train` run. A long run has many preview steps: the gallery
shows at most MAX_GALLERY_ROWS of them, evenly spaced, always the first and the last.
"""
from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import pyarrow.fs as pafs
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw

from cffa_ray.errors import DataError, first_few, warn
from cffa_ray.io import atomic_write_bytes, atomic_write_text, filesystem, read_bytes, read_text
from cffa_ray.paths import join_path
from cffa_ray.run_layout import RUN_RECORD, SAMPLES_DIR, TRAINING_LOG, VALIDATION_LOG, parse_log_line

REPORT_HTML, LOSSES_PNG, GALLERY_PNG = "report.html", "report_losses.png", "report_gallery.png"
PAIR_DIR = re.compile(r"^pair_\d+$")
CELL_FILES = ("cf.png", "fa.png", "cf_fa_chessboard.png")
NOT_LOSSES = re.compile(r"(^lr$|_per_s$|^gpu_|_gib$)")  # logged beside the losses (rate, memory), not losses
PANEL_ORDER = ("loss", "mse", "hf", "struct")
MAX_GALLERY_ROWS, THUMB = 12, 128


# ------------------------------------------------------------------ logs -> curves

def parse_log(text: str, name: str = "log") -> dict[str, list[tuple[int, float]]]:
    """`step=000010 a=1.5 b=2` lines -> {"a": [(10, 1.5), ...], "b": [...]}. Lines that are not whole log
    lines (run_layout.parse_log_line) are skipped, with one warning naming them (`name`: the log file)."""
    series: dict[str, list[tuple[int, float]]] = {}
    malformed = []
    for number, line in enumerate(text.splitlines(), 1):
        parsed = parse_log_line(line)
        if parsed is None:
            if line.strip():
                malformed.append(f"line {number}: {line.strip()[:80]!r}")
            continue
        step, values = parsed
        for key, value in values.items():
            series.setdefault(key, []).append((step, value))
    if malformed:
        warn(f"{name}: skipped {len(malformed)} malformed line(s) ({first_few(malformed)}); the curves leave them out")
    return series


def loss_panels(train: dict, val: dict) -> dict[str, list[str]]:
    """Panel title -> loss terms in it: a term and its per-modality parts share a panel (loss, loss_cf,
    loss_fa; mse_cf, mse_fa; hf_cf, hf_fa; struct). Validation terms are the same names minus `val_`."""
    terms = [k for k in train if not NOT_LOSSES.search(k)]
    terms += [k[4:] for k in val if k.startswith("val_") and k[4:] not in terms]
    panels: dict[str, list[str]] = {}
    for term in terms:
        panels.setdefault(re.sub(r"_(cf|fa)$", "", term), []).append(term)
    order = {name: i for i, name in enumerate(PANEL_ORDER)}
    return dict(sorted(panels.items(), key=lambda kv: order.get(kv[0], len(order))))


def plot_losses(train: dict, val: dict) -> bytes:
    """PNG of one panel per loss term group: training solid, validation dashed with markers."""

    panels = loss_panels(train, val)
    cols = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig = Figure(figsize=(5 * cols, 3.4 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, terms) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, term in enumerate(terms):
            color = f"C{j}"
            if term in train:
                steps, values = zip(*train[term])
                ax.plot(steps, values, color=color, label=f"train {term}")
            if f"val_{term}" in val:
                steps, values = zip(*val[f"val_{term}"])
                ax.plot(steps, values, color=color, linestyle="--", marker="o", markersize=3, label=f"val {term}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not panels:
        fig.text(0.5, 0.5, "no loss lines logged yet", ha="center", va="center")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------ previews -> gallery

def _listdir(path: str) -> list[str]:
    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def preview_steps(run_dir: str) -> list[tuple[int, list[str]]]:
    """[(step, [pair folder paths])] of every step_XXXXXX_random_pairs/, by step."""
    out = []
    for name in _listdir(run_dir):
        m = SAMPLES_DIR.match(name)
        if m:
            folder = join_path(run_dir, name)
            out.append((int(m.group(1)), [join_path(folder, p) for p in _listdir(folder) if PAIR_DIR.match(p)]))
    return sorted(out)


def pick_rows(steps: list, most: int = MAX_GALLERY_ROWS) -> list:
    """At most `most` items, evenly spaced, keeping the first and the last."""
    if len(steps) <= most:
        return list(steps)
    idx = np.unique(np.round(np.linspace(0, len(steps) - 1, most)).astype(int))
    return [steps[i] for i in idx]


def _thumb(path: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(read_bytes(path))).convert("RGB")
    except Exception:  # a missing or unreadable preview is shown as a grey tile, not a failed report
        return Image.new("RGB", (THUMB, THUMB), (96, 96, 96))
    return image.resize((THUMB, THUMB), Image.Resampling.LANCZOS if image.width > THUMB else Image.Resampling.NEAREST)


def gallery_cells(rows: list[tuple[int, list[str]]]) -> list[tuple[int, list[Image.Image]]]:
    """[(step, [one CF | FA | chessboard strip per pair])]."""
    out = []
    for step, pairs in rows:
        strips = []
        for pair in pairs:
            strip = Image.new("RGB", (THUMB * len(CELL_FILES), THUMB))
            for k, name in enumerate(CELL_FILES):
                strip.paste(_thumb(join_path(pair, name)), (k * THUMB, 0))
            strips.append(strip)
        out.append((step, strips))
    return out


def gallery_png(cells: list[tuple[int, list[Image.Image]]]) -> bytes:
    """One PNG: a step label, then that step's pair strips, one row per step."""
    label_w, gap, header = 110, 6, 22
    cols = max((len(s) for _, s in cells), default=0)
    cell_w = THUMB * len(CELL_FILES) + gap
    canvas = Image.new("RGB", (label_w + max(cols, 1) * cell_w, header + max(1, len(cells)) * (THUMB + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c in range(cols):
        draw.text((label_w + c * cell_w + 4, 5), f"pair {c:02d}: CF | FA | chessboard", fill="black")
    for r, (step, strips) in enumerate(cells):
        y = header + r * (THUMB + gap)
        draw.text((8, y + THUMB // 2 - 6), f"step {step}", fill="black")
        for c, strip in enumerate(strips):
            canvas.paste(strip, (label_w + c * cell_w, y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ html

def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _summary(train: dict, val: dict, n_steps: int, shown: int) -> list[str]:
    items = []
    if train.get("loss"):
        items.append(f"last training step {train['loss'][-1][0]}: loss {train['loss'][-1][1]:.4g}")
    if val.get("val_loss"):
        best = min(val["val_loss"], key=lambda sv: sv[1])
        items.append(f"best validation loss {best[1]:.4g} at step {best[0]} (best_checkpoint/)")
    items.append(f"{n_steps} preview step(s)" + (f", {shown} shown" if shown < n_steps else ""))
    return items


def render_html(run_dir: str, train: dict, val: dict, losses: bytes, cells: list, n_steps: int,
                run_record: str | None) -> str:
    esc = html.escape
    head = ("<!doctype html><html><head><meta charset='utf-8'><title>cffa report: " + esc(run_dir) + "</title>"
            "<style>body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse}"
            "td,th{padding:3px;text-align:center;font-size:13px}img.cell{width:300px;height:100px;"
            "image-rendering:pixelated}img.curves{max-width:100%}pre{background:#f4f4f4;padding:8px;overflow:auto}</style></head><body>")
    parts = [head, f"<h1>Training run <code>{esc(run_dir)}</code></h1><ul>"]
    parts += [f"<li>{esc(s)}</li>" for s in _summary(train, val, n_steps, len(cells))]
    parts.append("</ul><h2>Losses</h2><p>solid: training (training_log.txt), dashed: validation "
                 "(validation_log.txt)</p>")
    parts.append(f"<img class='curves' alt='loss curves' src='{_data_uri(losses, 'image/png')}'>")
    parts.append("<h2>Preview pairs over training</h2><p>rows: steps; columns: pairs "
                 "(the same starting noise at every step); each cell: CF | FA | chessboard</p>")
    if cells:
        cols = max(len(s) for _, s in cells)
        heads = "".join(f"<th>pair {c:02d}</th>" for c in range(cols))
        parts.append(f"<div style='overflow-x:auto'><table><tr><th>step</th>{heads}</tr>")
        for step, strips in cells:
            imgs = "".join(f"<td><img class='cell' alt='step {step} pair {c}' "
                           f"src='{_data_uri(_jpeg(s), 'image/jpeg')}'></td>" for c, s in enumerate(strips))
            parts.append(f"<tr><th>{step}</th>{imgs}</tr>")
        parts.append("</table></div>")
    else:
        parts.append("<p>no step_XXXXXX_random_pairs/ folders yet</p>")
    if run_record:
        parts.append(f"<h2>Settings (run.json)</h2><pre>{esc(run_record)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str) -> str:
    """Write report.html, report_losses.png, report_gallery.png into run_dir; returns the html path."""

    fs, p = filesystem(run_dir)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise DataError(f"RUN_DIR {run_dir} is not a folder; give a run folder written by `cffa train` "
                        "(<output_dir>/<name>)")
    train_text, val_text = read_text(join_path(run_dir, TRAINING_LOG)), read_text(join_path(run_dir, VALIDATION_LOG))
    steps = preview_steps(run_dir)
    if train_text is None and val_text is None and not steps:
        raise DataError(f"RUN_DIR {run_dir} has no {TRAINING_LOG}, {VALIDATION_LOG} or step_XXXXXX_random_pairs/; "
                        "give a run folder written by `cffa train` (<output_dir>/<name>)")
    train, val = parse_log(train_text or "", TRAINING_LOG), parse_log(val_text or "", VALIDATION_LOG)
    losses = plot_losses(train, val)
    cells = gallery_cells(pick_rows(steps))
    atomic_write_bytes(join_path(run_dir, LOSSES_PNG), losses)
    atomic_write_bytes(join_path(run_dir, GALLERY_PNG), gallery_png(cells))
    page = render_html(run_dir, train, val, losses, cells, len(steps), read_text(join_path(run_dir, RUN_RECORD)))
    out = join_path(run_dir, REPORT_HTML)
    atomic_write_text(out, page)
    return out
