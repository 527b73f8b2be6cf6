"""Images are read faithfully or refused: bit depths scaled, modes converted on purpose per modality,
odd geometry reported as warnings (errors with --strict). No Ray: the functions the decode tasks run."""
import io

import numpy as np
import pytest
from PIL import Image

from cffa_ray.decoding import decode_batch, load_image, load_pair, report_warnings
from cffa_ray.errors import DataError
from cffa_ray.pixels import open_image, to_modality


def fundus_like(size=32, seed=0):
    """An FA-like grey ramp with a dark background: mean far from both ends of the range."""
    rng = np.random.default_rng(seed)
    return (np.clip(rng.normal(40, 30, (size, size)), 0, 255)).astype(np.uint8)


def save(path, image, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return str(path)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, fmt):
    grey8 = fundus_like()
    path = save(tmp_path / f"fa16.{fmt}", Image.fromarray(grey8.astype(np.uint16) * 257))
    assert Image.open(path).mode.startswith("I;16")
    fa = load_image(path, 32, "L")[..., 0]
    np.testing.assert_array_equal(fa, grey8)  # x * 257 / 65535 * 255 == x exactly
    assert (fa == 255).mean() < 0.01  # PIL's convert("L") made ~all of it 255
    cf = load_image(path, 32, "RGB")
    np.testing.assert_array_equal(cf[..., 1], grey8)


def test_float_and_32_bit_images_are_scaled(tmp_path):
    grey8 = fundus_like()
    f = save(tmp_path / "f.tiff", Image.fromarray(grey8.astype(np.float32) / 255.0))
    np.testing.assert_array_equal(load_image(f, 32, "L")[..., 0], grey8)
    buf = io.BytesIO()
    Image.fromarray(grey8.astype(np.int32) * 257).save(buf, format="TIFF")
    i32 = open_image(buf.getvalue())
    assert i32.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_modality(i32, "L")[0]), grey8)


def test_rgba_is_composited_over_black_and_reported(tmp_path):
    rgb = np.full((32, 32, 3), (200, 90, 30), np.uint8)
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:, :16] = 0  # left half transparent
    path = save(tmp_path / "cf.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    image, kinds = to_modality(open_image(open(path, "rb").read()), "RGB")
    out = np.asarray(image)
    assert (out[:, :16] == 0).all() and (out[:, 16:] == (200, 90, 30)).all()
    assert kinds == ["transparent"]
    opaque = save(tmp_path / "opaque.png", Image.fromarray(np.dstack([rgb, alpha * 0 + 255]), "RGBA"))
    assert to_modality(open_image(open(opaque, "rb").read()), "RGB")[1] == []


def test_palette_and_grey_inputs_per_modality(tmp_path):
    rgb = Image.fromarray(np.full((32, 32, 3), (200, 90, 30), np.uint8))
    palette = save(tmp_path / "p.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE))
    assert Image.open(palette).mode == "P"
    assert tuple(load_image(palette, 32, "RGB")[0, 0]) == (200, 90, 30)
    grey = save(tmp_path / "g.png", Image.fromarray(fundus_like()))
    _, kinds = to_modality(open_image(open(grey, "rb").read()), "RGB")
    assert kinds == ["grey_cf"]  # a grey CF is used, and reported
    _, kinds = to_modality(open_image(open(palette, "rb").read()), "L")
    assert kinds == ["colour_fa"]  # a colour FA is reduced to grey, and reported
    grey_rgb = save(tmp_path / "grey_rgb.png", Image.fromarray(fundus_like()).convert("RGB"))
    assert to_modality(open_image(open(grey_rgb, "rb").read()), "L")[1] == []  # grey saved as RGB is fine


def test_pair_geometry_warnings(tmp_path):
    cf = save(tmp_path / "cf/a.png", Image.new("RGB", (64, 48), (200, 90, 30)))
    fa = save(tmp_path / "fa/a.png", Image.fromarray(fundus_like(8)))
    cf_arr, fa_arr, warnings = load_pair(cf, fa, 64)
    assert cf_arr.shape == fa_arr.shape == (64, 64, 3)
    kinds = sorted(w.split("\t")[0] for w in warnings)
    assert kinds == ["not_square", "pair_size", "small"]
    assert "fa/a.png 8x8 vs its partner's 64x48" in "\n".join(warnings)


def test_warnings_are_counted_and_strict_makes_them_one_error(capsys):
    entries = [f"small\tcf/p{i}.png 8x8" for i in range(5)] + ["pair_size\tfa/p9.png 96x96 vs its partner's 64x64"]
    report_warnings(entries, 10, 64, strict=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith("[cffa] warning: 1 of 10 pairs whose CF and FA differ")
    assert "5 of 20 images much smaller than --resolution 64" in err[1]
    assert "cf/p0.png 8x8, cf/p1.png 8x8, cf/p2.png 8x8 (and 2 more)" in err[1]
    assert "--strict makes this an error" in err[1]
    with pytest.raises(DataError, match=r"^1 of 10 pairs .*; 5 of 20 images .* \(--strict\)$"):
        report_warnings(entries, 10, 64, strict=True)


@pytest.mark.parametrize("content, reason", [
    (b"", "the file is empty (0 bytes)"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a PNG, JPEG or TIFF image that PIL can read"),
    (None, "image file is truncated"),
])
def test_bad_files_are_named_in_one_clean_line(tmp_path, content, reason):
    good = save(tmp_path / "cf/a.png", Image.fromarray(fundus_like(64)))
    bad = tmp_path / "fa/a.png"
    bad.parent.mkdir()
    bad.write_bytes(content if content is not None else open(good, "rb").read()[:300])
    out = decode_batch({"pair_id": np.array(["a"]), "cf_path": np.array([good]), "fa_path": np.array([str(bad)])}, 32)
    error = out["error"][0]
    assert error.startswith(f"cannot decode image {bad}: ") and reason in error, error
    assert "BytesIO" not in error and "\n" not in error
