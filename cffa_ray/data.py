"""Pairs in: discovery (a cf/ + fa/ folder or a manifest, local or URI) and the train/validation split.

A pair record is a dict {pair_id: str, cf_path: str, fa_path: str, split: "train" | "val"}; the column
names of records and decoded batches are defined here once. Decoding the images: decoding.py.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path, PurePosixPath

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cffa_ray.errors import DataError, first_few
from cffa_ray.io import filesystem
from cffa_ray.paths import is_uri

PAIR_ID, CF, FA, CF_PATH, FA_PATH, SPLIT, ERROR = "pair_id", "cf", "fa", "cf_path", "fa_path", "split", "error"
WARNING = "warning"
TRAIN, VAL = "train", "val"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


# ------------------------------------------------------------------ discovery

def discover_pairs(data: str) -> list[dict]:
    """Pair records from a cf/ + fa/ folder or a .csv/.parquet manifest (local or URI)."""
    lower = data.lower().rstrip("/")
    if lower.endswith((".csv", ".parquet")):
        records = _from_manifest(data)
    else:
        records = _from_folder(data)
    if not records:
        raise DataError(f"--data {data} holds no pairs; expected cf/ and fa/ images or manifest rows")
    ids = [r[PAIR_ID] for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"--data {data}: pair_id repeated: {first_few(dup, ', ', 5)}; pair ids must be unique")
    return records


def _list_images(folder: str) -> dict[str, str]:
    """stem -> path for the image files directly in `folder`."""
    if is_uri(folder):
        fs, p = filesystem(folder)
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
        scheme = folder.split("://", 1)[0]
        files = [f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File]
    else:
        files = [str(f) for f in Path(folder).iterdir() if f.is_file()] if Path(folder).is_dir() else []
    out = {}
    for f in sorted(files):
        name = PurePosixPath(f).name
        stem, suffix = os.path.splitext(name)
        if suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
            if stem in out:
                raise DataError(f"two images share the stem {stem!r} in {folder}: {out[stem]} and {f}")
            out[stem] = f
    return out


def _from_folder(data: str) -> list[dict]:
    if not is_uri(data) and not Path(data).exists():
        raise DataError(f"--data {data} does not exist; give a folder with cf/ and fa/ or a manifest")
    data = data if is_uri(data) else os.path.abspath(data)  # Ray tasks may not share our cwd
    sep = "/" if is_uri(data) else os.sep
    cf = _list_images(data.rstrip("/") + sep + "cf")
    fa = _list_images(data.rstrip("/") + sep + "fa")
    if not cf and not fa:
        raise DataError(f"--data {data} has no images in cf/ and fa/ (png, jpg, tif); "
                        "put CF images in cf/ and FA images with the same file stems in fa/")
    _check_matched(sorted(cf.keys() - fa.keys()), cf, "CF", "FA", "fa/")
    _check_matched(sorted(fa.keys() - cf.keys()), fa, "FA", "CF", "cf/")
    return [{PAIR_ID: s, CF_PATH: cf[s], FA_PATH: fa[s], SPLIT: None} for s in sorted(cf)]


def _check_matched(lonely: list[str], paths: dict[str, str], have: str, missing: str, folder: str) -> None:
    if lonely:
        names = first_few([paths[s] for s in lonely], ", ", 5)
        raise DataError(f"{len(lonely)} {have} image(s) have no {missing} partner with the same stem "
                        f"in {folder}: {names}")


def _read_manifest_rows(data: str) -> list[dict]:
    fs, p = filesystem(data)
    if data.lower().endswith(".parquet"):
        try:
            return pq.read_table(p, filesystem=fs).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"manifest {data} is not a readable parquet file ({_first_line(e)}); "
                            f"write it with pandas.DataFrame.to_parquet or give a .csv") from None
    try:
        with fs.open_input_stream(p) as f:
            text = f.read().decode("utf-8-sig")
        if "\x00" in text:
            raise ValueError("it holds NUL bytes")
        # every cell as text, as written (pair id 007 stays 007), empty cells as ""
        rows = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False).to_dict("records")
    except pd.errors.EmptyDataError:
        return []
    except (UnicodeDecodeError, ValueError, pd.errors.ParserError) as e:
        raise DataError(f"manifest {data} is not a CSV text file ({_first_line(e)}); it needs a header row "
                        f"with {CF_PATH},{FA_PATH} and one row per pair, in UTF-8") from None
    return rows


def _first_line(e: BaseException) -> str:
    return _clip((str(e).strip().splitlines() or [type(e).__name__])[0])


def _clip(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())  # one line, whatever the file held
    return text if len(text) <= limit else text[:limit] + "..."


def _from_manifest(data: str) -> list[dict]:
    if not is_uri(data) and not Path(data).is_file():
        raise DataError(f"manifest --data {data} does not exist")
    rows = _read_manifest_rows(data)
    if rows and not {CF_PATH, FA_PATH} <= rows[0].keys():
        found = ", ".join(str(k) for k in rows[0])
        raise DataError(f"manifest {data} needs columns {CF_PATH} and {FA_PATH}; it has {_clip(found)}")
    base = data.rsplit("/", 1)[0] if is_uri(data) else str(Path(data).resolve().parent)
    records = []
    for i, row in enumerate(rows):
        cf, fa = row.get(CF_PATH), row.get(FA_PATH)
        if not cf or not fa:
            raise DataError(f"manifest {data} row {i + 2}: {CF_PATH} or {FA_PATH} is empty; "
                            "every row needs both images of the pair")
        split = (row.get(SPLIT) or None) and str(row[SPLIT]).strip().lower()
        if split not in (None, TRAIN, VAL):
            raise DataError(f"manifest {data} row {i + 2}: split {row[SPLIT]!r}; use train or val")
        records.append({
            PAIR_ID: str(row.get(PAIR_ID) or PurePosixPath(str(cf)).stem),
            CF_PATH: _resolve(str(cf), base), FA_PATH: _resolve(str(fa), base), SPLIT: split,
        })
    missing = [p for r in records for p in (r[CF_PATH], r[FA_PATH]) if not is_uri(p) and not Path(p).is_file()]
    if missing:
        raise DataError(f"manifest {data} names {len(missing)} missing file(s): {first_few(missing, ', ', 5)}")
    return records


def _resolve(path: str, base: str) -> str:
    if is_uri(path) or os.path.isabs(path):
        return path
    return f"{base}/{path}" if is_uri(base) else str(Path(base, path))


def assign_split(records: list[dict], val_fraction: float, seed: int) -> list[dict]:
    """Fill missing splits deterministically: the pairs with the smallest hash(seed, pair_id) go to val.

    A manifest that names splits keeps them. At least one val pair when val_fraction > 0 and there
    are two or more pairs.
    """
    if all(r[SPLIT] for r in records):
        return records
    free = sorted((r for r in records if not r[SPLIT]),
                  key=lambda r: hashlib.sha256(f"{seed}:{r[PAIR_ID]}".encode()).hexdigest())
    n_val = int(round(len(free) * val_fraction))
    if val_fraction > 0 and len(free) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(free) - 1)
    val_ids = {r[PAIR_ID] for r in free[:n_val]}
    return [{**r, SPLIT: r[SPLIT] or (VAL if r[PAIR_ID] in val_ids else TRAIN)} for r in records]
