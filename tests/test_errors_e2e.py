"""Issue 12, the rows that need Ray Train or a finished run: warnings that let training go on, errors
inside the workers that stop the run at once, and a rerun after a failed generation (Ctrl-C and the
other stop signals: test_reliability.py)."""
import json
import os
import re
import shutil
import time

import pytest

from cffa_ray.quiet import NOISE
from cffa_ray.train.run_folder import RunFolder
from tests.helpers import QUICK_TRAIN, assert_ok, odd_pairs, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_head")]  # CLI runs join one Ray head


def error_line(proc, command: str) -> str:
    """The one error line; nothing else on stderr but [cffa] lines, no traceback, none of Ray's noise."""
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith(f"cffa {command}: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not [ln for ln in proc.stdout.splitlines() + err if NOISE.search(ln)]
    return err[-1]


def test_odd_images_warn_and_train_then_a_diverging_loss_stops_at_once(tmp_path):
    """Odd images (and a 16-bit FA and an EXIF-turned CF, which need no warning): one warning per kind,
    training goes on for two steps. Then a rerun with an absurd --lr resumes from step 2 (with the new --lr) and
    diverges: it stops at step 3 with one line, before anything of step 3 is saved."""
    data = odd_pairs(tmp_path / "odd")
    argv = ("train", "--data", data, "--output_dir", tmp_path / "runs", "--name", "w", *QUICK_TRAIN,
            "--val_fraction", 0, "--val_every", 1, "--checkpoint_every", 1)
    proc = run_cli(*argv, "--max_steps", 2)
    assert_ok(proc)
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("[cffa] warning: ")]
    kinds = ["pairs whose CF and FA differ", "images that are not square", "images much smaller than --resolution",
             "CF images that are greyscale", "images with transparent pixels", "over PIL's decompression-bomb limit",
             "no validation pairs (8 pair(s)"]
    assert len(warnings) == len(kinds), proc.stderr
    for kind in kinds:
        assert sum(kind in w for w in warnings) == 1, kind
    assert all(w.endswith("--strict makes this an error") for w in warnings)
    assert "Traceback" not in proc.stderr and not [ln for ln in proc.stderr.splitlines() if NOISE.search(ln)]

    t0 = time.time()
    proc = run_cli(*argv, "--max_steps", 40, "--lr", 1e30)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc, "train")
    assert re.fullmatch(r"cffa train: error: training stopped: the (validation )?loss became NaN or infinite at "
                        r"step 3, likely --lr 1e\+30 is too high: try a lower one; the last checkpoint \(step 2\) "
                        r"is kept, and rerunning with the same --name resumes from it", line), line
    assert "resuming at step 2" in proc.stdout
    run = tmp_path / "runs/w"
    assert sorted(os.listdir(run / "latest_checkpoints")) == ["step_000001", "step_000002"]
    assert json.loads((run / "best_checkpoint/model.json").read_text())["trained_steps"] <= 2
    assert RunFolder(str(run)).resumable_step() == 2
    print(f"non-finite loss: the run stopped {time.time() - t0:.0f}s after its start")


def test_worker_error_that_no_retry_heals_stops_the_run_at_once(tmp_path, pairs_dir, sd15_folder):
    """A base model that passes the driver's file checks but cannot be built: one attempt, one line."""
    broken = tmp_path / "broken"
    shutil.copytree(sd15_folder, broken)
    config = json.loads((broken / "unet/config.json").read_text())
    config["block_out_channels"] = [16, 64]  # the weights hold 32, 64
    (broken / "unet/config.json").write_text(json.dumps(config))
    proc = run_cli("train", "--data", pairs_dir, "--output_dir", tmp_path / "runs", "--base_model", broken,
                   "--resolution", 64, "--num_workers", 1, "--no-cache_latents", "--max_steps", 2, "--max_failures", 3)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc, "train")
    assert line.startswith("cffa train: error: the model could not be built on worker ") and "conv_in" in line, line
    assert line.endswith("check --base_model (it must be readable on every node)")


def test_generation_after_a_failed_run_into_the_same_folder(tmp_path, trained_run):
    run, _ = trained_run
    good = run / "best_checkpoint"
    bad = tmp_path / "truncated"
    shutil.copytree(good, bad)
    weights = bad / "unet_cf_lora/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "g"
    t0 = time.time()
    proc = run_cli("generate", "--checkpoint_dir", bad, "--output_dir", out, "--num_samples", 2, "--steps", 2)
    assert proc.returncode == 2 and time.time() - t0 < 60
    assert "unet_cf_lora/adapter_model.safetensors is not a readable safetensors file" in error_line(proc, "generate")
    assert not out.exists()
    # A folder left by a run that made no pair (its generation.json names other arguments) blocks nothing.
    out.mkdir()
    (out / "generation.json").write_text(json.dumps({"checkpoint": str(bad), "steps": 50}))
    proc = run_cli("generate", "--checkpoint_dir", good, "--output_dir", out, "--num_samples", 2, "--steps", 2,
                   "--batch_size", 2)
    assert_ok(proc)
    assert json.loads((out / "summary.json").read_text())["pairs_in_output"] == 2
    assert json.loads((out / "generation.json").read_text())["steps"] == 2
