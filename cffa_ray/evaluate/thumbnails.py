"""Small copies of every image, for the two checks that look at whole sets at once: memorisation (every
generated image against every training image) and utility (a translation network trained on a set).

THUMB_SIZE px is the scale both run at whatever the evaluation resolution: it keeps the driver's
memory small (16 KiB a pair, 16 MiB for a thousand) and the utility training within minutes on a CPU.
Generated pairs get their thumbnails in scoring.score_batch (already decoded there); the real
training and held-out pairs (--real_train, --real_test) in thumbnail_batch, a light Ray Data task.
"""
from __future__ import annotations

import numpy as np
import ray.data
from PIL import Image

from cffa_ray.data import CF_PATH, FA_PATH, PAIR_ID
from cffa_ray.decoding import load_image, raise_decode_errors
from cffa_ray.errors import DataError
from cffa_ray.progress import track

THUMB_SIZE = 64


def thumbnail(image: np.ndarray) -> np.ndarray:
    """uint8 [R, R, 3] or [R, R] -> the same at THUMB_SIZE (area-averaged when smaller, bicubic when larger)."""
    if image.shape[0] == THUMB_SIZE and image.shape[1] == THUMB_SIZE:
        return image
    method = Image.Resampling.BOX if image.shape[0] > THUMB_SIZE else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(image).resize((THUMB_SIZE, THUMB_SIZE), method), dtype=np.uint8)


def thumbnail_batch(batch: dict, set_name: str) -> dict:
    """Ray Data map_batches fn for real pairs given by path.

    In:  pair_id, cf_path, fa_path [B].
    Out: set, pair_id, cf_path, fa_path [B]; thumb_cf uint8 [B, S, S, 3]; thumb_fa uint8 [B, S, S]; error str [B]
         ("" or why: a file that will not decode gets black thumbnails and its error, for the driver to name).
    """
    cfs, fas, errors = [], [], []
    for cf_path, fa_path in zip(batch[CF_PATH], batch[FA_PATH]):
        cf, fa, error = np.zeros((THUMB_SIZE, THUMB_SIZE, 3), np.uint8), np.zeros((THUMB_SIZE,) * 2, np.uint8), ""
        try:
            cf = load_image(cf_path, THUMB_SIZE, "RGB")
            fa = load_image(fa_path, THUMB_SIZE, "L")[..., 0]
        except DataError as e:
            error = str(e)
        cfs.append(cf)
        fas.append(fa)
        errors.append(error)
    n = len(batch[PAIR_ID])
    return {"set": np.array([set_name] * n, dtype=object),
            PAIR_ID: np.array([str(p) for p in batch[PAIR_ID]], dtype=object),
            CF_PATH: np.array(list(batch[CF_PATH]), dtype=object),
            FA_PATH: np.array(list(batch[FA_PATH]), dtype=object),
            "thumb_cf": np.stack(cfs), "thumb_fa": np.stack(fas), "error": np.array(errors, dtype=object)}


def id_order(pair_id: str) -> tuple:
    """Sort key of pair ids: numbers by value (2 before 10), then names."""
    return (not pair_id.isdigit(), pair_id.zfill(12))


def collect_thumbnails(records: list[dict], set_name: str, batch_size: int) -> dict:
    """Thumbnails of real pairs (records with pair_id, cf_path, fa_path) by Ray Data tasks, in pair-id order.

    Returns {pair_ids: [N], files: {cf: [N], fa: [N]} (paths), cf: uint8 [N, S, S, 3], fa: uint8 [N, S, S]};
    a file that will not decode raises DataError naming it (and the first few others).
    """
    rows = [{PAIR_ID: str(r[PAIR_ID]), CF_PATH: r[CF_PATH], FA_PATH: r[FA_PATH]} for r in records]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
    ds = ds.map_batches(thumbnail_batch, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                        fn_kwargs={"set_name": set_name})
    got: list[tuple] = []
    errors: list[str] = []
    for batch in track(ds, len(rows), what=f"{set_name} pairs", label="cffa evaluate", count_key=PAIR_ID):
        errors.extend(batch["error"])
        got.extend(zip(batch[PAIR_ID], batch[CF_PATH], batch[FA_PATH], batch["thumb_cf"], batch["thumb_fa"]))
    raise_decode_errors(errors)
    got.sort(key=lambda g: id_order(g[0]))
    return {"pair_ids": [g[0] for g in got], "files": {"cf": [g[1] for g in got], "fa": [g[2] for g in got]},
            "cf": np.stack([g[3] for g in got]), "fa": np.stack([g[4] for g in got])}
