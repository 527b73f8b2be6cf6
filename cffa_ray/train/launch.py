"""The driver side of `cffa train`: check everything, prepare Ray Data, run the TorchTrainer."""
from __future__ import annotations

import dataclasses
import os
import time

from cffa_ray.config import ConfigError, TrainConfig, join_path, to_dict
from cffa_ray.data import TRAIN, VAL, DataError, assign_split, decoded_pairs, discover_pairs
from cffa_ray.io import absolute


def check(cfg: TrainConfig) -> list[dict]:
    """Every check that needs no Ray: flags, base model, pairs. Returns split pair records."""
    from cffa_ray.models.base import check_base_model

    cfg.validate()
    if cfg.preset is None:
        check_base_model(cfg.base_model_or_default, cfg.model)
    check_resumable(cfg)
    records = assign_split(discover_pairs(cfg.data), cfg.val_fraction, cfg.seed)
    n_train = sum(r["split"] == TRAIN for r in records)
    need = cfg.num_workers * cfg.batch_size
    if n_train < need:
        raise DataError(f"--data has {n_train} training pair(s); --num_workers {cfg.num_workers} x "
                        f"--batch_size {cfg.batch_size} needs at least {need}: add pairs or lower those flags")
    return records


def check_resumable(cfg: TrainConfig) -> None:
    """A rerun resumes the run folder; refuse one whose model settings would not fit its checkpoints."""
    import json

    from cffa_ray.io import read_text
    from cffa_ray.train.run_folder import RUN_RECORD

    text = read_text(join_path(cfg.run_dir, RUN_RECORD))
    if text is None:
        return
    old, new = json.loads(text), cfg.model_record()
    diffs = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if diffs:
        raise ConfigError(f"run {cfg.run_dir} was started with other model settings ({'; '.join(diffs)}); "
                          "rerun with those, or pick a new --name")


def init_ray(num_cpus_needed: float) -> None:
    """Join the cluster named by RAY_ADDRESS (set inside `ray job submit` jobs), else start a local one.

    On a small machine, training workers holding every CPU would leave Ray Data none and the job
    would wait forever, so a local cluster advertises at least the workers' CPUs plus two.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # The dashboard also serves the state API that Train's placement-group cleaner polls.
        ray.init(num_cpus=max(os.cpu_count() or 1, int(num_cpus_needed + 0.999) + 2), log_to_driver=True)


def worker_env(use_gpu: bool) -> dict:
    """Environment of the training workers (merged into a job's own runtime env, not clashing with it)."""
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # the patch would echo every worker line twice
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # must be set before deepspeed is first imported
    return {"env_vars": env}


def passes_of(ds, n_rows: int, min_rows: int = 2048):
    """The decoded pairs repeated to >= min_rows rows, in a fresh random block order on every pass.

    Each pass over a worker's shard restarts a streaming split, which costs about as much as tens
    of small batches; with tens of pairs (the usual dataset), repeating the blocks amortises that.
    The repeats are references to the same blocks in the object store (no copies), in one input
    (a union of many datasets would plan one operator per copy). Blocks hold a few pairs each, so
    shuffling their order shuffles the pairs.
    """
    import ray.data

    copies = max(1, -(-min_rows // max(n_rows, 1)))
    return ray.data.from_arrow_refs(ds.to_arrow_refs() * copies).randomize_block_order()


def train(cfg: TrainConfig):
    """Train; returns the Ray Train Result. Raises ConfigError / DataError before any work."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cffa_ray.train.loop import quiet_ray, train_loop_per_worker
    from cffa_ray.train.run_folder import RAY_DIR, RUN_RECORD, RunFolder

    cfg = dataclasses.replace(cfg, output_dir=absolute(cfg.output_dir))  # workers may not share our cwd
    records = check(cfg)
    train_records = [r for r in records if r["split"] == TRAIN]
    val_records = [r for r in records if r["split"] == VAL] or train_records[: max(1, cfg.batch_size)]
    init_ray(cfg.num_workers * cfg.cpus_per_worker)
    quiet_ray()
    t0 = time.time()
    train_ds = passes_of(decoded_pairs(train_records, cfg.resolution), len(train_records))
    val_ds = decoded_pairs(val_records, cfg.resolution)
    print(f"[cffa] {len(train_records)} training and {len(val_records)} validation pairs decoded "
          f"at {cfg.resolution}px in {time.time() - t0:.1f}s", flush=True)

    RunFolder(cfg.run_dir).write_json(RUN_RECORD, cfg.model_record())
    storage = absolute(cfg.run_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     accelerator_type=cfg.accelerator_type),
        run_config=RunConfig(name=RAY_DIR, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env=worker_env(cfg.use_gpu)),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


__all__ = ["train", "check", "init_ray", "ConfigError", "DataError"]
