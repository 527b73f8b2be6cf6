"""The driver side of `cffa train`: check everything, prepare Ray Data, run the TorchTrainer."""
from __future__ import annotations

import dataclasses
import os
import time

from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cffa_ray import stop_signals
from cffa_ray.checks import check_base_model, check_output_dir, check_run_folder
from cffa_ray.data import TRAIN, VAL, assign_split, discover_pairs
from cffa_ray.errors import ConfigError, DataError, Interrupted, RunStopped, warn
from cffa_ray.flags import to_dict
from cffa_ray.folder_lock import folder_lock
from cffa_ray.io import changed_fields
from cffa_ray.paths import absolute, is_uri, join_path
from cffa_ray.quiet import quiet_ray, train_logging
from cffa_ray.report import write_report
from cffa_ray.run_layout import RAY_DIR, RUN_RECORD
from cffa_ray.runtime import check_resources, init_ray
from cffa_ray.shared_storage import check_shared_folder
from cffa_ray.train.config import TrainConfig
from cffa_ray.train.datasets import training_datasets
from cffa_ray.train.run_folder import RunFolder
from cffa_ray.train.stop import STOPPED


def train_loop(config: dict) -> dict:
    """Ray Train's function on each worker. The loop (diffusers, peft, DeepSpeed) is imported there, in the
    worker's process: the driver, which only hands this function over, starts ~10 s sooner on 2 cores."""
    from cffa_ray.train.loop import train_loop_per_worker

    return train_loop_per_worker(config)


def check(cfg: TrainConfig) -> list[dict]:
    """Every check that needs no Ray: flags, base model, pairs. Returns split pair records."""
    cfg.validate()
    check_output_dir(cfg.output_dir, "--output_dir")
    if not is_uri(cfg.run_dir):  # (a URI was just probed)
        check_output_dir(cfg.run_dir, f"--output_dir {cfg.output_dir} --name {cfg.name}: the run folder")
    if cfg.preset is None:
        check_base_model(cfg.base_model_or_default, cfg.model)
    check_resumable(cfg)
    check_run_folder(cfg.run_dir)
    records = assign_split(discover_pairs(cfg.data), cfg.val_fraction, cfg.seed)
    n_train = sum(r["split"] == TRAIN for r in records)
    need = cfg.num_workers * cfg.batch_size
    if n_train < need:
        raise DataError(f"--data has {n_train} training pair(s); --num_workers {cfg.num_workers} x "
                        f"--batch_size {cfg.batch_size} needs at least {need}: add pairs or lower those flags")
    if n_train == len(records):
        no_val = (f"no validation pairs ({len(records)} pair(s), --val_fraction {cfg.val_fraction:g}): validation "
                  "scores training pairs, so val_loss and best_checkpoint show how well they are fitted, not how "
                  "well the model generalises; add pairs, or a split column to a manifest")
        if cfg.strict:
            raise DataError(f"{no_val} (--strict)")
        warn(f"{no_val}; --strict makes this an error")
    return records


def check_resumable(cfg: TrainConfig) -> None:
    """A rerun resumes the run folder; refuse settings its checkpoints cannot be resumed with."""

    diffs = changed_fields(join_path(cfg.run_dir, RUN_RECORD), cfg.resume_record(), free=("data",))
    if diffs:
        raise ConfigError(f"run {cfg.run_dir} was started with other settings ({'; '.join(diffs)}); "
                          "rerun with those to resume it, or pick a new --name")


