"""Issue 20, reliability round 3: EXIF orientation, huge images, malformed logs, Unicode run names,
file permissions under the umask, a full disk, a second job into one folder, and SIGTERM/SIGHUP.
The rows that fail before Ray starts run through cli.main (fast); the others through the real CLI (slow)."""
from __future__ import annotations

import os
import re
import subprocess
import unicodedata

import numpy as np
import pytest
from PIL import Image

from cffa_ray.cli import main
from cffa_ray.decoding import load_pair, read_image
from cffa_ray.pixels import geometry_warnings, open_image
from tests.helpers import fails_in_driver, run_cli

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
