"""`cffa report RUN_DIR`: report.html (self-contained) + PNGs, checked as files and in a real browser."""
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cffa_ray.cli import main
from cffa_ray.report import GALLERY_PNG, LOSSES_PNG, REPORT_HTML, loss_panels, parse_log, pick_rows
from tests.helpers import fails_in_driver

CHROMIUM = "/usr/bin/chromium"
STEPS, PAIRS = (0, 6, 12), 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as `cffa train` writes it: both logs and three step_XXXXXX_random_pairs/."""
    from cffa_ray.run_layout import TRAINING_LOG, VALIDATION_LOG, log_line
    from cffa_ray.synth import make_pair
    from cffa_ray.train.run_folder import RunFolder

    root = tmp_path_factory.mktemp("run") / "r"
    run = RunFolder(str(root))
    for step in range(2, 13, 2):
        run.append(TRAINING_LOG, log_line(step, {"loss": 3 - step / 10, "loss_cf": 1.5, "loss_fa": 1.4,
                                                 "struct": 0.1, "mse_cf": 1.2, "mse_fa": 1.1, "hf_cf": 0.2,
                                                 "hf_fa": 0.3, "lr": 1e-4, "steps_per_s": 2.0}))
    for step in (6, 12):
        run.append(VALIDATION_LOG, log_line(step, {"val_loss": 2.5, "val_mse_cf": 1.1, "val_struct": 0.05}))
    for step in STEPS:
        pairs = [make_pair(np.random.default_rng([step, k]), 64) for k in range(PAIRS)]
        cf = np.stack([np.asarray(c) for c, _ in pairs])
        fa = np.stack([np.repeat(np.asarray(f)[..., None], 3, axis=-1) for _, f in pairs])
        run.write_samples(step, cf, fa)
    (root / "run.json").write_text('{"model": "dual_unet"}')
    return root


@pytest.fixture(scope="module")
def report(run_dir):
    assert main(["report", str(run_dir)]) == 0
    return run_dir / REPORT_HTML


def test_report_files(report, run_dir):
    page = report.read_text()
    sources = re.findall(r"src='([^']*)'", page)
    assert all(s.startswith("data:image/") for s in sources), "report.html must not link to other files"
    assert len(sources) == 1 + len(STEPS) * PAIRS  # the curves, then one CF|FA|chessboard cell per pair and step
    assert "best validation loss 2.5 at step 6" in page
    for step in STEPS:
        assert f"<th>{step}</th>" in page
    losses, gallery = Image.open(run_dir / LOSSES_PNG), Image.open(run_dir / GALLERY_PNG)
    assert losses.width > 800 and losses.height > 300
    assert gallery.height >= len(STEPS) * 128 and gallery.width >= PAIRS * 3 * 128
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_log_parsing_and_panels():
    train = parse_log("step=000002 loss=3 loss_cf=1.5 mse_cf=1 lr=0.1 steps_per_s=2 gpu_peak_gib=9\nnot a log line\n"
                      "step=000004 loss=2.5 loss_cf=1.2 mse_cf=0.9 lr=0.1 steps_per_s=2 pairs_per_s=8\n")
    val = parse_log("step=000004 val_loss=2.4 val_hf_fa=0.1\n")
    assert train["loss"] == [(2, 3.0), (4, 2.5)] and val["val_hf_fa"] == [(4, 0.1)]
    assert loss_panels(train, val) == {"loss": ["loss", "loss_cf"], "mse": ["mse_cf"], "hf": ["hf_fa"]}


def test_gallery_rows_are_evenly_spaced_with_first_and_last():
    assert pick_rows(list(range(5)), 12) == list(range(5))
    rows = pick_rows(list(range(100)), 12)
    assert len(rows) == 12 and rows[0] == 0 and rows[-1] == 99


def test_report_bad_run_dir(capsys, tmp_path):
    fails_in_driver(capsys, ["report", str(tmp_path / "nope")], r"RUN_DIR .*nope is not a folder", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    fails_in_driver(capsys, ["report", str(tmp_path / "empty")], r"has no training_log.txt",
                    tmp_path / "empty" / REPORT_HTML)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp(prefix="cffa-chromium-")
    try:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,2000",
                        f"file://{report}"], capture_output=True, timeout=120, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2000, 1400)
    # matplotlib's first line colour (the curves) and the fundus orange of the CF previews are on screen
    blue = (abs(pixels - [31, 119, 180]).sum(-1) < 40).sum()
    orange = ((pixels[..., 0] > 120) & (pixels[..., 1] < pixels[..., 0] * 0.6) & (pixels[..., 2] < 60)).sum()
    assert blue > 500, f"no curves visible ({blue} blue pixels)"
    assert orange > 2000, f"no gallery visible ({orange} fundus-coloured pixels)"


@pytest.mark.slow
def test_training_run_ends_with_its_report(trained_run):
    run, proc = trained_run
    assert f"[cffa] report: {run / REPORT_HTML}" in proc.stdout
    assert (run / LOSSES_PNG).is_file() and (run / GALLERY_PNG).is_file()
    assert "data:image/png;base64," in (run / REPORT_HTML).read_text()
