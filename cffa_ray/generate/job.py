"""`cffa generate`: pair ids -> Ray Data -> model actors -> PNG encoding -> parquet + PNG shards.

    ray.data.from_items(missing pair ids, seeds)
      -> [from_data] map_batches(load_sources)                  CPU tasks: decode the real pairs
      -> map_batches(PairGenerator, concurrency=K, num_gpus)     actors: model loaded once each
      -> map_batches(encode_pngs)                                CPU tasks: PNG bytes
      -> write_datasink(PairShardSink)                           PNG folders, then a parquet shard
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from cffa_ray.config import ConfigError, GenerateConfig, to_dict
from cffa_ray.data import CF_PATH, FA_PATH, PAIR_ID, check_decodable, discover_pairs, load_image, normalise
from cffa_ray.io import absolute, local_copy
from cffa_ray.sampling import pair_seed


def check_checkpoint(checkpoint_dir: str, expected_model: str | None = None) -> dict:
    """The checkpoint's model record; a clear error for a missing or foreign folder."""
    from cffa_ray.checks import check_checkpoint_files, check_model_record, read_json_file
    from cffa_ray.models import adapter_folders
    from cffa_ray.models.interface import MODEL_RECORD

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
        from cffa_ray.config import DEFAULT_BASE_MODEL
        from cffa_ray.models.base import check_base_model

        check_base_model(record.get("base_model") or DEFAULT_BASE_MODEL[record["model"]], record["model"])
    return record


def identity(cfg: GenerateConfig, record: dict) -> dict:
    """Everything that decides a pair's pixels; --num_samples, --batch_size, --concurrency do not."""
    out = {"checkpoint": absolute(cfg.checkpoint_dir), "trained_steps": record.get("trained_steps"),
           "model": record["model"], "resolution": record["resolution"], "mode": cfg.mode, "steps": cfg.steps,
           "seed": cfg.seed, "scheduler": cfg.scheduler, "model_batch": cfg.model_batch,
           "mixed_precision": cfg.mixed_precision,
           "use_gpu": cfg.use_gpu}  # CPU and GPU kernels differ in the last bits: not mixed in one folder
    if cfg.mode == "from_data":
        out.update(strength=cfg.strength, data=absolute(cfg.data))
    return out


def pair_rows(cfg: GenerateConfig, todo: list[int], sources: list[dict] | None) -> list[dict]:
    """The rows that flow through Ray Data: pair id, seed, and (from_data) the real pair it starts from."""
    rows = []
    for k in todo:
        row = {"pair_id": k, "seed": pair_seed(cfg.seed, k)}
        if sources:
            src = sources[k % len(sources)]
            row.update(source_pair_id=src[PAIR_ID], src_cf_path=src[CF_PATH], src_fa_path=src[FA_PATH])
        rows.append(row)
    return rows


def row_constants(cfg: GenerateConfig, record: dict, ident: dict) -> dict:
    return {"mode": cfg.mode, "steps": cfg.steps, "scheduler": cfg.scheduler,
            "strength": cfg.strength if cfg.mode == "from_data" else None,
            "checkpoint": ident["checkpoint"], "model": record["model"], "resolution": record["resolution"]}


