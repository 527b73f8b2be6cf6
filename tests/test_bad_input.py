"""Bad input: a one-line error naming the problem, exit 2, and nothing written.

Most cases fail before Ray starts, so they run in-process through the real CLI entry point; the
undecodable image is found by Ray Data, so that one runs as a subprocess.
"""
import json
import shutil

import pytest

from cffa_ray.cli import main
from tests.conftest import fails_in_driver as _fails
from tests.conftest import gen_argv, run_cli, train_argv


@pytest.mark.parametrize("extra, pattern", [
    (("--unet_lora_rank", 0), r"--unet_lora_rank 0 must be > 0"),
    (("--unet_lora_alpha", -1), r"--unet_lora_alpha -1.0 must be > 0"),
    (("--hf_lambda", -0.5), r"--hf_lambda -0.5 must be >= 0"),
    (("--struct_lambda", -1), r"--struct_lambda -1.0 must be >= 0"),
    (("--zero_stage", 4), r"--zero_stage 4 is unknown"),
    (("--name", "../escape"), r"--name '../escape' must be a plain folder name"),
    (("--name", "a/b"), r"--name 'a/b' must be a plain folder name"),
    (("--resolution", 30), r"--resolution 30 must be a positive multiple of 8"),
    (("--preset", "tiny-sdxl"), r"--preset 'tiny-sdxl' does not fit --model dual_unet"),
    (("--batch_size", 4), r"5 training pair\(s\); --num_workers 2 x --batch_size 4 needs at least 8"),
    (("--sample_steps", 1001), r"--sample_steps 1001 must be in 1..1000"),
    (("--use_gpu", "--mixed_precision", "fp16", "--zero_stage", 0), r"fp16 with --zero_stage 0: .* use --zero_stage 1"),
])
def test_train_flag_errors(capsys, tmp_path, data, extra, pattern):
    _fails(capsys, train_argv(data, tmp_path / "out", *extra), pattern, tmp_path / "out")


def test_train_missing_data(capsys, tmp_path):
    _fails(capsys, ["train", "--output_dir", str(tmp_path / "out"), "--preset", "tiny"],
           r"--data is missing", tmp_path / "out")


def test_train_unpaired_images(capsys, tmp_path, data):
    (data / "fa/synth_00003.png").unlink()
    _fails(capsys, train_argv(data, tmp_path / "out"), r"have no FA partner.*synth_00003\.png", tmp_path / "out")
    (data / "cf/synth_00003.png").unlink()
    (data / "cf/synth_00001.png").unlink()
    _fails(capsys, train_argv(data, tmp_path / "out"), r"have no CF partner.*fa/synth_00001\.png", tmp_path / "out")


def test_train_empty_dataset(capsys, tmp_path):
    (tmp_path / "empty/cf").mkdir(parents=True)
    (tmp_path / "empty/fa").mkdir()
    _fails(capsys, train_argv(tmp_path / "empty", tmp_path / "out"), r"no images in cf/ and fa/", tmp_path / "out")


def test_train_base_model_not_a_diffusers_folder(capsys, tmp_path, data):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model/weights.bin").write_bytes(b"0")
    argv = ["train", "--data", str(data), "--output_dir", str(tmp_path / "out"), "--base_model",
            str(tmp_path / "not_a_model")]
    _fails(capsys, argv, r"is not a diffusers SD15 folder \(missing unet/config.json", tmp_path / "out")


def test_train_v_prediction_base_model_is_refused(capsys, tmp_path, data):
    base = tmp_path / "vpred"
    for part in ("unet", "vae", "text_encoder"):
        (base / part).mkdir(parents=True)
        (base / part / "config.json").write_text("{}")
    for part in ("tokenizer", "scheduler"):
        (base / part).mkdir()
    (base / "scheduler/scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    argv = ["train", "--data", str(data), "--output_dir", str(tmp_path / "out"), "--base_model", str(base)]
    _fails(capsys, argv, r"prediction_type 'v_prediction' is not supported; use an epsilon model", tmp_path / "out")


def test_train_refuses_to_resume_with_other_model_settings(capsys, tmp_path, data):
    run = tmp_path / "out/r"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"model": "dual_unet", "base_model": None, "preset": "tiny",
                                              "resolution": 32, "unet_lora_rank": 16, "unet_lora_alpha": 16.0,
                                              "num_workers": 2, "zero_stage": 2, "mixed_precision": "no"}))
    code = main(train_argv(data, tmp_path / "out", "--unet_lora_rank", 8))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unet_lora_rank 16 -> 8" in err and "pick a new --name" in err
    code = main(train_argv(data, tmp_path / "out", "--unet_lora_rank", 16, "--zero_stage", 3))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "zero_stage 2 -> 3" in err


