"""Generation outputs: parquet shards + PNG shard folders, written atomically, resumable.

<output_dir>/
    generation.json                 the arguments that decide the pixels (checked on every rerun)
    parquet/part-<first>-<last>-n<rows>.parquet   many rows each; a pair counts as made once its row is here
    png/shard_SSSS/pair_PPPPPP/     cf.png fa.png joint.png cf_fa_chessboard.png (at most 1000 pairs a shard)
      or 1/, 2/, ...                with --png_layout seed (seed B's layout)
    summary.json                    counts, arguments, checkpoint, pairs/s

A write task first publishes the PNG folders of its rows, then the parquet shard (temporary name,
then rename): the parquet row is the commit. A killed job leaves at most PNG folders of uncommitted
pairs, which the rerun makes again, byte for byte, and replaces.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cffa_ray import stop_signals
from cffa_ray.config import PNG_LAYOUT_ALIASES
from cffa_ray.errors import ConfigError
from cffa_ray.images import PAIR_FILES, pair_pngs
from cffa_ray.io import (
    atomic_write_bytes,
    atomic_write_text,
    changed_fields,
    filesystem,
    publish_dir,
    remove_paths,
    staging_dir,
)
from cffa_ray.paths import join_path
from cffa_ray.shared_storage import check_driver_record

PARQUET_DIR, PNG_DIR = "parquet", "png"
IDENTITY_FILE, SUMMARY_FILE = "generation.json", "summary.json"
PAIRS_PER_PNG_SHARD = 1000
PNG_COLUMNS = {name: name.replace(".png", "_png") for name in PAIR_FILES}  # cf.png -> cf_png
PARQUET_SCHEMA = pa.schema([
    ("pair_id", pa.int64()), ("seed", pa.int64()), ("cf_png", pa.binary()), ("fa_png", pa.binary()),
    ("mode", pa.string()), ("steps", pa.int32()), ("scheduler", pa.string()),
    ("strength", pa.float64()),          # null in noise mode
    ("source_pair_id", pa.string()),     # null in noise mode
    ("checkpoint", pa.string()), ("model", pa.string()), ("resolution", pa.int32()),
])


def pair_folder(output_dir: str, pair_id: int, layout: str = "sharded") -> str:
    """sharded: png/shard_SSSS/pair_PPPPPP; seed: <pair_id + 1>/ in the output folder (seed B's 1/, 2/, ...)."""
    if layout == "seed":
        return join_path(output_dir, str(pair_id + 1))
    return join_path(output_dir, PNG_DIR, f"shard_{pair_id // PAIRS_PER_PNG_SHARD:04d}", f"pair_{pair_id:06d}")


# ------------------------------------------------------------------ identity and resume

def check_identity(output_dir: str, identity: dict) -> None:
    """Refuse to mix pairs made with other pixel-deciding arguments into one output folder.

    A folder with no finished pair (e.g. a run that failed before its first shard) blocks nothing.
    """
    diffs = changed_fields(join_path(output_dir, IDENTITY_FILE), identity, aliases={"png_layout": PNG_LAYOUT_ALIASES})
    if diffs and done_pair_ids(output_dir):
        raise ConfigError(f"--output_dir {output_dir} holds pairs made with different arguments "
                          f"({'; '.join(diffs)}); use another --output_dir or the original arguments")


def write_identity(output_dir: str, identity: dict) -> None:
    atomic_write_text(join_path(output_dir, IDENTITY_FILE), json.dumps(identity, indent=2, sort_keys=True))


def parquet_shards(output_dir: str) -> list[str]:
    """Committed parquet shards (temporary files start with '.')."""
    fs, p = filesystem(join_path(output_dir, PARQUET_DIR))
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                  and not i.base_name.startswith("."))


def done_pair_ids(output_dir: str) -> set[int]:
    """Pair ids already committed to parquet shards (only the pair_id column is read)."""
    fs, _ = filesystem(output_dir)
    done: set[int] = set()
    for path in parquet_shards(output_dir):
        done.update(pq.read_table(path, columns=["pair_id"], filesystem=fs)["pair_id"].to_pylist())
    return done


