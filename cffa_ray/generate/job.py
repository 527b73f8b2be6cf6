"""`cffa generate`: pair ids -> Ray Data -> model actors -> PNG encoding -> parquet + PNG shards.

    ray.data.from_items(missing pair ids, seeds)
      -> map_batches(add_noise) [+ load_sources for from_data]   CPU tasks: z0 per pair, real pairs
      -> map_batches(PairGenerator, ActorPoolStrategy(min, max))  actors, one GPU each: model loaded once
      -> map_batches(encode_pngs)                                 CPU tasks: PNG bytes
      -> map_batches(write_pair_shard)                            CPU tasks: PNG folders, then a parquet shard
      -> the driver iterates one small row per model call: progress line, rates, peak GPU memory
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import ray.data

from cffa_ray import internals
from cffa_ray.checks import (
    check_base_model,
    check_checkpoint_files,
    check_model_record,
    check_output_dir,
    read_json_file,
)
from cffa_ray.config import DEFAULT_BASE_MODEL
from cffa_ray.data import PAIR_ID, discover_pairs
from cffa_ray.decoding import check_decodable
from cffa_ray.errors import ConfigError, RunStopped
from cffa_ray.flags import to_dict
from cffa_ray.folder_lock import folder_lock
from cffa_ray.generate.config import GenerateConfig
from cffa_ray.generate.generator import ModelBatchTooLarge, PairGenerator
from cffa_ray.generate.outputs import (
    check_identity,
    done_pair_ids,
    encode_pngs,
    parquet_shards,
    remove_leftovers,
    write_identity,
    write_pair_shard,
    write_summary,
)
from cffa_ray.generate.settings import (
    actor_pool,
    actors_text,
    identity,
    min_actors,
    needs_calibration,
    recorded_identity,
    resolve,
)
from cffa_ray.generate.stages import add_noise, load_sources, pair_rows
from cffa_ray.io import local_copy
from cffa_ray.models.designs import adapter_folders, design, noise_shape_for
from cffa_ray.models.presets import vae_config
from cffa_ray.paths import absolute
from cffa_ray.progress import Progress
from cffa_ray.quiet import quiet_ray_data
from cffa_ray.run_layout import MODEL_RECORD
from cffa_ray.runtime import check_resources, init_ray
from cffa_ray.shared_storage import FIX as SHARED_FIX
from cffa_ray.shared_storage import NotShared, check_shared_folder


def check_checkpoint(checkpoint_dir: str, expected_model: str | None = None) -> dict:
    """The checkpoint's model record; a clear error for a missing or foreign folder."""

    try:
        path = Path(local_copy(checkpoint_dir))
    except FileNotFoundError:
        path = Path("/nonexistent")
    if not path.is_dir():
        raise ConfigError(f"--checkpoint_dir {checkpoint_dir} {'is a file' if path.exists() else 'does not exist'}; "
                          "give <run>/best_checkpoint or <run>/latest_checkpoints/step_XXXXXX")
    if not (path / MODEL_RECORD).is_file():
        raise ConfigError(f"--checkpoint_dir {checkpoint_dir} is not a cffa checkpoint (no {MODEL_RECORD}); "
                          "give <run>/best_checkpoint or <run>/latest_checkpoints/step_XXXXXX")
    record = read_json_file(path / MODEL_RECORD, f"--checkpoint_dir {checkpoint_dir}")
    folders = adapter_folders(record.get("model", ""))
    if folders is None:
        raise ConfigError(f"--checkpoint_dir {checkpoint_dir}: model {record.get('model')!r} in {MODEL_RECORD} "
                          "is not a design this version knows (dual_unet, joint_sdxl)")
    if expected_model and expected_model != record["model"]:
        raise ConfigError(f"--checkpoint_dir {checkpoint_dir} holds a {record['model']} model "
                          f"({', '.join(f + '/' for f in folders)}), not --model {expected_model}; "
                          f"drop --model or give a {expected_model} checkpoint")
    missing = [f for f in folders if not (path / f / "adapter_config.json").is_file()
               or not (path / f / "adapter_model.safetensors").is_file()]
    if missing:
        raise ConfigError(f"--checkpoint_dir {checkpoint_dir} ({record.get('model')}) lacks {', '.join(missing)}; "
                          "it is incomplete or from another design")
    check_model_record(record, path / MODEL_RECORD, f"--checkpoint_dir {checkpoint_dir}")
    check_checkpoint_files(path, folders, f"--checkpoint_dir {checkpoint_dir}")
    if not record.get("preset"):
        check_base_model(record.get("base_model") or DEFAULT_BASE_MODEL[record["model"]], record["model"])
    return record


