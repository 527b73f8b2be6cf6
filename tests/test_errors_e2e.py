"""Issue 12, the rows that need Ray Train: warnings that let training go on, and errors inside the workers
that stop the run at once (Ctrl-C and the other stop signals: test_reliability.py; a generation into a
folder a failed run left: test_generate_e2e.py)."""
import json
import os
import re
import shutil
import time

import pytest

from cffa_ray.quiet import NOISE
from cffa_ray.train.run_folder import RunFolder
from tests.helpers import QUICK_TRAIN, assert_ok, log_steps, odd_pairs, run_cli

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
    training goes on for four steps, keeping the 3 latest checkpoints. Then a rerun for more steps with an absurd
    --lr resumes from step 4 (with the new --lr) and diverges: it stops at step 5 with one line, before anything
    of step 5 is saved."""
    data = odd_pairs(tmp_path / "odd")
    argv = ("train", "--data", data, "--output_dir", tmp_path / "runs", "--name", "w", *QUICK_TRAIN,
            "--val_fraction", 0, "--val_every", 1, "--checkpoint_every", 1)
    proc = run_cli(*argv, "--max_steps", 4)
    assert_ok(proc)
    run = tmp_path / "runs/w"
    assert sorted(os.listdir(run / "latest_checkpoints")) == ["step_000002", "step_000003", "step_000004"]
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
                        r"step 5, likely --lr 1e\+30 is too high: try a lower one; the last checkpoint \(step 4\) "
                        r"is kept, and rerunning with the same --name resumes from it", line), line
    assert "resuming at step 4" in proc.stdout
    assert sorted(os.listdir(run / "latest_checkpoints")) == ["step_000002", "step_000003", "step_000004"]
    assert json.loads((run / "best_checkpoint/model.json").read_text())["trained_steps"] <= 4
    assert RunFolder(str(run)).resumable_step() == 4
    # the rerun's log lines follow the first run's, every step once (step 5's training loss was still finite: the
    # update it made diverged, and its validation stopped the run)
    assert log_steps(run / "training_log.txt") in ([1, 2, 3, 4], [1, 2, 3, 4, 5])
    assert log_steps(run / "validation_log.txt") == [1, 2, 3, 4]
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