def resume_hint(output_dir: str, num_samples: int) -> str:
    """What a Ctrl-C leaves: finished pairs are kept (committed shards); the rerun makes only the rest."""
    try:
        done = len(done_pair_ids(output_dir))
    except Exception:  # the folder may not exist yet, or be mid-write
        done = 0
    return (f"generation {stop_signals.interrupted()} with {done} of {num_samples} pairs finished in {output_dir}; "
            "rerun the same command to make the rest")


def remove_leftovers(output_dir: str) -> int:
    """Delete the hidden staging files a killed job left beside its outputs; returns how many.

    Local folders and file:// only: object stores never show a key before its upload completes.
    """
    fs, root = filesystem(output_dir)
    if not isinstance(fs, pafs.LocalFileSystem):
        return 0
    root = Path(root)
    junk = [*root.glob(f"{PNG_DIR}/shard_*/.pair_*"), *root.glob(f"{PARQUET_DIR}/.part-*"), *root.glob(".[0-9]*.tmp-*"),
            *root.glob(".[0-9]*.old-*")]
    return remove_paths(junk)


def write_summary(output_dir: str, summary: dict) -> None:
    atomic_write_text(join_path(output_dir, SUMMARY_FILE), json.dumps(summary, indent=2, sort_keys=True))


# ------------------------------------------------------------------ CPU stage: images -> PNG bytes

def encode_pngs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data map_batches fn: uint8 cf, fa [B, R, R, 3] -> the four PNG byte columns."""
    encoded = [pair_pngs(cf, fa) for cf, fa in zip(batch["cf"], batch["fa"])]
    out = {k: v for k, v in batch.items() if k not in ("cf", "fa")}
    for fname, column in PNG_COLUMNS.items():
        out[column] = np.array([e[fname] for e in encoded], dtype=object)
    return out


# ------------------------------------------------------------------ CPU stage: the writer

def write_pair_shard(batch: pa.Table, output_dir: str, constants: dict, layout: str) -> dict[str, np.ndarray]:
    """Ray Data map_batches fn (one call per --rows_per_shard rows): PNG folders for every row, then
    one parquet shard, the commit. Returns one row per model-actor call it holds, for the driver's
    progress and rates: {actor, done_at float64, pairs int64, gpu_peak int64}.

    `constants`: the PARQUET_SCHEMA columns that are the same for every row of this run; `layout`:
    how the PNG folders are laid out (`pair_folder`).
    """
    # a node that joined after the driver's probe may see another folder here (shared_storage.py)
    check_driver_record(join_path(output_dir, IDENTITY_FILE), "--output_dir", output_dir)
    rows = batch.to_pydict()
    n = batch.num_rows
    for i, pair_id in enumerate(rows["pair_id"]):
        final = pair_folder(output_dir, int(pair_id), layout)
        stage = staging_dir(final)
        for fname, column in PNG_COLUMNS.items():
            (stage / fname).write_bytes(rows[column][i])  # the staging folder is hidden already
        publish_dir(stage, final)
    columns = {name: rows[name] if name in rows else [constants.get(name)] * n for name in PARQUET_SCHEMA.names}
    shard = pa.Table.from_pydict(columns, schema=PARQUET_SCHEMA).sort_by("pair_id")
    ids = shard["pair_id"].to_pylist()
    # named by content, so a retried write task replaces its own shard instead of adding a copy
    name = f"part-{ids[0]:06d}-{ids[-1]:06d}-n{len(ids)}.parquet"
    _write_parquet_atomic(shard, join_path(output_dir, PARQUET_DIR, name))
    calls: dict[tuple, tuple[int, int]] = {}  # (actor, done_at) -> (pairs, peak): one entry per model call
    for key, peak in zip(zip(rows["actor"], rows["done_at"]), rows["gpu_peak"]):
        count, top = calls.get(key, (0, 0))
        calls[key] = (count + 1, max(top, peak))
    return {"actor": np.array([a for a, _ in calls], dtype=object), "done_at": np.array([t for _, t in calls]),
            "pairs": np.array([c for c, _ in calls.values()], np.int64),
            "gpu_peak": np.array([p for _, p in calls.values()], np.int64)}


def _write_parquet_atomic(table: pa.Table, path: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())