def worker_env(use_gpu: bool) -> dict:
    """Environment of the training workers (merged into a job's own runtime env, not clashing with it)."""
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # the patch would echo every worker line twice
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # must be set before deepspeed is first imported
    return {"env_vars": env}


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute: workers and later generation jobs may not share our cwd."""
    base = cfg.base_model
    if base and os.path.exists(os.path.expanduser(base)):
        base = os.path.abspath(os.path.expanduser(base))
    return dataclasses.replace(cfg, output_dir=absolute(cfg.output_dir), base_model=base)


def train(cfg: TrainConfig):
    """Train; returns the Ray Train Result (None when the run had already reached --max_steps).
    Raises ConfigError / DataError before any work."""
    cfg = absolute_paths(cfg)
    records = check(cfg)
    with folder_lock(cfg.run_dir, "run folder", "cffa train", rerun="resumes from its last checkpoint",
                     instead="pick another --name"):  # one training run writing into it at a time
        return _train(cfg, records)


def _train(cfg: TrainConfig, records: list[dict]):
    """train() once the run folder is checked and locked."""
    run = RunFolder(cfg.run_dir)
    run.remove_leftovers()  # a killed run's half-staged checkpoints and samples
    done = run.resumable_step()
    if done >= cfg.max_steps:  # a finished run: nothing for Ray to start
        print(f"[cffa] run {cfg.run_dir} is already at step {done} (--max_steps {cfg.max_steps}): nothing to "
              "train; raise --max_steps to train on", flush=True)
        _write_report(cfg)
        return None
    train_records = [r for r in records if r["split"] == TRAIN]
    val_records = [r for r in records if r["split"] == VAL] or train_records[: max(1, cfg.batch_size)]  # warned
    init_ray(cfg.num_workers * cfg.cpus_per_worker)
    check_resources(cfg.use_gpu, cfg.num_workers, "--num_workers", cfg.accelerator_type, cfg.custom_resources)
    check_shared_folder(cfg.output_dir, "--output_dir")
    quiet_ray()
    t0 = time.time()
    train_ds, val_ds, shuffle_buffer = training_datasets(cfg, train_records, val_records)
    what = "decoded and VAE-encoded once (latent cache)" if cfg.cache_latents else "decoded"
    print(f"[cffa] {len(train_records)} training and {len(val_records)} validation pairs {what} "
          f"at {cfg.resolution}px in {time.time() - t0:.1f}s", flush=True)

    # and the pairs it trained on: `cffa evaluate` finds them there for its memorisation check (a rerun
    # may read them from elsewhere: `data` is not compared when it resumes)
    RunFolder(cfg.run_dir).write_json(RUN_RECORD, {**cfg.resume_record(), "data": absolute(cfg.data)})
    storage = absolute(cfg.run_dir)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "shuffle_buffer": shuffle_buffer},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.custom_resources},
                                     accelerator_type=cfg.accelerator_type),
        run_config=RunConfig(name=RAY_DIR, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env=worker_env(cfg.use_gpu), logging_config=train_logging()),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except SystemExit:  # Ray Train aborts the run on Ctrl-C, then its waiting ray.get exits the driver
        raise Interrupted(resume_hint(cfg)) from None
    outcome = getattr(result, "return_value", {"step": None}) or {}  # (Ray before return_value: no Ctrl-C check)
    if outcome.get(STOPPED):
        raise RunStopped(outcome[STOPPED])
    if "step" not in outcome:  # the train function did not finish: Ctrl-C stopped the run
        raise Interrupted(resume_hint(cfg))
    _write_report(cfg)
    return result


def _write_report(cfg: TrainConfig) -> None:
    """report.html of the finished run: a report that cannot be drawn is a warning, never a failed run."""
    try:
        print(f"[cffa] report: {write_report(cfg.run_dir)}", flush=True)
    except Exception as e:
        print(f"[cffa] warning: report.html not written ({type(e).__name__}: {e}); "
              f"retry with `cffa report {cfg.run_dir}`", flush=True)


def resume_hint(cfg: TrainConfig) -> str:
    step = RunFolder(cfg.run_dir).resumable_step()
    where = f"from step {step}, its last checkpoint" if step else "from the start (no checkpoint was saved yet)"
    return f"training {stop_signals.interrupted()}; rerun the same command to resume {where}"


