"""The `auto` generation flags made concrete, and the identity that decides a pair's pixels.

Everything the pixels depend on is resolved once, in the driver, and recorded in generation.json:
a rerun into the same folder reuses it (so `auto` cannot pick differently on another GPU and mix
two kinds of pairs), and any explicit change is refused by `outputs.check_identity`.
"""
from __future__ import annotations

import dataclasses
import json
import os

import ray

from cffa_ray.config import AUTO, parse_concurrency
from cffa_ray.generate.config import GenerateConfig
from cffa_ray.generate.memory import CPU_MODEL_BATCH, calibrate
from cffa_ray.generate.outputs import IDENTITY_FILE
from cffa_ray.io import read_text
from cffa_ray.paths import absolute, join_path

GPU_PRECISION = "bf16"  # every GPU class cluster.yaml offers (Ampere and newer) runs bf16 at full rate


def recorded_identity(output_dir: str) -> dict | None:
    text = read_text(join_path(output_dir, IDENTITY_FILE))
    return json.loads(text) if text else None


def resolve(cfg: GenerateConfig, recorded: dict | None) -> GenerateConfig:
    """cfg with mixed_precision, compile and model_batch concrete (`recorded`: a folder's identity
    that already holds pairs, whose choices `auto` keeps)."""
    recorded = recorded or {}
    precision = cfg.mixed_precision
    if precision == AUTO:
        precision = recorded.get("mixed_precision", GPU_PRECISION if cfg.use_gpu else "no")
    compile_ = cfg.compile if cfg.compile is not None else recorded.get("compile", cfg.use_gpu)
    cfg = dataclasses.replace(cfg, mixed_precision=precision, compile=compile_)
    model_batch = cfg.model_batch
    if model_batch == AUTO:
        model_batch = recorded.get("model_batch") or auto_model_batch(cfg)
    return dataclasses.replace(cfg, model_batch=model_batch)


def needs_calibration(cfg: GenerateConfig, recorded: dict | None) -> bool:
    """Whether `resolve` will measure GPU memory (a Ray task) to pick --model_batch."""
    return cfg.use_gpu and cfg.model_batch == AUTO and not (recorded or {}).get("model_batch")


def auto_model_batch(cfg: GenerateConfig) -> int:
    """On CPU a fixed 8; on GPU the largest batch that fits, measured by a one-GPU Ray task."""
    if not cfg.use_gpu:
        return CPU_MODEL_BATCH
    options = {"num_gpus": 1, **({"accelerator_type": cfg.accelerator_type} if cfg.accelerator_type else {}),
               **({"resources": cfg.custom_resources} if cfg.custom_resources else {})}
    m = ray.get(ray.remote(calibrate).options(**options).remote(absolute(cfg.checkpoint_dir), cfg.mixed_precision))
    print(f"[cffa] --model_batch auto: {m['model_batch']} (measured on a {m['gpu']} with {m['total_gib']:.1f} GiB: "
          f"{m['fixed_gib']:.1f} GiB fixed + {m['per_pair_gib']:.2f} GiB per pair)", flush=True)
    return m["model_batch"]


def min_actors(concurrency: str) -> int:
    bounds = parse_concurrency(concurrency)
    return 1 if bounds == AUTO else bounds[0]


def actor_pool(concurrency: str, use_gpu: bool) -> tuple[int, float]:
    """(min, max) model actors. auto: with GPUs, 1 up to every GPU this local machine has, or without
    bound on a cluster (RAY_ADDRESS set), where Ray Data asks the autoscaler for GPU nodes as work
    queues up; on CPU one actor."""

    bounds = parse_concurrency(concurrency)
    if bounds != AUTO:
        return bounds
    if not use_gpu:
        return 1, 1
    if os.environ.get("RAY_ADDRESS"):
        return 1, float("inf")
    return 1, max(1, int(ray.cluster_resources().get("GPU", 0)))


def actors_text(low: int, high: float) -> str:
    """The model actors an (min, max) pool from `actor_pool` runs, in words for the start line."""
    if low == high:
        return f"{low} model actor{'' if low == 1 else 's'}"
    if high == float("inf"):
        return f"{low} or more model actors (added as work queues up, as the cluster grows)"
    return f"{low} to {int(high)} model actors (added as work queues up)"


def identity(cfg: GenerateConfig, record: dict) -> dict:
    """Everything that decides a pair's pixels (cfg resolved); --num_samples, --batch_size and
    --concurrency do not."""
    out = {"checkpoint": absolute(cfg.checkpoint_dir), "trained_steps": record.get("trained_steps"),
           "model": record["model"], "resolution": record["resolution"], "mode": cfg.mode, "steps": cfg.steps,
           "seed": cfg.seed, "scheduler": cfg.scheduler, "model_batch": cfg.model_batch,
           "mixed_precision": cfg.mixed_precision, "compile": cfg.compile,
           # folders from the unfused sampler differ in the last bits
           "png_layout": cfg.png_layout, "sampler": "merged-lora+fused-qkv",
           "use_gpu": cfg.use_gpu}  # CPU and GPU kernels differ in the last bits: not mixed in one folder
    if cfg.mode == "from_data":
        out.update(strength=cfg.strength, data=absolute(cfg.data))
    if cfg.fa_noise != "same":  # only then: folders made before the flag keep their identity
        out["fa_noise"] = cfg.fa_noise
    if cfg.struct_guidance:  # likewise: unguided folders keep the identity they had before the flag
        out["struct_guidance"] = cfg.struct_guidance
        if cfg.struct_guidance_target != "latent_edges":  # and guided folders made before the target flag
            out["struct_guidance_target"] = cfg.struct_guidance_target
    return out