def check_fa_noise(fa_noise: str, model: str) -> None:
    if fa_noise not in design(model).fa_noises:
        raise ConfigError(f"--fa_noise {fa_noise} needs the two UNets of dual_unet; this checkpoint is {model}, "
                          "whose one UNet denoises CF and FA together: drop --fa_noise")


def check_struct_guidance(struct_guidance: float, model: str) -> None:
    if struct_guidance and not design(model).struct_guidance:
        raise ConfigError(f"--struct_guidance {struct_guidance:g} needs the two UNets of dual_unet; this checkpoint "
                          f"is {model}, whose one UNet sees both halves at once: drop --struct_guidance")


def noise_shape(record: dict) -> tuple[int, ...]:
    """The z0 shape of the checkpoint's model, from its base VAE's config (no weights loaded)."""

    base = record.get("base_model") or DEFAULT_BASE_MODEL[record["model"]]
    return noise_shape_for(record["model"], vae_config(base, record.get("preset")), record["resolution"])


def row_constants(cfg: GenerateConfig, record: dict, ident: dict) -> dict:
    return {"mode": cfg.mode, "steps": cfg.steps, "scheduler": cfg.scheduler,
            "strength": cfg.strength if cfg.mode == "from_data" else None,
            "checkpoint": ident["checkpoint"], "model": record["model"], "resolution": record["resolution"]}


