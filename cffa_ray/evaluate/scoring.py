"""The per-batch work of `cffa evaluate`, run as Ray Data CPU tasks: decode the pairs of one set, score
each pair (vessel alignment and its mismatched floor, fidelity to a source pair, SWD descriptors).
"""
from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

from cffa_ray.data import CF_PATH, FA_PATH, PAIR_ID
from cffa_ray.decoding import load_image
from cffa_ray.errors import DataError
from cffa_ray.evaluate import metrics
from cffa_ray.evaluate.thumbnails import thumbnail
from cffa_ray.evaluate.topology import MEASURES, image_topology
from cffa_ray.evaluate.vessels import alignments_with_floor, vessel_maps

TOPOLOGY_COLUMNS = tuple(f"{m}_{k}" for m in ("cf", "fa") for k in MEASURES)
SCORE_COLUMNS = ("dice", "dice_mismatched", "ssim_cf", "ssim_fa", "psnr_cf", "psnr_fa", *TOPOLOGY_COLUMNS)


# ------------------------------------------------------------------ per-batch work (Ray Data tasks)

def _decode_png(data: bytes, resolution: int, mode: str) -> np.ndarray:
    """A PNG that `cffa generate` wrote (8-bit RGB or L) -> uint8 [R, R, 3] or [R, R]."""
    image = Image.open(io.BytesIO(data)).convert(mode)
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _images(batch: dict, resolution: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """CF uint8 [R, R, 3], FA uint8 [R, R] and an error ("" or why) per row, from PNG bytes (parquet) or
    file paths. A row that will not decode gets black images (its scores come out NaN) and its error,
    so the driver can name every bad file at once."""
    cfs, fas, errors = [], [], []
    for i, pid in enumerate(batch[PAIR_ID]):
        cf, fa = np.zeros((resolution, resolution, 3), np.uint8), np.zeros((resolution, resolution), np.uint8)
        error = ""
        try:
            if "cf_png" in batch:
                cf = _decode_png(batch["cf_png"][i], resolution, "RGB")
                fa = _decode_png(batch["fa_png"][i], resolution, "L")
            else:
                cf = load_image(batch[CF_PATH][i], resolution, "RGB")
                fa = load_image(batch[FA_PATH][i], resolution, "L")[..., 0]
        except DataError as e:
            error = str(e)
        except Exception as e:  # PIL raises many types for corrupt PNG bytes
            error = f"cannot decode generated pair {pid}: {e}"
        cfs.append(cf)
        fas.append(fa)
        errors.append(error)
    return cfs, fas, errors


def _fidelity(cf: np.ndarray, fa: np.ndarray, source: list[str] | None, resolution: int) -> list[float]:
    """[ssim_cf, ssim_fa, psnr_cf, psnr_fa] of a generated pair against its source pair (NaN: none)."""
    if not source:
        return [float("nan")] * 4
    try:
        src_cf, src_fa = load_image(source[0], resolution, "RGB"), load_image(source[1], resolution, "L")[..., 0]
    except DataError:
        return [float("nan")] * 4  # the source is a real pair too: its own row reports the bad file
    return [metrics.ssim(cf, src_cf), metrics.ssim(fa, src_fa), metrics.psnr(cf, src_cf), metrics.psnr(fa, src_fa)]


def _topology(masks: list, cf_maps: list, fa_maps: list) -> dict[str, np.ndarray]:
    """TOPOLOGY_COLUMNS float64 [B] from the vessel maps of a batch."""
    rows = [{**{f"cf_{k}": v for k, v in image_topology(c, m).items()},
             **{f"fa_{k}": v for k, v in image_topology(f, m).items()}} for m, c, f in zip(masks, cf_maps, fa_maps)]
    return {col: np.array([r[col] for r in rows], np.float64) for col in TOPOLOGY_COLUMNS}


def score_batch(batch: dict, set_name: str, resolution: int, per_image: int, seed: int,
                sources: dict[str, list[str]], keep_images: bool, keep_thumbs: bool = False) -> dict:
    """Ray Data map_batches fn for the pairs of one set.

    In:  pair_id [B] and either cf_png/fa_png bytes [B] (+ source_pair_id) or cf_path/fa_path [B].
    Out: set, pair_id str [B]; SCORE_COLUMNS float64 [B] (NaN where they do not apply; the vessel topology
         of each image among them, topology.MEASURES); error str [B];
         swd_cf, swd_fa bytes [B] (float16 descriptors [levels, per_image, 7*7*C], C = 3 / 1);
         with keep_images: cf_u8 uint8 [B, R, R, 3], fa_u8 uint8 [B, R, R];
         with keep_thumbs: thumb_cf uint8 [B, S, S, 3], thumb_fa uint8 [B, S, S] (thumbnails.THUMB_SIZE).
    dice_mismatched scores CF i against FA i+1 of the batch: for real rows (sorted by pair id) the floor;
    for generated rows the same floor made of the model's own images.
    """
    cfs, fas, errors = _images(batch, resolution)
    ids = [str(p) for p in batch[PAIR_ID]]
    maps = vessel_maps(cfs, fas)
    registered, mismatched = alignments_with_floor(cfs, fas, maps)
    src_ids = batch.get("source_pair_id", [None] * len(ids))
    fidelity = np.array([_fidelity(cf, fa, sources.get(s) if s else None, resolution)
                         for cf, fa, s in zip(cfs, fas, src_ids)], dtype=np.float64).reshape(len(ids), 4)
    swd_cf, swd_fa = [], []
    for pid, cf, fa in zip(ids, cfs, fas):
        rng = np.random.default_rng([seed, zlib.crc32(f"{set_name}/{pid}".encode())])
        swd_cf.append(metrics.swd_descriptors(cf, per_image, rng).astype(np.float16).tobytes())
        swd_fa.append(metrics.swd_descriptors(fa, per_image, rng).astype(np.float16).tobytes())
    out = {"set": np.array([set_name] * len(ids), dtype=object), PAIR_ID: np.array(ids, dtype=object),
           "dice": np.array(registered, np.float64), "dice_mismatched": np.array(mismatched, np.float64),
           "ssim_cf": fidelity[:, 0], "ssim_fa": fidelity[:, 1], "psnr_cf": fidelity[:, 2],
           "psnr_fa": fidelity[:, 3],
           "swd_cf": np.array(swd_cf, dtype=object), "swd_fa": np.array(swd_fa, dtype=object),
           "error": np.array(errors, dtype=object), **_topology(*maps)}
    if keep_thumbs:
        out["thumb_cf"], out["thumb_fa"] = np.stack([thumbnail(c) for c in cfs]), np.stack([thumbnail(f) for f in fas])
    if keep_images:
        out["cf_u8"], out["fa_u8"] = np.stack(cfs), np.stack(fas)
    return out
