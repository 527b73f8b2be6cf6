"""`cffa evaluate`: generated and real pairs -> Ray Data tasks -> per-pair scores -> evaluation files.

    generated: read_parquet(G/parquet) | from_items(G cf/ fa/ paths)      real: from_items(paths)
      -> map_batches(score_batch)       CPU tasks: decode, vessel maps + soft Dice (and the mismatched
                                        floor for real pairs), SSIM/PSNR vs the source (from_data),
                                        SWD neighbourhood descriptors
      -> [--inception_weights] map_batches(InceptionFeatures)   actors: the network loaded once each
      -> driver: small rows only, one progress line -> metrics.py math -> evaluation.json/.md, pairs.csv
    second_ruler.py: vessel topology (from the scoring rows); with a training and a held-out real set,
    memorisation (their thumbnails by Ray Data tasks); with --utility, three CF->FA trainings as Ray tasks
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import ray.data

from cffa_ray.data import CF_PATH, FA_PATH, PAIR_ID
from cffa_ray.decoding import raise_decode_errors
from cffa_ray.errors import ConfigError
from cffa_ray.evaluate import inputs, metrics, second_ruler
from cffa_ray.evaluate.config import EvaluateConfig
from cffa_ray.evaluate.inception import InceptionFeatures, load_inception
from cffa_ray.evaluate.inputs import GENERATED, REAL, GeneratedSet
from cffa_ray.evaluate.report_files import build_evaluation, print_summary, write_outputs
from cffa_ray.evaluate.scoring import SCORE_COLUMNS, score_batch
from cffa_ray.evaluate.thumbnails import id_order
from cffa_ray.paths import absolute
from cffa_ray.progress import track
from cffa_ray.quiet import quiet_ray_data
from cffa_ray.runtime import init_ray

# ------------------------------------------------------------------ the pipeline (driver)

def _set_dataset(set_name: str, generated: GeneratedSet | None, records: list[dict] | None, batch_size: int):
    if generated is not None and generated.from_parquet:
        return ray.data.read_parquet(generated.shards, columns=[PAIR_ID, "cf_png", "fa_png", "source_pair_id"])
    rows = [{PAIR_ID: r[PAIR_ID], CF_PATH: r[CF_PATH], FA_PATH: r[FA_PATH]} for r in records]
    return ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))


def run_pipeline(cfg: EvaluateConfig, generated: GeneratedSet, real: list[dict], resolution: int,
                 sources: dict[str, list[str]], keep_thumbs: bool = False) -> dict[str, dict]:
    """Score every pair with Ray Data; returns {set: {"rows": [per-pair dicts], "swd_cf": [levels, N, D],
    "swd_fa": ..., "inception_cf": [N, 2048] | None, "inception_fa": ...}}; with keep_thumbs the generated
    set also has "thumbs": {cf: [N, S, S, 3], fa: [N, S, S]} in the order of its rows."""

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
                       "keep_images": keep_images, "keep_thumbs": keep_thumbs and set_name == GENERATED}))
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
            row = {"set": set_name, PAIR_ID: batch[PAIR_ID][i], **{k: float(batch[k][i]) for k in SCORE_COLUMNS}}
            if "thumb_cf" in batch:
                row["thumb_cf"], row["thumb_fa"] = batch["thumb_cf"][i], batch["thumb_fa"][i]
            c["rows"].append(row)
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
        c["rows"].sort(key=lambda r: id_order(r[PAIR_ID]))  # 2 before 10
    if keep_thumbs:
        collected[GENERATED]["thumbs"] = second_ruler.stack_thumbs(collected[GENERATED]["rows"])
    return collected


def evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate cfg.generated against cfg.real; writes cfg.output/evaluation.{json,md}, pairs.csv."""

    cfg.validate()
    cfg = dataclasses.replace(cfg, output=absolute(cfg.output), generated=absolute(cfg.generated),
                              real=absolute(cfg.real))
    t0 = time.time()
    inputs.check_output(cfg.output)
    generated = inputs.read_generated(cfg.generated)
    real = inputs.read_real(cfg.real)
    resolution = cfg.resolution or inputs.generated_resolution(generated)
    sources, missing_sources = inputs.source_paths(generated, real)
    sets = second_ruler.resolve_sets(cfg, generated)
    if cfg.inception_weights:
        load_inception(cfg.inception_weights)  # a bad file or a missing package: one line, before Ray starts
    init_ray(cfg.concurrency + 1 if cfg.inception_weights else 1)
    if cfg.utility and cfg.use_gpu and not os.environ.get("RAY_ADDRESS") and not ray.cluster_resources().get("GPU"):
        raise ConfigError("--utility with --use_gpu trains on a GPU, and this machine's Ray has none: drop --use_gpu")
    quiet_ray_data()
    print(f"[cffa] evaluating {len(generated.rows)} generated pairs against {len(real)} real pairs "
          f"at {resolution}px", flush=True)
    collected = run_pipeline(cfg, generated, real, resolution, sources, keep_thumbs=second_ruler.needs_thumbs(sets))
    extra = second_ruler.measure(cfg, sets, collected)
    evaluation = build_evaluation(cfg, generated, collected, resolution, missing_sources, time.time() - t0, extra)
    write_outputs(cfg.output, evaluation, collected)
    print_summary(cfg.output, evaluation)
    return evaluation


__all__ = ["evaluate", "score_batch"]
