"""Issue 20, reliability round 3: EXIF orientation, huge images, malformed logs, Unicode run names,
file permissions under the umask, a full disk, a second job into one folder, and SIGTERM/SIGHUP.
The rows that fail before Ray starts run through cli.main (fast); the others through the real CLI (slow)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import time
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cffa_ray.cli import main
from cffa_ray.decoding import load_pair, read_image
from cffa_ray.folder_lock import LOCK_FILE, folder_lock
from cffa_ray.io import publish_dir, staging_dir
from cffa_ray.pixels import geometry_warnings, open_image
from cffa_ray.train.run_folder import RunFolder
from tests.helpers import (
    QUICK_TRAIN,
    fails_in_driver,
    gen_argv,
    lock_held_elsewhere,
    log_steps,
    run_cli,
    running,
    start_cli,
)
from tests.sim_cluster import wait_for

# EXIF orientation -> how the stored pixels were turned from the upright picture (PIL's ROTATE_90 is
# counter-clockwise): orientation 6 = "rotate 90° clockwise to view", so the camera stored it turned
# 90° counter-clockwise.
STORED_AS = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
             7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
FORMATS = {"png": "PNG", "tif": "TIFF", "jpg": "JPEG"}


def upright_picture(width: int = 48, height: int = 32) -> Image.Image:
    """An RGB picture that no turn or flip maps onto itself: coarse blocks of distinct colours."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x // 8) * 40 % 256, (y // 8) * 60 % 256, ((x // 8) + 2 * (y // 8)) * 25 % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def save_with_orientation(upright: Image.Image, path, orientation: int, fmt: str) -> None:
    stored = upright if STORED_AS[orientation] is None else upright.transpose(STORED_AS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    stored.save(path, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_read_upright(tmp_path, suffix, orientation):
    picture = upright_picture()
    path = tmp_path / f"cf.{suffix}"
    save_with_orientation(picture, path, orientation, FORMATS[suffix])
    image, _ = read_image(str(path), "RGB")
    assert image.size == picture.size
    error = np.abs(np.asarray(image, np.int16) - np.asarray(picture, np.int16)).mean()
    assert error < (4 if suffix == "jpg" else 0.01), f"orientation {orientation} ({suffix}): mean error {error}"
    if STORED_AS[orientation] is not None and suffix != "tif":  # as stored it would be far off (PIL itself
        # turns TIFFs upright as it loads them)
        raw = np.asarray(Image.open(path).convert("RGB"), np.int16)
        assert raw.shape != np.asarray(picture).shape or np.abs(raw - np.asarray(picture, np.int16)).mean() > 10


def test_a_rotated_cf_beside_an_upright_fa_is_one_registered_pair(tmp_path):
    """The issue's case: a CF JPEG with orientation 6 beside the upright FA: same size, no pair warning,
    and the decoded CF is the FA's picture (here both are the same picture)."""
    picture = upright_picture(64, 48)
    save_with_orientation(picture, tmp_path / "cf.jpg", 6, "JPEG")
    picture.save(tmp_path / "fa.png")
    cf, fa, warnings = load_pair(str(tmp_path / "cf.jpg"), str(tmp_path / "fa.png"), 64)
    assert not [w for w in warnings if w.startswith("pair_size")], warnings
    luminance = cf.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # PIL's "L"
    assert np.abs(luminance - fa[..., 0]).mean() < 4


def test_damaged_exif_leaves_the_pixels_as_stored(tmp_path):
    picture = upright_picture()
    path = tmp_path / "cf.jpg"
    picture.save(path, quality=95, exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")  # IFD offset past the end
    assert open_image(path.read_bytes()).size == picture.size


def test_an_image_over_the_decompression_bomb_limit_is_a_listed_warning(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 = 1600: over the limit, under twice it
    upright_picture(40, 40).save(tmp_path / "cf.png")
    Image.new("L", (20, 20)).save(tmp_path / "fa.png")
    _, _, warnings = load_pair(str(tmp_path / "cf.png"), str(tmp_path / "fa.png"), 32)
    assert f"huge\t{tmp_path.name}/cf.png 40x40" in warnings, warnings
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "huge" not in geometry_warnings((31, 32), 32)


# ------------------------------------------------------------------ cffa report: malformed log lines

@pytest.mark.parametrize("bad", ["step=000020 loss=0.4 loss_cf=", "step=000020 loss=0.4 loss_cf=oops",
                                 "step= loss=1", "step=000020 loss", "step=000020 =3", "garbage, half a line"])
def test_report_skips_a_malformed_log_line_with_one_warning(tmp_path, capsys, bad):
    run = tmp_path / "run"
    run.mkdir()
    (run / "training_log.txt").write_text(f"step=000010 loss=0.5 loss_cf=0.2\n{bad}\n\nstep=000030 loss=0.3 "
                                          "loss_cf=0.1\n")
    (run / "validation_log.txt").write_text("step=000010 val_loss=0.5\nstep=000020 val_loss=x\n")
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0] == f"[cffa] warning: training_log.txt: skipped 1 malformed line(s) (line 2: {bad!r}); " \
                     "the curves leave them out"
    assert "validation_log.txt" in err[1] and "line 2: 'step=000020 val_loss=x'" in err[1]
    assert (run / "report.html").is_file()


# ------------------------------------------------------------------ --name in any alphabet

@pytest.mark.parametrize("name", ["rün", unicodedata.normalize("NFD", "rün"), "実験1", "Ωmega.v2", "données_3"])
def test_a_run_name_in_any_alphabet_is_accepted(capsys, tmp_path, name):
    """The name passes (the run goes on to the next check: here a --data that does not exist)."""
    err = fails_in_driver(capsys, ["train", "--data", tmp_path / "none", "--output_dir", tmp_path / "out",
                                   "--name", name, "--preset", "tiny"], r"--data", tmp_path / "out")
    assert "--name" not in err


@pytest.mark.parametrize("name", ["a/b", "..", "_x", ".hidden", "a b", "x..y"])
def test_a_run_name_that_is_no_plain_folder_name_is_refused(capsys, tmp_path, name):
    fails_in_driver(capsys, ["train", "--data", tmp_path, "--output_dir", tmp_path / "out", "--name", name],
                    r"--name .* must be a plain folder name \(letters of any alphabet", tmp_path / "out")


# ------------------------------------------------------------------ SIGTERM, SIGHUP: like Ctrl-C

def caught_signals(pid: int) -> int:
    """The signals a process has handlers for (bit n-1 for signal n), from /proc/PID/status's SigCgt."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


@pytest.mark.parametrize("command", ["train", "generate"])
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_stop_signal_is_one_line_and_its_exit_code(tmp_path, data, fake_checkpoint, command, signum, code):
    """The signal lands before the command starts its job (parked there by the fault hook, whatever the
    machine's speed; the rows that need Ray are the slow tests below): one line, 128 + the signal's number,
    nothing written."""
    out = tmp_path / "out"
    argv = {"train": ("train", "--data", data, "--output_dir", out, "--preset", "tiny"),
            "generate": ("generate", "--checkpoint_dir", fake_checkpoint, "--output_dir", out)}[command]
    proc = start_cli(*argv, env={"CFFA_INJECT_FAULT": f"command=1,hold={tmp_path / 'never'}"})
    wanted = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGHUP - 1))
    wait_for(lambda: running(proc) and caught_signals(proc.pid) & wanted == wanted, 60,
             "stop_signals.install() to have run", every=0.02)
    os.kill(proc.pid, signum)
    assert proc.wait(timeout=60) == code
    name = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    assert proc.stdout.read().strip().splitlines() == [
        f"cffa {command}: interrupted{name}; rerun the same command to go on from where it stopped"]
    assert not out.exists()


# ------------------------------------------------------------------ one writing job per folder

def test_a_second_generate_into_a_locked_folder_says_who_writes(tmp_path, capsys, fake_checkpoint):
    out = tmp_path / "g"
    with lock_held_elsewhere(out, "--output_dir", "cffa generate") as holder:
        before = sorted(p.name for p in out.iterdir())
        code = main(gen_argv(fake_checkpoint, out, "--num_samples", 2))
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert re.fullmatch(rf"cffa generate: error: --output_dir {re.escape(str(out))}: another job is writing into "
                            rf"it \(cffa generate, pid {holder.pid} on \S+, since [\d-]+ [\d:]+\); wait for it to end "
                            r"\(a rerun then makes only what is missing\) or give another --output_dir", err), err
        assert sorted(p.name for p in out.iterdir()) == before, "the refused job wrote something"
    with folder_lock(str(out), "--output_dir", "test"):  # the killed holder's file is taken over
        assert (out / LOCK_FILE).read_text().startswith(f"test, pid {os.getpid()} on ")
    assert not (out / LOCK_FILE).exists()
    with folder_lock(str(tmp_path / "new" / "run"), "--output_dir", "test"):
        assert (tmp_path / "new" / "run" / LOCK_FILE).is_file()
    assert not (tmp_path / "new").exists(), "the lock made the folders and nothing else was written: they are gone"
    with folder_lock(str(tmp_path / "new" / "run"), "--output_dir", "test"):
        (tmp_path / "new" / "kept.txt").write_text("a job's output beside the run folder")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["kept.txt"], "only the empty ones go"


def test_a_second_train_into_a_locked_run_folder_says_who_writes(tmp_path, capsys, data):
    """Two `cffa train` with one --output_dir and --name: the second refuses before Ray, in one line."""
    run = tmp_path / "runs" / "t"
    with lock_held_elsewhere(run, "run folder", "cffa train") as holder:
        code = main(["train", "--data", str(data), "--output_dir", str(tmp_path / "runs"), "--name", "t",
                     "--preset", "tiny", "--resolution", "64"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert re.fullmatch(rf"cffa train: error: run folder {re.escape(str(run))}: another job is writing into it "
                            rf"\(cffa train, pid {holder.pid} on \S+, since [\d-]+ [\d:]+\); wait for it to end \(a "
                            r"rerun then resumes from its last checkpoint\) or pick another --name", err), err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE], "the refused run wrote something"


# ------------------------------------------------------------------ a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs mounted at tmp_path/disk (root only: skipped elsewhere), unmounted after the test."""
    with tmpfs(tmp_path / "disk", "256k") as disk:
        yield disk


@contextlib.contextmanager
def tmpfs(disk, size: str):
    """A tmpfs of `size` mounted at `disk` (root only: the test is skipped elsewhere), unmounted after."""
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("a full disk is made with a small tmpfs, which needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk, leave: int = 0) -> None:
    """Fill the disk up to `leave` bytes free."""
    with open(disk / "filler", "wb") as f:
        while os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > leave + 4096:
            f.write(b"\0" * 4096)
            f.flush()


def test_a_full_disk_is_one_line_naming_the_folder(small_disk, capsys, fake_checkpoint, tmp_path):
    """Three commands, three places the disk fills: synthetic pairs part-way, a report's files, the first
    file generation writes. Each: exit 1, one line, 'no space left' and the folder."""
    code = main(["synth", "--out", str(small_disk / "pairs"), "--pairs", "40", "--size", "128"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert re.fullmatch(rf"cffa synth: error: no space left on the device of {small_disk}/pairs/(cf|fa) \(writing "
                        r"synth_\d+\.png\): free some space there, or give another --out; what was "
                        r"finished is kept, and a rerun goes on from it", err), err
    assert not [p for p in small_disk.rglob(".*")], "a temporary file was left"

    run = small_disk / "run"
    run.mkdir()
    (run / "training_log.txt").write_text("step=000001 loss=1\nstep=000002 loss=0.5\n")
    fill(small_disk)
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"cffa report: error: no space left on the device of {run} ")

    out = small_disk / "g"
    assert main(gen_argv(fake_checkpoint, out, "--num_samples", 2)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on device while writing to --output_dir" in err, err
    assert not out.exists()


def test_disk_full_is_recognised_in_ray_errors_text():
    """Ray re-raises a task's or training worker's error as text: the file is read back from it."""
    from cffa_ray.errors import disk_full

    assert disk_full(OSError(28, "No space left on device", "/x/y.png")) == "/x/y.png"
    assert disk_full(RuntimeError("worker died:\nOSError: [Errno 28] No space left on device: '/o/p/.part.tmp'")) \
        == "/o/p/.part.tmp"
    assert disk_full(RuntimeError("SafetensorError: Error while serializing: IoError(Os { code: 28, kind: "
                                  "StorageFull, message: \"No space left on device\" })")) == ""
    assert disk_full(OSError(13, "Permission denied", "/x")) is None
    assert disk_full(ValueError("loss is nan")) is None


# ------------------------------------------------------------------ permissions: what the umask allows

def test_files_and_folders_get_the_umasks_permissions(tmp_path):
    """synth and report write through the atomic temp files and staging folders, checkpoints are published
    from one; under umask 002 every file is 664 and every folder 775 (tempfile alone would make them 600 and
    700, and safetensors' save_file makes 600 files)."""
    old = os.umask(0o002)
    try:
        assert main(["synth", "--out", str(tmp_path / "pairs"), "--pairs", "2", "--size", "32"]) == 0
        stage = staging_dir(tmp_path / "run" / "best_checkpoint")
        (stage / "model.json").write_text("{}")
        (stage / "unet_cf_lora").mkdir()
        save_file({"w": torch.zeros(2)}, str(stage / "unet_cf_lora/adapter_model.safetensors"))  # safetensors: 0600
        publish_dir(stage, tmp_path / "run" / "best_checkpoint")
        (tmp_path / "run" / "training_log.txt").write_text("step=000001 loss=1\n")
        assert main(["report", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert {k for k, m in modes.items() if m != (0o775 if (tmp_path / k).is_dir() else 0o664)} == set(), modes
    assert len(modes) >= 12


# ------------------------------------------------------------------ the rows that need Ray (slow)


def files_in(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def assert_umask_modes(folder) -> None:
    """Every published file and folder under `folder` has what this process's umask allows (the CLI runs and
    the test session's Ray head inherit it): no 0600 / 0700 left from temporary files and folders. A hidden
    staging leftover (`.NAME.tmp-*`, `.NAME.*.tmp`) of a stopped run is skipped: it is half-written by design
    (its modes are set when it is published) and the next run removes it (RunFolder.remove_leftovers)."""
    mask = os.umask(0o022)
    os.umask(mask)
    published = [p for p in folder.rglob("*")
                 if not any(part.startswith(".") and ".tmp" in part for part in p.relative_to(folder).parts)]
    wrong = {p.relative_to(folder).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in published
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~mask}
    assert not wrong, wrong


def one_error_line(proc, command: str) -> str:
    """Nothing but [cffa] lines, Ray's prefixed worker lines and one last line; no traceback, no colour codes."""
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"cffa {command}: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-6000:]
    assert "\x1b[" not in proc.stdout + proc.stderr
    return lines[-1]


def _stop_at(proc, pattern: str, signum: int, before=lambda: None) -> list[str]:
    """Read `proc`'s output until a line matches `pattern`, call `before`, send `signum` (SIGINT to the whole
    foreground group, as Ctrl-C in a terminal does), and return every line it printed."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            before()
            if signum == signal.SIGINT:
                os.killpg(proc.pid, signum)
            else:
                os.kill(proc.pid, signum)
            break
    return lines + proc.stdout.readlines()


def train_actors(head) -> list[str]:
    """Pids of Ray Train actors (process titles ray::RayTrainWorker, ray::TrainController) that the shared
    head's raylet runs: another Ray on the machine (another checkout's suite) does not count."""
    raylet = subprocess.run(["pgrep", "-f", f"raylet.*{head.temp_dir}"], capture_output=True, text=True).stdout.split()
    assert len(raylet) == 1, f"the shared head's raylet: {raylet}"
    return subprocess.run(["pgrep", "-P", raylet[0], "-f", r"^ray::(RayTrainWorker|TrainController)"],
                          capture_output=True, text=True).stdout.split()


def _resume_step(line: str, how: str) -> int:
    match = re.fullmatch(rf"cffa train: training interrupted{how}; rerun the same command to resume "
                         r"(from step (\d+), its last checkpoint|from the start \(no checkpoint was saved yet\))",
                         line.strip())
    assert match, line
    return int(match.group(2) or 0)


@pytest.mark.slow
def test_sigterm_then_ctrl_c_stop_training_at_the_step_they_name(tmp_path, pairs_dir, ray_head):
    """`kill PID` (what `ray job stop` and a preempted node's shutdown send): Ray Train aborts the run before
    the line names its step, nothing is written after it, and the rerun resumes exactly there. The rerun is
    then stopped with Ctrl-C: exit 130, and the step it names is the one a rerun would resume from."""
    argv = ("train", "--data", pairs_dir, "--output_dir", tmp_path / "runs", "--name", "t", *QUICK_TRAIN,
            "--val_every", 3, "--max_steps", 100000)
    proc = start_cli(*argv)
    running = []
    lines = _stop_at(proc, r"\[cffa\] step 7/", signal.SIGTERM, before=lambda: running.extend(train_actors(ray_head)))
    assert running, "no Train actor found under the head's raylet while the run stepped: the wait below would be void"
    assert proc.wait(timeout=300) == 143, "".join(lines[-30:])
    text = "".join(lines)
    assert "Traceback" not in text and "SIGTERM received" not in text and "\x1b[" not in text, text[-3000:]
    step = _resume_step(lines[-1], " by SIGTERM")
    run = tmp_path / "runs/t"
    before = files_in(run)
    # Ray's workers outlive the driver by a moment: had the run not been aborted, they would write until they end
    wait_for(lambda: not train_actors(ray_head), 30, "the run's Train actors to end")
    assert files_in(run) == before, "the run went on writing after the line"

    proc = start_cli(*argv)
    lines = _stop_at(proc, rf"\[cffa\] step {step + 3}/", signal.SIGINT)
    assert proc.wait(timeout=300) == 130, "".join(lines[-30:])
    text = "".join(lines)
    assert (f"resuming at step {step}" if step else "starting ->") in text, text[-3000:]
    assert "(RayTrainWorker pid=" in text and "\x1b[" not in text  # plain prefixes into a pipe
    assert "Traceback" not in text, text[-3000:]
    again = _resume_step(lines[-1], "")
    assert again >= step and RunFolder(str(run)).resumable_step() == again
    # the logs were rewound to the step the rerun resumed from, and went on from there: every step once
    steps, validated = log_steps(run / "training_log.txt"), log_steps(run / "validation_log.txt")
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > step, steps
    assert validated == list(range(3, 3 * len(validated) + 1, 3)), validated
    # folders appear complete or not at all (a checkpoint staged when the signal came stays a hidden .tmp- folder)
    for folder in (f for f in (run / "latest_checkpoints").iterdir() if not f.name.startswith(".")):
        assert (folder / "model.json").is_file()
    assert_umask_modes(run)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_head")
def test_generate_sighup_then_a_full_disk_then_a_clean_finish(tmp_path, trained_run):
    """SIGHUP mid-run: one line with the pairs kept, exit 129. Then the disk fills under the writers: one
    line naming the folder, exit 1. Space freed, the rerun finishes every pair."""
    run, _ = trained_run
    with tmpfs(tmp_path / "disk", "3m") as disk:
        out = disk / "g"
        argv = gen_argv(run / "best_checkpoint", out, "--num_samples", 40, "--steps", 2, "--batch_size", 2,
                        "--rows_per_shard", 2)
        hold = tmp_path / "go"
        proc = start_cli(*argv, env={"CFFA_INJECT_FAULT": f"generate_batch=3,hold={hold}"})
        # two model calls made and committed; the third waits
        wait_for(lambda: running(proc) and list(out.glob("parquet/*.parquet")), 300, "the first committed shard")
        os.kill(proc.pid, signal.SIGHUP)
        assert proc.wait(timeout=120) == 129
        lines = proc.stdout.read().strip().splitlines()
        assert "[cffa] generating 40 pairs (0 already done), model_batch 8, 1 model actor -> " in "\n".join(lines)
        assert re.fullmatch(rf"cffa generate: generation interrupted by SIGHUP with \d+ of 40 pairs finished in "
                            rf"{re.escape(str(out))}; rerun the same command to make the rest", lines[-1]), lines[-5:]
        assert not [ln for ln in lines if "Traceback" in ln or "\x1b[" in ln], "\n".join(lines[-60:])

        fill(disk, leave=60_000)
        full = run_cli(*argv)
        assert full.returncode == 1, full.stderr[-3000:]
        line = one_error_line(full, "generate")
        where = re.escape(str(out))
        assert re.fullmatch(rf"cffa generate: error: no space left on (the device of {where}\S*( \(writing \S+\))?|"
                            rf"device while writing to --output_dir {where} \(or a temporary folder\)): free some "
                            r"space there, or give another --output_dir; what was finished is kept, and a rerun goes "
                            r"on from it", line), line

        (disk / "filler").unlink()
        done = run_cli(*argv)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["pairs_in_output"] == 40
        assert_umask_modes(out)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_head")
def test_training_on_a_full_disk_stops_at_once_in_one_line(tmp_path, pairs_dir):
    with tmpfs(tmp_path / "disk", "3m") as disk:
        fill(disk, leave=40_000)
        t0 = time.time()
        proc = run_cli("train", "--data", pairs_dir, "--output_dir", disk, "--name", "f", *QUICK_TRAIN,
                       "--max_steps", 20, "--val_every", 2, "--max_failures", 3)
        assert proc.returncode == 1, proc.stderr[-3000:]
        line = one_error_line(proc, "train")
        assert re.fullmatch(rf"cffa train: error: training stopped: no space left on the device of "
                            rf"{re.escape(str(disk))}/f\S*( \(writing \S+\))?; free some space there, then rerun with "
                            r"the same --name: it resumes from the last checkpoint", line), line
        assert proc.stdout.count("starting ->") == 1, "a worker-group restart: the full disk was retried"
        assert not [p for p in disk.rglob(".*") if p.name != ".validate_storage_marker"], "half-made folders left"
        print(f"full disk: training stopped {time.time() - t0:.0f}s after its start")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_head")
def test_evaluate_outputs_on_a_full_disk(tmp_path, pairs_dir):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "ev").mkdir()
        fill(disk)
        proc = run_cli("evaluate", "--generated", pairs_dir, "--real", pairs_dir, "--output", disk / "ev",
                       "--batch_size", 8)
        assert proc.returncode == 1, proc.stderr[-3000:]
        line = one_error_line(proc, "evaluate")
        assert re.fullmatch(rf"cffa evaluate: error: no space left on the device of {re.escape(str(disk / 'ev'))} "
                            r"\(writing [\w.]+\): free some space there, or give another --output; what was finished "
                            r"is kept, and a rerun goes on from it", line), line
        assert os.listdir(disk / "ev") == []