def load_sources(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """Ray Data CPU stage for from_data: decode each row's real pair -> src_cf, src_fa [B, 3, R, R]."""
    out = {k: v for k, v in batch.items() if k not in ("src_cf_path", "src_fa_path")}
    out["src_cf"] = normalise(np.stack([load_image(p, resolution, "RGB") for p in batch["src_cf_path"]]))
    out["src_fa"] = normalise(np.stack([load_image(p, resolution, "L") for p in batch["src_fa_path"]]))
    return out


def generate(cfg: GenerateConfig) -> dict:
    """Make the missing pairs of 0..N-1 under cfg.output_dir; returns the summary dict."""
    import ray.data

    from cffa_ray.checks import check_output_dir
    from cffa_ray.generate.generator import PairGenerator
    from cffa_ray.generate.outputs import (PairShardSink, check_identity, done_pair_ids, encode_pngs,
                                           parquet_shards, remove_leftovers, write_identity, write_summary)
    from cffa_ray.train.launch import check_resources, init_ray

    cfg.validate()
    check_output_dir(cfg.output_dir, "--output_dir")
    cfg = dataclasses.replace(cfg, output_dir=absolute(cfg.output_dir))  # the sink may run elsewhere
    record = check_checkpoint(cfg.checkpoint_dir, cfg.model)
    sources = sorted(discover_pairs(cfg.data), key=lambda r: r[PAIR_ID]) if cfg.mode == "from_data" else None
    ident = identity(cfg, record)
    check_identity(cfg.output_dir, ident)
    done = done_pair_ids(cfg.output_dir)
    todo = [k for k in range(cfg.num_samples) if k not in done]
    skipped = cfg.num_samples - len(todo)
    t0 = time.time()
    if todo:
        init_ray(cfg.concurrency * cfg.cpus_per_actor)
        check_resources(cfg.use_gpu, cfg.concurrency, "--concurrency", cfg.accelerator_type)
        if sources:  # every real pair this run starts from must decode, before anything is written
            check_decodable([sources[i] for i in sorted({k % len(sources) for k in todo})], record["resolution"],
                             cfg.strict)
        print(f"[cffa] generating {len(todo)} pairs ({skipped} already done) with {cfg.concurrency} model "
              f"actor(s) -> {cfg.output_dir}", flush=True)
        write_identity(cfg.output_dir, ident)
        remove_leftovers(cfg.output_dir)  # a killed run's half-staged folders (this job redoes them)
        ctx = ray.data.DataContext.get_current()
        ctx.print_on_execution_start = False
        ctx.enable_progress_bars = True  # the pairs' progress bar (training turns them off for its own log)
        ds = ray.data.from_items(pair_rows(cfg, todo, sources),
                                 override_num_blocks=max(1, -(-len(todo) // cfg.batch_size)))
        if sources:
            ds = ds.map_batches(load_sources, fn_kwargs={"resolution": record["resolution"]},
                                batch_size=cfg.batch_size, batch_format="numpy")
        ds = ds.map_batches(
            PairGenerator, fn_constructor_kwargs={"checkpoint_dir": absolute(cfg.checkpoint_dir),
                                                  "cfg": to_dict(cfg)},
            batch_size=cfg.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            num_gpus=1 if cfg.use_gpu else 0, num_cpus=cfg.cpus_per_actor,
            **({"accelerator_type": cfg.accelerator_type} if cfg.accelerator_type else {}))
        ds = ds.map_batches(encode_pngs, batch_format="numpy", batch_size=cfg.batch_size)
        ds.write_datasink(PairShardSink(cfg.output_dir, cfg.rows_per_shard, row_constants(cfg, record, ident)))
    seconds = time.time() - t0
    made = len(todo)
    summary = {
        "pairs_total": cfg.num_samples, "pairs_made": made, "pairs_skipped": skipped,
        "pairs_in_output": len(done_pair_ids(cfg.output_dir)),
        "seconds": round(seconds, 3), "pairs_per_s": round(made / seconds, 4) if made else None,
        "parquet_shards": len(parquet_shards(cfg.output_dir)), "checkpoint": ident["checkpoint"],
        "arguments": to_dict(cfg),
    }
    write_summary(cfg.output_dir, summary)
    rate = f"{made / seconds:.2f} pairs/s" if made else "nothing to do"
    print(f"[cffa] generated {made} pairs, skipped {skipped} already done, {seconds:.1f}s, {rate} "
          f"-> {cfg.output_dir}/parquet and {cfg.output_dir}/png", flush=True)
    return summary


__all__ = ["generate", "check_checkpoint"]
