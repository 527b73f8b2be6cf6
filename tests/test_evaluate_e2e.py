"""`cffa evaluate` through the real CLI: a generation output (parquet, from_data) and a pairs folder as
--generated, FID/KID with a randomly initialised InceptionV3 file, and bad input (one line, exit 2)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.helpers import REPO, assert_ok, fails_in_driver, run_cli

N_GENERATED, SHIFT = 8, 3


def write_generation_output(out: Path, pairs_dir: Path) -> Path:
    """A `cffa generate --mode from_data` output folder made without a model: pair k is real pair k with
    its FA moved by SHIFT px (pair 7 names a source that is not among the real pairs)."""
    from cffa_ray.generate.outputs import PARQUET_SCHEMA, write_identity
    from cffa_ray.images import pair_pngs

    rows = {name: [] for name in PARQUET_SCHEMA.names}
    for k in range(N_GENERATED):
        cf = np.asarray(Image.open(pairs_dir / "cf" / f"synth_{k:05d}.png").convert("RGB"))
        fa = np.roll(np.asarray(Image.open(pairs_dir / "fa" / f"synth_{k:05d}.png").convert("L")), SHIFT, axis=1)
        pngs = pair_pngs(cf, np.repeat(fa[..., None], 3, axis=-1))
        source = f"synth_{k:05d}" if k < N_GENERATED - 1 else "not_in_real"
        for name, value in dict(pair_id=k, seed=100 + k, cf_png=pngs["cf.png"], fa_png=pngs["fa.png"],
                                mode="from_data", steps=20, scheduler="ddim", strength=0.5, source_pair_id=source,
                                checkpoint="/ckpt/best_checkpoint", model="dual_unet", resolution=64).items():
            rows[name].append(value)
    (out / "parquet").mkdir(parents=True)
    pq.write_table(pa.Table.from_pydict(rows, schema=PARQUET_SCHEMA), out / "parquet" / "part-000000-000007-n8.parquet")
    write_identity(str(out), {"checkpoint": "/ckpt/best_checkpoint", "trained_steps": 1200, "model": "dual_unet",
                              "resolution": 64, "mode": "from_data", "steps": 20, "scheduler": "ddim", "seed": 42,
                              "strength": 0.5, "data": str(pairs_dir), "model_batch": 8})
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("ray_head")
def test_evaluate_a_from_data_generation_output(pairs_dir, tmp_path):
    gen = write_generation_output(tmp_path / "G", pairs_dir)
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--generated", gen, "--real", pairs_dir, "--output", out, "--batch_size", 8)
    assert_ok(proc)
    assert "[cffa evaluate] 24/24 pairs" in proc.stderr
    assert "Progress bars disabled" not in proc.stdout + proc.stderr
    printed = [ln for ln in proc.stdout.splitlines() if ln.startswith("[cffa] alignment")]
    assert len(printed) == 1 and "mismatched real" in printed[0]
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["generated"]["pairs"] == N_GENERATED and ev["real"]["pairs"] == 16 and ev["resolution"] == 64
    assert ev["generated"]["kind"] == "cffa generate parquet"
    ident = ev["generated"]["identity"]
    assert (ident["checkpoint"], ident["steps"], ident["scheduler"], ident["trained_steps"]) == \
        ("/ckpt/best_checkpoint", 20, "ddim", 1200)
    a = ev["alignment"]
    assert a["real"]["n"] == 16 and a["mismatched"]["n"] == 16 and a["generated"]["n"] == N_GENERATED
    assert a["real"]["mean"] > a["mismatched"]["mean"] + 0.25          # real pairs separate from mismatched
    assert a["generated"]["mean"] < a["real"]["mean"] - 0.2            # the 3-px shift shows
    assert a["normalised"] < 0.5
    # the generated images are the real ones (FA shifted): their own floor is the real floor
    assert a["generated_mismatched"]["n"] == N_GENERATED
    assert abs(a["generated_mismatched"]["mean"] - a["mismatched"]["mean"]) < 0.1, a
    for m in ("cf", "fa"):
        assert list(ev["realism"][m]["levels"]) == ["64", "32", "16"] and ev["realism"][m]["mean"] > 0
    d = ev["from_data"]
    assert d["pairs"] == N_GENERATED and d["pairs_without_source_in_real"] == 1 and d["ssim_cf"]["n"] == 7
    assert d["ssim_cf"]["mean"] == pytest.approx(1.0) and d["psnr_cf"]["mean"] == 100.0  # CF is its source
    assert d["ssim_fa"]["mean"] < 0.95 and d["psnr_fa"]["mean"] < 40                       # FA moved by 3 px
    assert ev["fid"] is None
    md = (out / "evaluation.md").read_text()
    assert "## Paired alignment" in md and "## Fidelity to the source pair" in md
    rows = list(csv.DictReader((out / "pairs.csv").open()))
    assert len(rows) == N_GENERATED + 16 and [r["pair_id"] for r in rows[:3]] == ["0", "1", "2"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def random_inception_weights(path: Path) -> Path:
    """A state dict of torch-fidelity's InceptionV3 with PyTorch's random initialisation (the real
    pt_inception-2015-12-05 weights cannot be downloaded here)."""
    from unittest import mock

    import torch

    from cffa_ray.evaluate.inception import inception_class

    cls = inception_class()
    torch.manual_seed(0)
    with mock.patch("torch.load", return_value={}), mock.patch.object(torch.nn.Module, "load_state_dict"):
        model = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    torch.save(model.state_dict(), path)
    return path


def _fidelity_available() -> bool:
    from cffa_ray.errors import ConfigError
    from cffa_ray.evaluate.inception import inception_class

    try:
        inception_class()
        return True
    except ConfigError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _fidelity_available(), reason='torch-fidelity not installed: pip install --no-deps '
                                                      '"torch-fidelity>=0.3,<0.5" runs this test')
@pytest.mark.usefixtures("ray_head")
def test_evaluate_a_pairs_folder_with_fid(tmp_path):
    from cffa_ray.synth import write_synthetic_pairs

    write_synthetic_pairs(tmp_path / "pairs", 3, 32)  # Inception sees 299 px whatever the size: keep N small
    weights = random_inception_weights(tmp_path / "inception_random.pth")
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--generated", tmp_path / "pairs", "--real", tmp_path / "pairs", "--output", out,
                   "--inception_weights", weights)
    assert_ok(proc)
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["generated"]["kind"] == "pairs folder" and ev["generated"]["identity"] is None
    assert ev["alignment"]["normalised"] == pytest.approx(1.0)  # the generated pairs are the real ones
    assert ev["from_data"] is None
    for m in ("cf", "fa"):
        f = ev["fid"][m]
        assert abs(f["fid"]) < 1e-3 and np.isfinite(f["kid_mean"]) and f["kid_std"] >= 0
    assert "[cffa] FID CF" in proc.stdout and "## FID and KID" in (out / "evaluation.md").read_text()


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written

def _argv(gen, real, out, *extra):
    return ["evaluate", "--generated", str(gen), "--real", str(real), "--output", str(out), *map(str, extra)]


def test_evaluate_bad_input(capsys, tmp_path, pairs_dir):
    out = tmp_path / "eval"
    real, generated = ["--real", str(pairs_dir)], ["--generated", str(pairs_dir)]
    fails_in_driver(capsys, ["evaluate", *real, "--output", str(out)], r"--generated is missing", out)
    fails_in_driver(capsys, ["evaluate", *generated, "--output", str(out)], r"--real is missing", out)
    fails_in_driver(capsys, ["evaluate", *generated, *real], r"--output is missing", out)
    fails_in_driver(capsys, _argv(tmp_path / "nope", pairs_dir, out), r"--generated .*nope does not exist", out)
    (tmp_path / "empty").mkdir()
    fails_in_driver(capsys, _argv(tmp_path / "empty", pairs_dir, out), r"--generated .*empty holds no generated pairs",
                    out)
    fails_in_driver(capsys, _argv(pairs_dir, tmp_path / "nope", out), r"--real .*nope does not exist", out)
    fails_in_driver(capsys, _argv(pairs_dir, pairs_dir, out, "--batch_size", 0), r"--batch_size 0 must be > 0", out)


def test_evaluate_needs_two_real_pairs_and_a_folder_output(capsys, tmp_path, pairs_dir):
    from cffa_ray.synth import write_synthetic_pairs

    write_synthetic_pairs(tmp_path / "one", 1, 32)
    out = tmp_path / "eval"
    fails_in_driver(capsys, _argv(pairs_dir, tmp_path / "one", out), r"--real .*one has 1 pair; .* at least 2", out)
    (tmp_path / "file").write_text("x")
    err = fails_in_driver(capsys, _argv(pairs_dir, pairs_dir, tmp_path / "file"), r"--output .*file is a file", out)
    assert "Traceback" not in err


def test_evaluate_bad_inception_weights(capsys, tmp_path, pairs_dir):
    out = tmp_path / "eval"
    fails_in_driver(capsys, _argv(pairs_dir, pairs_dir, out, "--inception_weights", tmp_path / "none.pth"),
           r"--inception_weights .*none.pth is not a file", out)
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    expected = r"is not an InceptionV3 FID state dict" if _fidelity_available() else r"needs torch-fidelity"
    junk = tmp_path / "junk.pth"
    fails_in_driver(capsys, _argv(pairs_dir, pairs_dir, out, "--inception_weights", junk), expected, out)


def test_evaluate_job_wrapper_is_the_cli():
    """`python jobs/evaluate.py` (what `ray job submit` runs) is `cffa evaluate`: the same help, the same flags."""
    job = subprocess.run([sys.executable, "jobs/evaluate.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    cli = subprocess.run([sys.executable, "-m", "cffa_ray.cli", "evaluate", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert job.returncode == cli.returncode == 0, job.stderr + cli.stderr
    assert job.stdout == cli.stdout and "--inception_weights" in job.stdout


def test_undecodable_images_are_named_not_thrown(tmp_path, pairs_dir):
    """A bad file does not fail a Ray task: its row carries the error and the driver names them all at once."""
    from cffa_ray.decoding import raise_decode_errors
    from cffa_ray.errors import DataError
    from cffa_ray.evaluate.scoring import score_batch

    bad = tmp_path / "bad_cf.png"
    bad.write_bytes(b"not a png")
    ids = ["synth_00000", "synth_00001", "synth_00002"]
    batch = {"pair_id": np.array(ids, dtype=object),
             "cf_path": np.array([str(pairs_dir / "cf" / f"{ids[0]}.png"), str(bad),
                                  str(pairs_dir / "cf" / f"{ids[2]}.png")], dtype=object),
             "fa_path": np.array([str(pairs_dir / "fa" / f"{i}.png") for i in ids], dtype=object)}
    out = score_batch(batch, "real", 64, 8, 0, {}, False)
    assert [bool(e) for e in out["error"]] == [False, True, False] and "bad_cf.png" in out["error"][1]
    assert np.isnan(out["dice"][1]) and np.isfinite(out["dice"][[0, 2]]).all()
    with pytest.raises(DataError, match=r"cannot decode image .*bad_cf.png"):
        raise_decode_errors(out["error"])
    parquet_batch = {"pair_id": np.array([0], dtype=object), "cf_png": np.array([b"junk"], dtype=object),
                     "fa_png": np.array([b"junk"], dtype=object), "source_pair_id": np.array([None], dtype=object)}
    out = score_batch(parquet_batch, "generated", 64, 8, 0, {}, False)
    assert out["error"][0].startswith("cannot decode generated pair 0")
