"""The names of what a training run folder holds, shared by the trainer that writes it and the
tools that read it (`cffa report`, generation's checkpoint checks, resume).

<output_dir>/<name>/
    training_log.txt                     `step=000010 loss=... loss_cf=...`, one line per --log_every steps
    validation_log.txt                   `step=000500 val_loss=...`, one line per --val_every steps
    step_XXXXXX_random_pairs/pair_NN/    cf.png fa.png joint.png cf_fa_chessboard.png
    best_checkpoint/                     lowest validation loss so far
    latest_checkpoints/step_XXXXXX/      the --keep_latest most recent
    ray_train/                           Ray Train's resumable DeepSpeed checkpoints (all ranks)
    run.json                             the model settings, checked when a rerun resumes; the --data it read

Each checkpoint folder holds one peft folder per LoRA adapter and model.json (MODEL_RECORD).
"""
from __future__ import annotations

import re

TRAINING_LOG, VALIDATION_LOG = "training_log.txt", "validation_log.txt"
BEST, LATEST = "best_checkpoint", "latest_checkpoints"
RAY_DIR = "ray_train"
RUN_RECORD = "run.json"
MODEL_RECORD = "model.json"  # in every checkpoint folder: what rebuilds the model
STEP_LINE = re.compile(r"^step=(\d+)\b")
SAMPLES_DIR = re.compile(r"^step_(\d{6,})_random_pairs$")


def step_name(step: int) -> str:
    """'step_000500': the folder name of a checkpoint (and the prefix of a samples folder)."""
    return f"step_{step:06d}"


def samples_dir(step: int) -> str:
    """'step_000500_random_pairs': the preview pairs written at `step`."""
    return f"{step_name(step)}_random_pairs"


def log_line(step: int, values: dict[str, float]) -> str:
    """One log line: 'step=000010 loss=0.123 loss_cf=...' (6 significant digits)."""
    return " ".join([f"step={step:06d}"] + [f"{k}={v:.6g}" for k, v in values.items()])


def parse_log_line(line: str) -> tuple[int, dict[str, float]] | None:
    """The inverse of `log_line`: (step, {name: value}), or None for a line that is not one whole log
    line (no step, a field without '=' or a name, a value that is not a number: a damaged or hand-edited log)."""
    step, values = None, {}
    for field in line.split():
        name, eq, value = field.partition("=")
        if not eq or not name:
            return None
        try:
            if name == "step":
                step = int(value)
            else:
                values[name] = float(value)
        except ValueError:
            return None
    return None if step is None else (step, values)
