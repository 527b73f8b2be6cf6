"""`cffa evaluate`: generated and real pairs -> Ray Data tasks -> per-pair scores -> evaluation files.

    generated: read_parquet(G/parquet) | from_items(G cf/ fa/ paths)      real: from_items(paths)
      -> map_batches(score_batch)       CPU tasks: decode, vessel maps + soft Dice (and the mismatched
                                        floor for real pairs), SSIM/PSNR vs the source (from_data),
                                        SWD neighbourhood descriptors
      -> [--inception_weights] map_batches(InceptionFeatures)   actors: the network loaded once each
      -> driver: small rows only, one progress line -> metrics.py math -> evaluation.json/.md, pairs.csv
"""
from __future__ import annotations

import dataclasses
import time
import zlib

import numpy as np

from cffa_ray.config import EvaluateConfig
from cffa_ray.data import CF_PATH, FA_PATH, PAIR_ID, DataError, load_image
from cffa_ray.evaluate import metrics
from cffa_ray.evaluate.inputs import GENERATED, REAL, GeneratedSet
from cffa_ray.evaluate.vessels import alignments_with_floor

SCORE_COLUMNS = ("dice", "dice_mismatched", "ssim_cf", "ssim_fa", "psnr_cf", "psnr_fa")


# ------------------------------------------------------------------ per-batch work (Ray Data tasks)

def _decode_png(data: bytes, resolution: int, mode: str) -> np.ndarray:
    """A PNG that `cffa generate` wrote (8-bit RGB or L) -> uint8 [R, R, 3] or [R, R]."""
    import io

    from PIL import Image

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


def raise_decode_errors(errors) -> None:
    """One DataError naming the first three files that would not decode, and how many more."""
    errors = [e for e in errors if e]
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DataError("; ".join(errors[:3]) + more)


def score_batch(batch: dict, set_name: str, resolution: int, per_image: int, seed: int,
                sources: dict[str, list[str]], keep_images: bool) -> dict:
    """Ray Data map_batches fn for the pairs of one set.

    In:  pair_id [B] and either cf_png/fa_png bytes [B] (+ source_pair_id) or cf_path/fa_path [B].
    Out: set, pair_id str [B]; SCORE_COLUMNS float64 [B] (NaN where they do not apply); error str [B];
         swd_cf, swd_fa bytes [B] (float16 descriptors [levels, per_image, 7*7*C], C = 3 / 1);
         with keep_images: cf_u8 uint8 [B, R, R, 3], fa_u8 uint8 [B, R, R].
    dice_mismatched scores CF i against FA i+1 of the batch: for real rows (sorted by pair id) the floor;
    for generated rows the same floor made of the model's own images.
    """
    cfs, fas, errors = _images(batch, resolution)
    ids = [str(p) for p in batch[PAIR_ID]]
    registered, mismatched = alignments_with_floor(cfs, fas)
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
           "error": np.array(errors, dtype=object)}
    if keep_images:
        out["cf_u8"], out["fa_u8"] = np.stack(cfs), np.stack(fas)
    return out


# ------------------------------------------------------------------ the pipeline (driver)

def _set_dataset(set_name: str, generated: GeneratedSet | None, records: list[dict] | None, batch_size: int):
    import ray.data

    if generated is not None and generated.from_parquet:
        return ray.data.read_parquet(generated.shards, columns=[PAIR_ID, "cf_png", "fa_png", "source_pair_id"])
    rows = [{PAIR_ID: r[PAIR_ID], CF_PATH: r[CF_PATH], FA_PATH: r[FA_PATH]} for r in records]
    return ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))


