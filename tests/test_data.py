"""Pairs in: discovery, manifests, the split, decoding, and every bad-input message."""
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from cffa_ray.data import CF_PATH, FA_PATH, PAIR_ID, SPLIT, TRAIN, VAL, assign_split, discover_pairs
from cffa_ray.decoding import decode_batch, load_image
from cffa_ray.errors import DataError
from cffa_ray.synth import make_pair, write_synthetic_pairs


@pytest.fixture
def pairs(tmp_path):
    write_synthetic_pairs(tmp_path / "d", 5, 32, seed=3)
    return tmp_path / "d"


def _detail(image):
    """Vessel-scale detail: the image minus its blur (greyscale)."""
    grey = image.convert("L")
    return np.asarray(grey, np.float32) - np.asarray(grey.filter(ImageFilter.GaussianBlur(4)), np.float32)


def test_synth_pairs_share_one_vessel_tree(tmp_path):
    cf, fa = make_pair(np.random.default_rng(0), 128)
    assert cf.mode == "RGB" and fa.mode == "L" and cf.size == fa.size == (128, 128)
    r, g, b = np.asarray(cf, np.float32)[64, 64]
    assert r > g > b  # orange-red fundus
    # the same vessels, dark in CF and bright in FA: their fine detail is strongly anti-correlated,
    # and unrelated to the vessels of another pair
    inside = np.hypot(*np.mgrid[-64:64, -64:64]) < 50
    same = np.corrcoef(_detail(cf)[inside], _detail(fa)[inside])[0, 1]
    other = np.corrcoef(_detail(cf)[inside], _detail(make_pair(np.random.default_rng(1), 128)[1])[inside])[0, 1]
    assert same < -0.6 and abs(other) < 0.2
    # determinism per (seed, k)
    write_synthetic_pairs(tmp_path / "a", 2, 32, seed=9)
    write_synthetic_pairs(tmp_path / "b", 3, 32, seed=9)
    assert (tmp_path / "a/cf/synth_00001.png").read_bytes() == (tmp_path / "b/cf/synth_00001.png").read_bytes()


def test_folder_discovery_pairs_by_stem(pairs):
    records = discover_pairs(str(pairs))
    assert [r[PAIR_ID] for r in records] == [f"synth_{k:05d}" for k in range(5)]
    assert all(r[CF_PATH].endswith(f"cf/{r[PAIR_ID]}.png") and r[FA_PATH].endswith(f"fa/{r[PAIR_ID]}.png")
               for r in records)


def test_jpg_and_tif_are_accepted(pairs):
    Image.open(pairs / "cf/synth_00000.png").convert("RGB").save(pairs / "cf/extra.jpg")
    Image.open(pairs / "fa/synth_00000.png").save(pairs / "fa/extra.tif")
    ids = [r[PAIR_ID] for r in discover_pairs(str(pairs))]
    assert "extra" in ids and len(ids) == 6


def test_cf_without_fa_names_the_file(pairs):
    (pairs / "fa/synth_00002.png").unlink()
    with pytest.raises(DataError, match=r"CF image\(s\) have no FA partner.*synth_00002\.png"):
        discover_pairs(str(pairs))


def test_fa_without_cf_names_the_file(pairs):
    (pairs / "cf/synth_00004.png").unlink()
    with pytest.raises(DataError, match=r"FA image\(s\) have no CF partner.*fa/synth_00004\.png"):
        discover_pairs(str(pairs))


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "e/cf").mkdir(parents=True)
    (tmp_path / "e/fa").mkdir()
    with pytest.raises(DataError, match="no images"):
        discover_pairs(str(tmp_path / "e"))
    with pytest.raises(DataError, match="does not exist"):
        discover_pairs(str(tmp_path / "nowhere"))