def test_train_fp16_joint_sdxl_is_refused(capsys, tmp_path, data):
    argv = ["train", "--data", str(data), "--output_dir", str(tmp_path / "out"), "--model", "joint_sdxl",
            "--preset", "tiny-sdxl", "--use_gpu", "--mixed_precision", "fp16"]
    _fails(capsys, argv, r"SDXL VAE overflows in fp16; use bf16", tmp_path / "out")


def test_train_more_gpus_than_the_machine_has(tmp_path, data):
    proc = run_cli(*train_argv(data, tmp_path / "out", "--use_gpu"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--num_workers 2 with --use_gpu needs 2 GPU(s); this machine's Ray has 0" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_undecodable_image_is_named(tmp_path, data):
    """A corrupt, a zero-byte and a truncated PNG: all three named (validation pairs too), in one line."""
    import os

    (data / "fa/synth_00002.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (data / "cf/synth_00003.png").write_bytes(b"")
    (data / "fa/synth_00005.png").write_bytes(os.urandom(300))
    proc = run_cli(*train_argv(data, tmp_path / "out"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in proc.stdout + err, err
    assert err.startswith("cffa train: error: cannot decode image") and "fa/synth_00002.png" in err
    assert "cf/synth_00003.png: the file is empty (0 bytes)" in err
    assert "fa/synth_00005.png: not a PNG, JPEG or TIFF image that PIL can read" in err
    assert "BytesIO" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ generate


@pytest.mark.parametrize("extra, pattern", [
    (("--num_samples", 0), r"--num_samples 0 must be > 0"),
    (("--steps", 0), r"--steps 0 must be > 0"),
    (("--strength", 0), r"--strength 0.0 must be in \(0, 1\]"),
    (("--strength", 1.5), r"--strength 1.5 must be in \(0, 1\]"),
    (("--mode", "from_data"), r"--mode from_data needs --data"),
    (("--steps", 1001), r"--steps 1001 must be in 1..1000"),
])
def test_generate_flag_errors(capsys, tmp_path, fake_checkpoint, extra, pattern):
    _fails(capsys, gen_argv(fake_checkpoint, tmp_path / "g", *extra), pattern, tmp_path / "g")


def test_generate_missing_or_foreign_checkpoint(capsys, tmp_path, fake_checkpoint):
    _fails(capsys, gen_argv(tmp_path / "nope", tmp_path / "g"), r"does not exist", tmp_path / "g")
    (tmp_path / "run").mkdir()
    _fails(capsys, gen_argv(tmp_path / "run", tmp_path / "g"), r"is not a cffa checkpoint \(no model.json\)",
           tmp_path / "g")
    (fake_checkpoint / "unet_cf_lora/adapter_model.safetensors").unlink()  # e.g. a half-uploaded folder
    _fails(capsys, gen_argv(fake_checkpoint, tmp_path / "g"), r"lacks unet_cf_lora", tmp_path / "g")
    shutil.rmtree(fake_checkpoint / "unet_fa_lora")
    _fails(capsys, gen_argv(fake_checkpoint, tmp_path / "g"), r"lacks unet_cf_lora, unet_fa_lora", tmp_path / "g")
    (fake_checkpoint / "model.json").write_text(json.dumps({"model": "gan"}))
    _fails(capsys, gen_argv(fake_checkpoint, tmp_path / "g"), r"model 'gan' .* not a design", tmp_path / "g")


def test_generate_refuses_to_mix_arguments(capsys, tmp_path, fake_checkpoint):
    out = tmp_path / "g"
    out.mkdir()
    from cffa_ray.config import GenerateConfig
    from cffa_ray.generate.settings import identity, resolve

    cfg = resolve(GenerateConfig(checkpoint_dir=str(fake_checkpoint), steps=50), None)
    ident = identity(cfg, {"model": "dual_unet", "resolution": 32})
    (out / "generation.json").write_text(json.dumps(ident))
    (out / "parquet").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pair_id": [0]}), out / "parquet/part-000000-000000-n1.parquet")  # one finished pair
    before = sorted(p.name for p in out.iterdir())
    code = main(gen_argv(fake_checkpoint, out, "--steps", 20))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds pairs made with different arguments (steps 50 -> 20)" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_generate_from_data_undecodable_source_is_named(tmp_path, data, fake_checkpoint):
    (data / "cf/synth_00004.png").write_bytes(b"not an image")
    out = tmp_path / "g"
    proc = run_cli(*gen_argv(fake_checkpoint, out, "--mode", "from_data", "--data", data, "--num_samples", 6),
                   timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cffa generate: error: cannot decode image") and "cf/synth_00004.png" in last
    assert not out.exists()