def pipeline(cfg: GenerateConfig, record: dict, ident: dict, todo: list[int], sources: list[dict] | None):
    """The lazy Ray Data job (see the module docstring); iterating it does the work."""
    low, high = actor_pool(cfg.concurrency, cfg.use_gpu)
    ds = ray.data.from_items(pair_rows(cfg.seed, todo, sources),
                             override_num_blocks=max(1, -(-len(todo) // cfg.batch_size)))
    ds = ds.map_batches(add_noise, fn_kwargs={"seed": cfg.seed, "noise_shape": noise_shape(record)},
                        batch_size=cfg.batch_size, batch_format="numpy")
    if sources:
        ds = ds.map_batches(load_sources, fn_kwargs={"resolution": record["resolution"]},
                            batch_size=cfg.batch_size, batch_format="numpy")
    ds = ds.map_batches(
        PairGenerator, fn_constructor_kwargs={"checkpoint_dir": absolute(cfg.checkpoint_dir), "cfg": to_dict(cfg)},
        batch_size=cfg.batch_size, batch_format="numpy",
        # two calls in flight: Ray batches the next inputs and ships the last outputs while the GPU works
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_concurrent_calls_per_actor=2),
        num_gpus=1 if cfg.use_gpu else 0, num_cpus=cfg.cpus_per_actor,
        **({"accelerator_type": cfg.accelerator_type} if cfg.accelerator_type else {}),
        **({"resources": cfg.custom_resources} if cfg.custom_resources else {}))
    ds = ds.map_batches(encode_pngs, batch_format="numpy", batch_size=cfg.batch_size)
    return ds.map_batches(write_pair_shard, batch_size=cfg.rows_per_shard, batch_format="pyarrow",
                          fn_kwargs={"output_dir": cfg.output_dir, "constants": row_constants(cfg, record, ident),
                                     "layout": cfg.png_layout})


def run_with_progress(ds, total: int) -> list[dict]:
    """Iterate the job, one progress line (pairs, rate, ETA); returns the per-model-call rows."""

    done_calls = []
    with Progress(total, what="pairs", label="cffa generate") as bar:
        for row in ds.iter_rows():
            done_calls.append(row)
            bar.update(int(row["pairs"]))
    return done_calls


def rates(calls: list[dict], t_start: float) -> dict:
    """Start-up (job start to the first finished model call) and the steady-state rate: per actor, the
    pairs after its first call over the time since that call, summed over the actors."""
    if not calls:
        return {}
    per_call: dict[tuple, int] = {}  # a call's rows may have reached two writers
    for c in calls:
        per_call[(c["actor"], c["done_at"])] = per_call.get((c["actor"], c["done_at"]), 0) + int(c["pairs"])
    by_actor: dict[str, list] = {}
    for (actor, done_at), pairs in sorted(per_call.items(), key=lambda kv: kv[0][1]):
        by_actor.setdefault(actor, []).append((done_at, pairs))
    steady = sum(sum(p for _, p in done[1:]) / (done[-1][0] - done[0][0])
                 for done in by_actor.values() if len(done) > 1 and done[-1][0] > done[0][0])
    return {"startup_s": round(min(c["done_at"] for c in calls) - t_start, 3),
            "steady_pairs_per_s": round(steady, 4) if steady else None,
            "gpu_peak_gib": round(max(int(c["gpu_peak"]) for c in calls) / 2**30, 3)}


def start_ray(cfg: GenerateConfig) -> None:
    """Join or start Ray; refuse (on a local machine) more GPUs or custom resources than it has, and
    (on a cluster) an --output_dir that is not the same folder on every node."""

    low = min_actors(cfg.concurrency)
    init_ray(low * cfg.cpus_per_actor)
    check_resources(cfg.use_gpu, low, "--concurrency", cfg.accelerator_type, cfg.custom_resources)
    check_shared_folder(cfg.output_dir, "--output_dir")


def generate(cfg: GenerateConfig) -> dict:
    """Make the missing pairs of 0..N-1 under cfg.output_dir; returns the summary dict."""

    cfg.validate()
    check_output_dir(cfg.output_dir, "--output_dir")
    cfg = dataclasses.replace(cfg, output_dir=absolute(cfg.output_dir))  # the writers may run elsewhere
    record = check_checkpoint(cfg.checkpoint_dir, cfg.model)
    check_fa_noise(cfg.fa_noise, record["model"])
    check_struct_guidance(cfg.struct_guidance, record["model"])
    sources = sorted(discover_pairs(cfg.data), key=lambda r: r[PAIR_ID]) if cfg.mode == "from_data" else None
    done = done_pair_ids(cfg.output_dir)
    todo = [k for k in range(cfg.num_samples) if k not in done]
    skipped = cfg.num_samples - len(todo)
    recorded = recorded_identity(cfg.output_dir) if done else None  # a folder with pairs keeps auto's choices
    if todo and needs_calibration(cfg, recorded):
        start_ray(cfg)  # the measurement runs as a one-GPU Ray task
    cfg = resolve(cfg, recorded)
    ident = identity(cfg, record)
    check_identity(cfg.output_dir, ident)
    with folder_lock(cfg.output_dir, "--output_dir", "cffa generate"):  # one writing job per folder
        return make_pairs(cfg, record, ident, todo, skipped, sources)


def make_pairs(cfg: GenerateConfig, record: dict, ident: dict, todo: list[int], skipped: int,
               sources: list[dict] | None) -> dict:
    """Run the job for the pair ids `todo` (cfg resolved, the folder locked); returns the summary dict."""
    calls, t0 = [], time.time()
    if todo:
        start_ray(cfg)
        if sources:  # every real pair this run starts from must decode, before anything is written
            check_decodable([sources[i] for i in sorted({k % len(sources) for k in todo})], record["resolution"],
                             cfg.strict)
        print(f"[cffa] generating {len(todo)} pairs ({skipped} already done), model_batch {cfg.model_batch}, "
              f"{actors_text(*actor_pool(cfg.concurrency, cfg.use_gpu))} -> {cfg.output_dir}", flush=True)
        write_identity(cfg.output_dir, ident)
        remove_leftovers(cfg.output_dir)  # a killed run's half-staged folders (this job redoes them)
        quiet_ray_data()  # one progress line of our own instead
        try:
            calls = run_with_progress(pipeline(cfg, record, ident, todo, sources), len(todo))
        except Exception as e:  # Ray wraps an actor's error in its own exception types
            if not_shared := internals.user_exception_message(e, NotShared):
                raise RunStopped(not_shared) from None
            too_large = internals.user_exception_message(e, ModelBatchTooLarge)
            if too_large is None:
                raise
            raise ConfigError(too_large) from None
        missing = set(todo) - done_pair_ids(cfg.output_dir)
        if missing:  # the writers committed them, somewhere this driver cannot see
            raise RunStopped(f"{len(missing)} of the {len(todo)} pairs made are not in --output_dir {cfg.output_dir} "
                             f"as this driver sees it: they were written on another node's disk; {SHARED_FIX}")
    seconds = time.time() - t0
    made = len(todo)
    summary = {
        "pairs_total": cfg.num_samples, "pairs_made": made, "pairs_skipped": skipped,
        "pairs_in_output": len(done_pair_ids(cfg.output_dir)),
        "seconds": round(seconds, 3), "pairs_per_s": round(made / seconds, 4) if made else None,
        **rates(calls, t0), "model_batch": cfg.model_batch, "compile": cfg.compile,
        "mixed_precision": cfg.mixed_precision,
        "parquet_shards": len(parquet_shards(cfg.output_dir)), "checkpoint": ident["checkpoint"],
        "arguments": to_dict(cfg),
    }
    write_summary(cfg.output_dir, summary)
    rate = f"{made / seconds:.2f} pairs/s" if made else "nothing to do"
    steady = (f", {summary['steady_pairs_per_s']} pairs/s after {summary['startup_s']:.0f}s start-up"
              if summary.get("steady_pairs_per_s") else "")
    print(f"[cffa] generated {made} pairs, skipped {skipped} already done, {seconds:.1f}s, "
          f"{rate}{steady} -> {cfg.output_dir}", flush=True)
    return summary


__all__ = ["generate", "check_checkpoint"]