def test_manifest_csv_relative_paths_and_splits(pairs):
    rows = [{"cf_path": f"cf/synth_{k:05d}.png", "fa_path": f"fa/synth_{k:05d}.png", "pair_id": f"p{k}",
             "split": "val" if k == 1 else "train"} for k in range(5)]
    pd.DataFrame(rows).to_csv(pairs / "m.csv", index=False)
    records = discover_pairs(str(pairs / "m.csv"))
    assert [r[PAIR_ID] for r in records] == [f"p{k}" for k in range(5)]
    assert (pairs / "cf/synth_00003.png").samefile(records[3][CF_PATH])
    split = assign_split(records, 0.5, seed=0)
    assert [r[SPLIT] for r in split] == [TRAIN, VAL, TRAIN, TRAIN, TRAIN]  # the manifest's split is kept


def test_manifest_parquet_without_optional_columns(pairs):
    rows = [{"cf_path": str(pairs / f"cf/synth_{k:05d}.png"), "fa_path": str(pairs / f"fa/synth_{k:05d}.png")}
            for k in range(3)]
    pd.DataFrame(rows).to_parquet(pairs / "m.parquet")
    records = discover_pairs(str(pairs / "m.parquet"))
    assert [r[PAIR_ID] for r in records] == ["synth_00000", "synth_00001", "synth_00002"]


def test_manifest_errors(pairs):
    pd.DataFrame([{"cf": "a.png", "fa": "b.png"}]).to_csv(pairs / "bad.csv", index=False)
    with pytest.raises(DataError, match="needs columns cf_path and fa_path"):
        discover_pairs(str(pairs / "bad.csv"))
    pd.DataFrame([{"cf_path": "cf/synth_00000.png", "fa_path": "fa/gone.png"}]).to_csv(pairs / "gone.csv", index=False)
    with pytest.raises(DataError, match=r"missing file.*fa/gone\.png"):
        discover_pairs(str(pairs / "gone.csv"))
    pd.DataFrame([{"cf_path": "cf/synth_00000.png", "fa_path": "fa/synth_00000.png", "split": "test"}]).to_csv(
        pairs / "split.csv", index=False)
    with pytest.raises(DataError, match="split 'test'"):
        discover_pairs(str(pairs / "split.csv"))


def test_split_is_deterministic_and_never_empty():
    records = [{PAIR_ID: f"p{k}", CF_PATH: "", FA_PATH: "", SPLIT: None} for k in range(20)]
    a, b = assign_split(records, 0.1, seed=1), assign_split(records, 0.1, seed=1)
    assert a == b
    assert sum(r[SPLIT] == VAL for r in a) == 2
    other_seed = assign_split(records, 0.1, seed=2)
    assert {r[PAIR_ID] for r in a if r[SPLIT] == VAL} != {r[PAIR_ID] for r in other_seed if r[SPLIT] == VAL}
    few = assign_split(records[:3], 0.1, seed=1)
    assert sum(r[SPLIT] == VAL for r in few) == 1 and sum(r[SPLIT] == TRAIN for r in few) == 2


def test_decode_batch_shapes_ranges_and_grey_fa(pairs):
    records = discover_pairs(str(pairs))[:2]
    batch = {k: np.array([r[k] for r in records], dtype=object) for k in (PAIR_ID, CF_PATH, FA_PATH)}
    out = decode_batch(batch, resolution=16)
    assert out["cf"].shape == out["fa"].shape == (2, 3, 16, 16)
    assert out["cf"].dtype == out["fa"].dtype == np.uint8  # compact on the wire; the model rescales
    assert out["cf"].max() > 0
    np.testing.assert_array_equal(out["fa"][:, 0], out["fa"][:, 2])  # grey FA replicated
    assert not np.array_equal(out["cf"][:, 0], out["cf"][:, 2])      # CF keeps its colour


def test_corrupt_image_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.png"):
        load_image(str(bad), 16, "RGB")


def test_duplicate_stems_are_refused(pairs):
    shutil.copy(pairs / "cf/synth_00000.png", pairs / "cf/synth_00000.tif")
    with pytest.raises(DataError, match="share the stem"):
        discover_pairs(str(pairs))
