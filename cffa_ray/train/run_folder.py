"""The run folder (layout and names: run_layout.py), written by rank 0 only.

Every LoRA checkpoint folder holds one peft `save_pretrained` folder per adapter plus model.json,
the record generation needs to rebuild the model. Folders appear complete or not at all.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from cffa_ray.images import pair_pngs
from cffa_ray.io import atomic_write_text, filesystem, read_text, remove_paths, staged
from cffa_ray.paths import is_uri, join_path
from cffa_ray.run_layout import (
    BEST,
    LATEST,
    MODEL_RECORD,
    RAY_DIR,
    STEP_LINE,
    TRAINING_LOG,
    VALIDATION_LOG,
    samples_dir,
    step_name,
)


class RunFolder:
    def __init__(self, root: str):
        self.root = root
        self._logs: dict[str, list[str]] = {}

    def path(self, *parts: str) -> str:
        return join_path(self.root, *parts)

    # ---- logs: kept in memory, rewritten atomically (works the same on object stores)
    def _read(self, name: str) -> list[str]:
        if name not in self._logs:
            self._logs[name] = (read_text(self.path(name)) or "").splitlines()
        return self._logs[name]

    def append(self, name: str, line: str) -> None:
        lines = self._read(name)
        lines.append(line)
        atomic_write_text(self.path(name), "\n".join(lines) + "\n")

    def rewind(self, step: int) -> None:
        """On resume from `step`, drop log lines of steps that will be trained again."""
        for name in (TRAINING_LOG, VALIDATION_LOG):
            lines = self._read(name)
            kept = [ln for ln in lines if not (m := STEP_LINE.match(ln)) or int(m.group(1)) <= step]
            if kept != lines:
                self._logs[name] = kept
                atomic_write_text(self.path(name), "\n".join(kept) + ("\n" if kept else ""))

    # ---- sample pairs
    def write_samples(self, step: int, cf, fa) -> str:
        """uint8 arrays [N, H, W, 3] -> step_XXXXXX_random_pairs/pair_NN/*.png."""
        final = self.path(samples_dir(step))
        with staged(final) as stage:
            for i in range(len(cf)):
                (stage / f"pair_{i:02d}").mkdir()
                for fname, data in pair_pngs(cf[i], fa[i]).items():
                    (stage / f"pair_{i:02d}" / fname).write_bytes(data)  # the staging folder is hidden already
        return final

    # ---- LoRA checkpoints
    def export(self, model, record: dict, final: str, states: dict | None = None) -> str:
        """A checkpoint folder: one peft folder per adapter, extra formats, model.json (written last).

        `states`: {adapter folder: LoRA state dict} to save instead of the module's own weights
        (the fp32 masters during mixed-precision training).
        """
        states = states or {}
        with staged(final, marker=MODEL_RECORD) as stage:
            for folder, peft_model in model.adapters().items():
                peft_model.save_pretrained(str(stage / folder), state_dict=states.get(folder))
            model.save_extra(stage, states)
            (stage / MODEL_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
        return final

    def export_best(self, model, record: dict, states: dict | None = None) -> str:
        return self.export(model, record, self.path(BEST), states)

    def export_latest(self, model, record: dict, step: int, keep: int, states: dict | None = None) -> str:
        out = self.export(model, record, self.path(LATEST, step_name(step)), states)
        self._prune_latest(keep)
        return out

    def best_val_loss(self) -> float:
        """The validation loss recorded in best_checkpoint/model.json (inf when there is none)."""
        text = read_text(self.path(BEST, MODEL_RECORD))
        return json.loads(text).get("val_loss", math.inf) if text else math.inf

    def resumable_step(self) -> int:
        """The step a rerun resumes from: Ray Train's latest registered checkpoint (0: none yet).

        Ray Train registers a reported checkpoint at its next poll of the workers, so a run stopped
        right after a checkpoint may resume from the one before (see README, resume and faults).
        """
        text = read_text(self.path(RAY_DIR, "checkpoint_manager_snapshot.json"))
        try:
            latest = json.loads(text)["latest_checkpoint_result"] if text else None
            return int(latest["metrics"]["step"]) if latest else 0
        except (ValueError, KeyError, TypeError):
            return 0

    def latest_steps(self) -> list[str]:
        fs, p = filesystem(self.path(LATEST))
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
        return sorted((n for n in names if re.fullmatch(r"step_\d{6,}", n)), key=lambda n: int(n[5:]))

    def _prune_latest(self, keep: int) -> None:
        for name in self.latest_steps()[:-keep]:
            target = self.path(LATEST, name)
            if is_uri(target):
                fs, p = filesystem(target)
                fs.delete_dir(p)
            else:
                shutil.rmtree(target, ignore_errors=True)

    def remove_leftovers(self) -> int:
        """Delete the hidden staging folders and files (io.py) a killed run left in the run folder and in
        latest_checkpoints/; returns how many. Only under the run-folder lock: no other run writes here.
        Ray Train's own folder is left to Ray. Local folders only (object stores show no half-made keys).
        """
        if is_uri(self.root):
            return 0
        return remove_paths([p for folder in (Path(self.root), Path(self.root, LATEST))
                             for pattern in (".*.tmp-*", ".*.old-*", ".*.tmp") for p in folder.glob(pattern)])

    def write_json(self, name: str, payload: dict) -> None:
        atomic_write_text(self.path(name), json.dumps(payload, indent=2, sort_keys=True))
