"""What `cffa evaluate` reads: the generated pairs (a `cffa generate` output or a pairs folder) and
the real pairs (a folder or manifest, as for training). Driver side: small metadata only; the
images are read by the Ray Data tasks.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from cffa_ray.data import CF_PATH, FA_PATH, PAIR_ID, discover_pairs
from cffa_ray.errors import ConfigError, DataError
from cffa_ray.io import filesystem, read_bytes, read_text
from cffa_ray.paths import is_uri, join_path

GENERATED, REAL = "generated", "real"
META_COLUMNS = ("pair_id", "mode", "steps", "scheduler", "strength", "source_pair_id", "checkpoint", "model",
                "resolution")
IDENTITY_KEYS = ("checkpoint", "trained_steps", "model", "resolution", "mode", "steps", "scheduler", "seed",
                 "strength", "data", "fa_noise", "struct_guidance", "struct_guidance_target")


@dataclass
class GeneratedSet:
    """The generated pairs: parquet shards of a `cffa generate` output, or records of a pairs folder."""

    path: str
    shards: list[str] = field(default_factory=list)      # parquet files (URIs keep their scheme)
    rows: list[dict] = field(default_factory=list)       # parquet: META_COLUMNS; folder: pair records
    identity: dict | None = None                         # how the pairs were made (None: a pairs folder)

    @property
    def from_parquet(self) -> bool:
        return bool(self.shards)

    @property
    def from_data_sources(self) -> dict[str, int]:
        """source_pair_id -> how many generated pairs start from it (from_data outputs)."""
        counts: dict[str, int] = {}
        for row in self.rows:
            if row.get("mode") == "from_data" and row.get("source_pair_id"):
                counts[row["source_pair_id"]] = counts.get(row["source_pair_id"], 0) + 1
        return counts


def discover_with_flag(path: str, flag: str) -> list[dict]:
    """discover_pairs, with its messages naming `flag` (it speaks of --data, the training flag)."""
    try:
        return discover_pairs(path)
    except DataError as e:
        raise DataError(str(e).replace("--data", flag)) from None


def _committed_shards(parquet_dir: str) -> list[str]:
    fs, p = filesystem(parquet_dir)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    names = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                   and not i.base_name.startswith("."))  # hidden: a write still in progress
    scheme = parquet_dir.split("://", 1)[0] + "://" if is_uri(parquet_dir) else ""
    return [scheme + n for n in names]


def _exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_generated(path: str) -> GeneratedSet:
    """Pairs to evaluate from --generated: its parquet/ if it has one, else cf/ + fa/ images."""

    if not _exists(path):
        raise DataError(f"--generated {path} does not exist; give a `cffa generate` output folder "
                        "(with parquet/) or a folder of pairs (cf/, fa/)")
    shards = _committed_shards(join_path(path, "parquet"))
    if not shards:
        if _exists(join_path(path, "cf")) or _exists(join_path(path, "fa")):
            return GeneratedSet(path, rows=discover_with_flag(path, "--generated"))
        raise DataError(f"--generated {path} holds no generated pairs (no parquet/*.parquet) and no cf/ + fa/ "
                        "images; give the --output_dir of `cffa generate` or a pairs folder")
    fs, _ = filesystem(path)
    rows = []
    for shard in shards:
        local = filesystem(shard)[1]
        with fs.open_input_file(local) as f:
            names = pq.read_schema(f).names
        columns = [c for c in META_COLUMNS if c in names]  # not the PNG bytes: the tasks read those
        rows.extend(pq.read_table(local, filesystem=fs, columns=columns).to_pylist())
    if not rows:
        raise DataError(f"--generated {path}: its parquet shards hold no rows; run `cffa generate` into it first")
    text = read_text(join_path(path, "generation.json"))
    identity = json.loads(text) if text else {}
    if identity.get("model") == "dual_unet":
        identity.setdefault("fa_noise", "same")  # generation.json names these only when not the default
        identity.setdefault("struct_guidance", 0.0)
        if identity["struct_guidance"]:
            identity.setdefault("struct_guidance_target", "latent_edges")
    for key in IDENTITY_KEYS:  # shards written by any version carry these per row
        if key not in identity and key in rows[0]:
            identity[key] = rows[0][key]
    return GeneratedSet(path, shards=shards, rows=rows,
                        identity={k: identity.get(k) for k in IDENTITY_KEYS if k in identity})


def read_real(path: str) -> list[dict]:
    """Real pair records from --real, sorted by pair id (neighbours make the mismatched floor)."""
    records = sorted(discover_with_flag(path, "--real"), key=lambda r: r[PAIR_ID])
    if len(records) < 2:
        raise DataError(f"--real {path} has {len(records)} pair; the mismatched floor needs at least 2 real pairs")
    return records


def generated_resolution(generated: GeneratedSet) -> int:
    """The side of the generated images: from the parquet rows, else the first CF image's size."""
    if generated.from_parquet and generated.rows[0].get("resolution"):
        return int(generated.rows[0]["resolution"])



    first = generated.rows[0][CF_PATH]
    try:
        return int(Image.open(io.BytesIO(read_bytes(first))).size[0])
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"cannot read image {first}: {e}; pass --resolution or replace the file") from None


def source_paths(generated: GeneratedSet, real: list[dict]) -> tuple[dict[str, list[str]], int]:
    """({source_pair_id: [cf_path, fa_path]} for from_data pairs whose source is in --real, count missing)."""
    by_id = {r[PAIR_ID]: [r[CF_PATH], r[FA_PATH]] for r in real}
    wanted = generated.from_data_sources
    found = {k: by_id[k] for k in wanted if k in by_id}
    return found, sum(n for k, n in wanted.items() if k not in by_id)


def check_output(output: str) -> None:
    fs, p = filesystem(output)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.File:
        raise ConfigError(f"--output {output} is a file; give a folder for evaluation.json and evaluation.md")