def run_pipeline(cfg: EvaluateConfig, generated: GeneratedSet, real: list[dict], resolution: int,
                 sources: dict[str, list[str]]) -> dict[str, dict]:
    """Score every pair with Ray Data; returns {set: {"rows": [per-pair dicts], "swd_cf": [levels, N, D],
    "swd_fa": ..., "inception_cf": [N, 2048] | None, "inception_fa": ...}}."""
    import ray.data

    from cffa_ray.evaluate.inception import InceptionFeatures
    from cffa_ray.progress import track

    levels = len(metrics.pyramid_sizes(resolution))
    counts = {GENERATED: len(generated.rows), REAL: len(real)}
    per_image = {s: metrics.descriptors_per_image(n) for s, n in counts.items()}
    keep_images = bool(cfg.inception_weights)
    parts = []
    for set_name in (GENERATED, REAL):
        ds = _set_dataset(set_name, generated if set_name == GENERATED else None,
                          generated.rows if set_name == GENERATED else real, cfg.batch_size)
        parts.append(ds.map_batches(
            score_batch, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1,
            fn_kwargs={"set_name": set_name, "resolution": resolution, "per_image": per_image[set_name],
                       "seed": cfg.seed, "sources": sources if set_name == GENERATED else {},
                       "keep_images": keep_images}))
    ds = parts[0].union(parts[1])
    if keep_images:
        ds = ds.map_batches(
            InceptionFeatures, fn_constructor_kwargs={"weights": cfg.inception_weights, "use_gpu": cfg.use_gpu},
            batch_size=cfg.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_gpus=1 if cfg.use_gpu else 0, num_cpus=1)
    collected = {s: {"rows": [], "swd_cf": [], "swd_fa": [], "inception_cf": [], "inception_fa": []}
                 for s in counts}
    errors: list[str] = []
    for batch in track(ds, sum(counts.values()), what="pairs", label="cffa evaluate", count_key=PAIR_ID):
        errors.extend(batch["error"])
        for i, set_name in enumerate(batch["set"]):
            c = collected[set_name]
            c["rows"].append({"set": set_name, PAIR_ID: batch[PAIR_ID][i],
                              **{k: float(batch[k][i]) for k in SCORE_COLUMNS}})
            for m, channels in (("cf", 3), ("fa", 1)):
                desc = np.frombuffer(batch[f"swd_{m}"][i], np.float16)
                c[f"swd_{m}"].append(desc.reshape(levels, per_image[set_name], -1))
                if keep_images:
                    c[f"inception_{m}"].append(batch[f"inception_{m}"][i])
    raise_decode_errors(errors)
    for c in collected.values():
        for m in ("cf", "fa"):
            c[f"swd_{m}"] = np.concatenate(c[f"swd_{m}"], axis=1).astype(np.float32)  # [levels, N*per_image, D]
            c[f"inception_{m}"] = np.stack(c[f"inception_{m}"]) if keep_images else None
        c["rows"].sort(key=lambda r: (not r[PAIR_ID].isdigit(), r[PAIR_ID].zfill(12)))  # 2 before 10
    return collected


def evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate cfg.generated against cfg.real; writes cfg.output/evaluation.{json,md}, pairs.csv."""
    from cffa_ray.evaluate import inputs
    from cffa_ray.evaluate.report_files import build_evaluation, print_summary, write_outputs
    from cffa_ray.io import absolute
    from cffa_ray.progress import quiet_ray_data
    from cffa_ray.train.launch import init_ray

    cfg.validate()
    cfg = dataclasses.replace(cfg, output=absolute(cfg.output), generated=absolute(cfg.generated),
                              real=absolute(cfg.real))
    t0 = time.time()
    inputs.check_output(cfg.output)
    generated = inputs.read_generated(cfg.generated)
    real = inputs.read_real(cfg.real)
    resolution = cfg.resolution or inputs.generated_resolution(generated)
    sources, missing_sources = inputs.source_paths(generated, real)
    if cfg.inception_weights:
        from cffa_ray.evaluate.inception import load_inception

        load_inception(cfg.inception_weights)  # a bad file or a missing package: one line, before Ray starts
    init_ray(cfg.concurrency + 1 if cfg.inception_weights else 1)
    quiet_ray_data()
    print(f"[cffa] evaluating {len(generated.rows)} generated pairs against {len(real)} real pairs "
          f"at {resolution}px", flush=True)
    collected = run_pipeline(cfg, generated, real, resolution, sources)
    evaluation = build_evaluation(cfg, generated, collected, resolution, missing_sources, time.time() - t0)
    write_outputs(cfg.output, evaluation, collected)
    print_summary(cfg.output, evaluation)
    return evaluation


__all__ = ["evaluate", "score_batch"]
