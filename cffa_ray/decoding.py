"""Pairs decoded by Ray Data CPU tasks, once, with every bad file named and odd images counted.

Decoded batches (numpy, from `decode_batch`) hold:
    pair_id  object [B]            the record's id
    cf       uint8 [B, 3, R, R]    colour fundus, RGB (the model maps it to [-1, 1] on its device:
    fa       uint8 [B, 3, R, R]    angiogram, grey replicated to 3 channels   a quarter of float32's bytes)
    error    object [B]            "" or why the pair could not be decoded (its images are then zeros)
    warning  object [B]            "" or lines "kind<TAB>file details" (see pixels.WARNINGS)
How image modes and bit depths are converted: see pixels.py.
"""
from __future__ import annotations

import numpy as np
import ray.data
from PIL import Image

from cffa_ray.data import CF, CF_PATH, ERROR, FA, FA_PATH, PAIR_ID, WARNING
from cffa_ray.errors import DataError, first_few, warn
from cffa_ray.io import read_bytes
from cffa_ray.pixels import (
    WARNINGS,
    ImageReadError,
    describe,
    geometry_warnings,
    open_image,
    resize_square,
    to_modality,
)


def read_image(path: str, mode: str) -> tuple[Image.Image, list[str]]:
    """Decode and convert to `mode` (RGB for CF, L for FA; see pixels.py) -> (image, warning kinds)."""
    try:
        data = read_bytes(path)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}; check the path and its permissions") from None
    try:
        image = open_image(data)
    except ImageReadError as e:
        raise DataError(f"cannot decode image {path}: {e}; replace or remove this pair") from None
    return to_modality(image, mode)


def load_image(path: str, resolution: int, mode: str) -> np.ndarray:
    """Decode, convert to `mode` (RGB or L), resize to resolution^2; uint8 [R, R, 3]."""
    return resize_square(read_image(path, mode)[0], resolution)


def load_pair(cf_path: str, fa_path: str, resolution: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Both images of a pair, uint8 [R, R, 3] each, and warning entries (pixels.describe) for the pair."""
    (cf, cf_kinds), (fa, fa_kinds) = read_image(cf_path, "RGB"), read_image(fa_path, "L")
    warnings = [describe(k, cf_path, cf.size) for k in cf_kinds + geometry_warnings(cf.size, resolution)]
    warnings += [describe(k, fa_path, fa.size) for k in fa_kinds + geometry_warnings(fa.size, resolution)]
    if cf.size != fa.size:
        warnings.append(describe("pair_size", fa_path, fa.size, cf.size))
    return resize_square(cf, resolution), resize_square(fa, resolution), warnings


def channels_first(images: np.ndarray) -> np.ndarray:
    """uint8 [B, R, R, 3] -> uint8 [B, 3, R, R] (contiguous)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def decode_batch(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches fn: records -> {pair_id, cf, fa, error} (see module docstring).

    A bad file does not fail the task: it is reported in `error`, so the driver can name every bad
    file at once (Ray would only carry the first exception, as text).
    """
    cfs, fas, errors, warnings = [], [], [], []
    for cf_path, fa_path in zip(batch[CF_PATH], batch[FA_PATH]):
        cf = fa = np.zeros((resolution, resolution, 3), np.uint8)
        error, warning = "", []
        try:
            cf, fa, warning = load_pair(cf_path, fa_path, resolution)
        except DataError as e:
            error = str(e)
        cfs.append(cf)
        fas.append(fa)
        errors.append(error)
        warnings.append("\n".join(warning))
    return {PAIR_ID: np.asarray(batch[PAIR_ID], dtype=object), CF: channels_first(np.stack(cfs)),
            FA: channels_first(np.stack(fas)), ERROR: np.asarray(errors, dtype=object),
            WARNING: np.asarray(warnings, dtype=object)}


def pairs_dataset(records: list[dict], resolution: int):
    """A Ray Dataset of decoded pairs (lazy); see `decoded_pairs` for the checked, materialised one."""

    ds = ray.data.from_items([{PAIR_ID: r[PAIR_ID], CF_PATH: r[CF_PATH], FA_PATH: r[FA_PATH]} for r in records],
                             override_num_blocks=max(1, min(len(records), 64)))
    return ds.map_batches(decode_batch, fn_kwargs={"resolution": resolution}, batch_size=1,
                          batch_format="numpy", num_cpus=1)


def decoded_pairs(records: list[dict], resolution: int, strict: bool = False):
    """Decode every pair once (Ray Data CPU tasks) and keep it in the object store: {pair_id, cf, fa} rows.

    Raises DataError naming the files that would not decode, before any training starts; prints
    the image warnings (raises them with `strict`). Give each pair once (training and validation
    together): one error names every bad file, one warning counts every pair.
    """
    ds = pairs_dataset(records, resolution).materialize()
    _check_decoded(ds, resolution, strict)
    return ds.select_columns([PAIR_ID, CF, FA])


def check_decodable(records: list[dict], resolution: int, strict: bool = False) -> None:
    """Raise DataError naming the files that will not decode (Ray Data CPU tasks; nothing is kept)."""
    _check_decoded(pairs_dataset(records, resolution), resolution, strict)


def _check_decoded(ds, resolution: int, strict: bool) -> None:
    # sorted by pair id: Ray's blocks come back in any order, the message names the same files every run
    table = ds.select_columns([PAIR_ID, ERROR, WARNING]).to_pandas().sort_values(PAIR_ID, kind="stable")
    raise_decode_errors(table[ERROR])
    report_warnings([w for w in table[WARNING] if w], len(table), resolution, strict)


def raise_decode_errors(errors) -> None:
    """One DataError naming the first three files that would not decode, and how many more (errors: "" or why,
    per pair)."""
    errors = [e for e in errors if e]
    if errors:
        raise DataError(first_few(errors))


def report_warnings(entries: list[str], n_pairs: int, resolution: int, strict: bool) -> None:
    """One line per warning kind, with its count and a few files; with `strict` they are one error."""
    by_kind: dict[str, list[str]] = {}
    for line in "\n".join(entries).splitlines():
        kind, where = line.split("\t", 1)
        by_kind.setdefault(kind, []).append(where)
    lines = []
    for kind, (what, meaning) in WARNINGS.items():
        found = by_kind.get(kind, [])
        if found:
            files = first_few(found, ", ")
            total = n_pairs if kind == "pair_size" else 2 * n_pairs
            line = f"{len(found)} of {total} {what} ({files}): {meaning}"
            lines.append(line.replace("--resolution", f"--resolution {resolution}"))
    if lines and strict:
        raise DataError("; ".join(lines) + " (--strict)")
    for line in lines:
        warn(f"{line}; --strict makes this an error")
