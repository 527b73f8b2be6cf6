"""Bad input: a one-line error naming the problem and the fix, the right exit code, and nothing written.

Most cases fail before Ray starts, so they run in-process through the real CLI entry point
(helpers.fails_in_driver); the few that Ray Data finds (undecodable images, odd images with
--strict) run the CLI as a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import pytest

from cffa_ray.cli import build_parser, last_line, main
from tests.helpers import MODEL_RECORD, fails_in_driver, gen_argv, odd_pairs, run_cli, train_argv


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
    fails_in_driver(capsys, train_argv(data, tmp_path / "out", *extra), pattern, tmp_path / "out")


def test_train_missing_data(capsys, tmp_path):
    fails_in_driver(capsys, ["train", "--output_dir", str(tmp_path / "out"), "--preset", "tiny"],
           r"--data is missing", tmp_path / "out")


def test_train_unpaired_images(capsys, tmp_path, data):
    (data / "fa/synth_00003.png").unlink()
    fails_in_driver(capsys, train_argv(data, tmp_path / "out"), r"have no FA partner.*synth_00003\.png",
                    tmp_path / "out")
    (data / "cf/synth_00003.png").unlink()
    (data / "cf/synth_00001.png").unlink()
    fails_in_driver(capsys, train_argv(data, tmp_path / "out"), r"have no CF partner.*fa/synth_00001\.png",
                    tmp_path / "out")


def test_train_empty_dataset(capsys, tmp_path):
    (tmp_path / "empty/cf").mkdir(parents=True)
    (tmp_path / "empty/fa").mkdir()
    fails_in_driver(capsys, train_argv(tmp_path / "empty", tmp_path / "out"), r"no images in cf/ and fa/",
                    tmp_path / "out")


def test_train_base_model_not_a_diffusers_folder(capsys, tmp_path, data):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model/weights.bin").write_bytes(b"0")
    argv = ["train", "--data", str(data), "--output_dir", str(tmp_path / "out"), "--base_model",
            str(tmp_path / "not_a_model")]
    fails_in_driver(capsys, argv, r"is not a diffusers SD15 folder \(missing unet/config.json", tmp_path / "out")


def test_train_v_prediction_base_model_is_refused(capsys, tmp_path, data):
    base = tmp_path / "vpred"
    for part in ("unet", "vae", "text_encoder"):
        (base / part).mkdir(parents=True)
        (base / part / "config.json").write_text("{}")
    for part in ("tokenizer", "scheduler"):
        (base / part).mkdir()
    (base / "scheduler/scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    argv = ["train", "--data", str(data), "--output_dir", str(tmp_path / "out"), "--base_model", str(base)]
    fails_in_driver(capsys, argv, r"prediction_type 'v_prediction' is not supported; use an epsilon model",
                    tmp_path / "out")


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
    fails_in_driver(capsys, argv, r"SDXL VAE overflows in fp16; use bf16", tmp_path / "out")


@pytest.mark.slow  # starts Ray
def test_train_more_gpus_than_the_machine_has(tmp_path, data):
    proc = run_cli(*train_argv(data, tmp_path / "out", "--use_gpu"), timeout=300, local=True)  # a local Ray's GPUs
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--num_workers 2 with --use_gpu needs 2 GPU(s); this machine's Ray has 0" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # starts Ray
@pytest.mark.usefixtures("ray_head")
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
    fails_in_driver(capsys, gen_argv(fake_checkpoint, tmp_path / "g", *extra), pattern, tmp_path / "g")


def test_generate_missing_or_foreign_checkpoint(capsys, tmp_path, fake_checkpoint):
    fails_in_driver(capsys, gen_argv(tmp_path / "nope", tmp_path / "g"), r"does not exist", tmp_path / "g")
    (tmp_path / "run").mkdir()
    fails_in_driver(capsys, gen_argv(tmp_path / "run", tmp_path / "g"), r"is not a cffa checkpoint \(no model.json\)",
           tmp_path / "g")
    (fake_checkpoint / "unet_cf_lora/adapter_model.safetensors").unlink()  # e.g. a half-uploaded folder
    fails_in_driver(capsys, gen_argv(fake_checkpoint, tmp_path / "g"), r"lacks unet_cf_lora", tmp_path / "g")
    shutil.rmtree(fake_checkpoint / "unet_fa_lora")
    fails_in_driver(capsys, gen_argv(fake_checkpoint, tmp_path / "g"), r"lacks unet_cf_lora, unet_fa_lora",
                    tmp_path / "g")
    (fake_checkpoint / "model.json").write_text(json.dumps({"model": "gan"}))
    fails_in_driver(capsys, gen_argv(fake_checkpoint, tmp_path / "g"), r"model 'gan' .* not a design", tmp_path / "g")


def test_generate_refuses_to_mix_arguments(capsys, tmp_path, fake_checkpoint):
    out = tmp_path / "g"
    out.mkdir()
    from cffa_ray.generate.config import GenerateConfig
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


@pytest.mark.slow  # starts Ray
@pytest.mark.usefixtures("ray_head")
def test_generate_from_data_undecodable_source_is_named(tmp_path, data, fake_checkpoint):
    (data / "cf/synth_00004.png").write_bytes(b"not an image")
    out = tmp_path / "g"
    proc = run_cli(*gen_argv(fake_checkpoint, out, "--mode", "from_data", "--data", data, "--num_samples", 6),
                   timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cffa generate: error: cannot decode image") and "cf/synth_00004.png" in last
    assert not out.exists()


# ------------------------------------------------------------------ (formerly test_errors.py)

# ------------------------------------------------------------------ hyperparameters

@pytest.mark.parametrize("argv, pattern", [
    (("--lr", "nan"), r"--lr nan must be a finite number"),
    (("--lr", "inf"), r"--lr inf must be a finite number"),
    (("--lr", "0"), r"--lr 0.0 must be > 0"),
    (("--hf_lambda", "nan"), r"--hf_lambda nan must be a finite number"),
    (("--unet_lora_alpha=-inf",), r"--unet_lora_alpha -inf must be a finite number"),
])
def test_train_non_finite_or_non_positive_flags(capsys, tmp_path, data, argv, pattern):
    fails_in_driver(capsys, train_argv(data, tmp_path / "out", *argv), pattern, tmp_path / "out")


def test_generate_non_finite_strength(capsys, tmp_path, fake_checkpoint):
    fails_in_driver(capsys, gen_argv(fake_checkpoint, tmp_path / "g", "--strength", "nan"),
                    r"--strength nan must be a finite number", tmp_path / "g")


def test_usage_mistakes_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--lr", "abc"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err == "cffa train: error: argument --lr: invalid float value: 'abc' (see cffa train --help)"


# ------------------------------------------------------------------ base models

@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and a hub endpoint nothing listens on (no network needed or used)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return constants


def test_unreachable_hub_model(capsys, tmp_path, data, offline_hub):
    argv = train_argv(data, tmp_path / "out", "--base_model", "cffa-test/no-such-model")
    argv.remove("--preset"), argv.remove("tiny")
    fails_in_driver(capsys, argv, r"--base_model cffa-test/no-such-model: the Hugging Face hub cannot be reached "
                                  r"\(.*\) and the model is not in the local cache .*--preset tiny", tmp_path / "out")


def test_default_base_model_offline(capsys, tmp_path, data, offline_hub, monkeypatch):
    monkeypatch.setattr(offline_hub, "HF_HUB_OFFLINE", True)
    argv = ["train", "--data", data, "--output_dir", tmp_path / "out"]  # no --base_model, no --preset
    fails_in_driver(capsys, argv, r"--base_model stable-diffusion-v1-5/stable-diffusion-v1-5 \(the default for "
                                  r"--model dual_unet\) is not in the local Hugging Face cache .* "
                                  r"HF_HUB_OFFLINE is set", tmp_path / "out")


@pytest.mark.slow  # starts Ray
@pytest.mark.usefixtures("ray_head")
def test_default_base_model_offline_real_cli(tmp_path, data):
    """The row as a user meets it: a fresh process, seconds, one line, no Ray started."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    t0 = time.time()
    proc = run_cli("train", "--data", data, "--output_dir", tmp_path / "out", env=env, timeout=120)
    assert time.time() - t0 < 30
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "is not in the local Hugging Face cache" in proc.stderr and not proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, pattern", [
    ("truncate", r"adapter_model.safetensors is not a readable safetensors file \(.*\); it is truncated or damaged"),
    ("model_json", r"model.json is not readable JSON"),
    ("adapter_config", r"unet_fa_lora/adapter_config.json is not readable JSON"),
    ("record_field", r"model.json lacks unet_lora_rank"),
])
def test_damaged_checkpoint_is_named(capsys, tmp_path, fake_checkpoint, damage, pattern):
    fa = fake_checkpoint / "unet_fa_lora"
    if damage == "truncate":
        weights = fa / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:40])
    elif damage == "model_json":
        (fake_checkpoint / "model.json").write_text('{"model": "dual_unet", ')
    elif damage == "adapter_config":
        (fa / "adapter_config.json").write_bytes(b"\x00\x01")
    else:
        record = json.loads((fake_checkpoint / "model.json").read_text())
        del record["unet_lora_rank"]
        (fake_checkpoint / "model.json").write_text(json.dumps(record))
    fails_in_driver(capsys, gen_argv(fake_checkpoint, tmp_path / "g"), pattern, tmp_path / "g")


def test_a_folder_with_no_finished_pair_blocks_nothing(tmp_path):
    """generation.json of a run that made 0 pairs does not refuse other arguments; one with pairs does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cffa_ray.errors import ConfigError
    from cffa_ray.generate.outputs import check_identity

    (tmp_path / "generation.json").write_text(json.dumps({"steps": 50, "checkpoint": "/elsewhere"}))
    check_identity(str(tmp_path), {"steps": 20, "checkpoint": "/good"})
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.table({"pair_id": [0]}), tmp_path / "parquet/part-000000-000000-n1.parquet")
    with pytest.raises(ConfigError, match="holds pairs made with different arguments"):
        check_identity(str(tmp_path), {"steps": 20, "checkpoint": "/good"})


# ------------------------------------------------------------------ output paths

@pytest.mark.parametrize("command", ["train", "generate", "synth", "demo"])
def test_output_dir_that_is_a_file(capsys, tmp_path, data, fake_checkpoint, command):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    argv = {"train": train_argv(data, target), "generate": gen_argv(fake_checkpoint, target),
            "synth": ["synth", "--out", target, "--pairs", 2], "demo": ["demo", "--out", target]}[command]
    flag = "--out" if command in ("synth", "demo") else "--output_dir"
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"cffa {command}: error: {flag} {target} is not a folder; give a folder " \
                                "(it is created if missing)", err
    assert target.read_text() == "keep me"


def test_output_dir_under_a_file_and_uri(capsys, tmp_path, data):
    (tmp_path / "a_file").write_text("keep me")
    fails_in_driver(capsys, train_argv(data, tmp_path / "a_file/runs"),
                    r"--output_dir .*a_file/runs is not a folder \(.*a_file is a file\)", tmp_path / "out")
    fails_in_driver(capsys, train_argv(data, f"file://{tmp_path}/a_file/runs"),
                    r"--output_dir file://.*a_file/runs: cannot write there \(.*\); check the URI", tmp_path / "out")
    assert (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.parametrize("command", ["train", "generate", "synth"])
def test_output_dir_not_writable(tmp_path, data, fake_checkpoint, command):
    """The real entry point in a forked process that may not write in the folder: as another user when
    we are root (root may write anywhere; Python itself lives under /root here, so the fork keeps it
    loaded), else in a read-only folder. The folder is checked before --data or the checkpoint is read."""
    locked = tempfile.mkdtemp(prefix="cffa-locked-")
    try:
        os.chmod(locked, 0o755 if os.getuid() == 0 else 0o555)
        out = f"{locked}/out"
        argv = {"train": train_argv(data, out), "generate": gen_argv(fake_checkpoint, out),
                "synth": ["synth", "--out", out, "--pairs", 2]}[command]
        t0 = time.time()
        code, err = _main_in_fork([str(a) for a in argv], uid=65534 if os.getuid() == 0 else None)
        assert time.time() - t0 < 30
        flag = "--out" if command == "synth" else "--output_dir"
        assert code == 2 and err.strip() == (f"cffa {command}: error: {flag} {out}: cannot write in {locked} "
                                             "(permission denied or read-only); give a folder you can write to"), err
        assert os.listdir(locked) == []
    finally:
        os.chmod(locked, 0o755)
        os.rmdir(locked)


def _main_in_fork(argv, uid):
    """(exit code, stderr) of cffa_ray.cli.main(argv) in a forked child, as user `uid` if given.

    What the commands import on their way to the check is imported here first: that user may not
    read the Python installation.
    """
    import importlib

    for module in ("ray.data", "ray.train", "ray.train.torch", "cffa_ray.train.launch", "cffa_ray.train.loop",
                   "cffa_ray.train.stop", "cffa_ray.quiet", "cffa_ray.checks", "cffa_ray.models.base",
                   "cffa_ray.generate.job", "cffa_ray.generate.generator", "cffa_ray.generate.outputs",
                   "cffa_ray.synth", "encodings.raw_unicode_escape"):
        importlib.import_module(module)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read_end)
            os.dup2(write_end, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            code = main(argv)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


# ------------------------------------------------------------------ manifests

@pytest.mark.parametrize("name, content, pattern", [
    ("random.csv", os.urandom(3000), r"manifest .*random.csv is not a CSV text file \(.*\); it needs a header row"),
    ("nul.csv", b"cf_path,fa_path\n\x00\x00\x00,\x00\n", r"nul.csv is not a CSV text file \(it holds NUL bytes\)"),
    ("not.parquet", b"PAR1 but not really\n" * 20, r"not.parquet is not a readable parquet file \(.*\); write it"),
])
def test_manifest_that_will_not_parse(capsys, tmp_path, name, content, pattern):
    (tmp_path / name).write_bytes(content)
    fails_in_driver(capsys, train_argv(tmp_path / name, tmp_path / "out"), pattern, tmp_path / "out")


# ------------------------------------------------------------------ odd images, too few pairs

def test_one_pair_strict_is_refused_before_ray(capsys, tmp_path):
    from cffa_ray.synth import write_synthetic_pairs

    write_synthetic_pairs(tmp_path / "one", 1, 32)
    argv = train_argv(tmp_path / "one", tmp_path / "out", "--num_workers", 1, "--strict")
    fails_in_driver(capsys, argv, r"no validation pairs \(1 pair\(s\), --val_fraction 0.1\): validation scores "
                                  r"training pairs.* \(--strict\)", tmp_path / "out")


@pytest.mark.slow  # starts Ray
@pytest.mark.usefixtures("ray_head")
def test_odd_images_with_strict_are_one_error(tmp_path):
    data = odd_pairs(tmp_path / "odd")
    t0 = time.time()
    proc = run_cli(*train_argv(data, tmp_path / "out", "--resolution", 64, "--strict"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err + proc.stdout, err
    for part in ("2 of 8 pairs whose CF and FA differ in size or shape (", "fa/synth_00003.png 96x96 vs its "
                 "partner's 64x64", "fa/synth_00007.png 9500x9500 vs its partner's 64x64",
                 "4 of 16 images that are not square (cf/synth_00004.png 64x48, fa/synth_00004.png 64x48, "
                 "cf/synth_00006.jpg 64x48 (and 1 more))",  # the EXIF-turned CF is read upright: 64x48, like its FA
                 "2 of 16 images much smaller than --resolution 64", "1 of 16 CF images that are greyscale",
                 "1 of 16 images with transparent pixels (fa/synth_00002.png",
                 "1 of 16 images over PIL's decompression-bomb limit (89 megapixels) (fa/synth_00007.png 9500x9500)",
                 "(--strict)"):
        assert part in err, part
    assert "synth_00006" not in err.split("differ in size or shape")[1].split(":")[0]  # a registered pair
    assert "DecompressionBombWarning" not in proc.stdout + proc.stderr
    assert "synth_00000" not in err  # 16-bit is read faithfully, nothing to warn about
    assert not (tmp_path / "out").exists()
    print(f"odd images --strict: {time.time() - t0:.1f}s")


# ------------------------------------------------------------------ --help

@pytest.mark.parametrize("command", ["train", "generate", "evaluate", "report", "synth", "demo"])
def test_help_says_each_default_once_in_plain_words(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        text = action.help or ""
        assert text.count("default:") <= 1, (action.dest, text)
        assert "(default: None)" not in text and "seed B" not in text and "the seed's" not in text, text
    required = {"train": ["--data"], "generate": ["--checkpoint_dir"], "synth": ["--out", "--pairs"],
                "evaluate": ["--generated", "--real", "--output"]}.get(command, [])
    for flag in required:
        action = next(a for a in sub._actions if flag in a.option_strings)
        assert action.help.endswith("(required)") and "default" not in action.help, action.help


def test_fa_noise_negated_and_struct_guidance_need_the_dual_unet(capsys, tmp_path, fake_checkpoint):
    """The joint model has one UNet and one latent: there is no FA start noise to negate."""
    import torch
    from safetensors.torch import save_file

    joint = tmp_path / "joint_ckpt"
    (joint / "unet_lora").mkdir(parents=True)
    (joint / "unet_lora" / "adapter_config.json").write_text("{}")
    save_file({"lora_A.weight": torch.zeros(4, 4)}, str(joint / "unet_lora" / "adapter_model.safetensors"))
    (joint / "model.json").write_text(json.dumps({**MODEL_RECORD, "model": "joint_sdxl", "preset": "tiny-sdxl"}))
    fails_in_driver(capsys, gen_argv(joint, tmp_path / "out", "--fa_noise", "negated"),
                    r"--fa_noise negated needs the two UNets of dual_unet; this checkpoint is joint_sdxl, .*"
                    r"drop --fa_noise", tmp_path / "out")
    fails_in_driver(capsys, gen_argv(joint, tmp_path / "out", "--struct_guidance", "2"),
                    r"--struct_guidance 2 needs the two UNets of dual_unet; this checkpoint is joint_sdxl, .*"
                    r"drop --struct_guidance", tmp_path / "out")
    # and a guidance target without guidance would change nothing: said before anything is read
    fails_in_driver(capsys, gen_argv(fake_checkpoint, tmp_path / "out", "--struct_guidance_target", "vessels"),
                    r"--struct_guidance_target vessels has no effect with --struct_guidance 0", tmp_path / "out")


def test_the_closing_line_names_the_command_and_leaves_ray_alone_when_it_never_started(capsys, monkeypatch):
    """cli.last_line prints the one line that ends a failed command and returns its exit code; a command that
    never imported Ray (a bad flag, `cffa synth`) does not import it just to leave it."""
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert last_line(argparse.Namespace(command="synth"), "error: --n 0 must be > 0", 2) == 2
    assert capsys.readouterr().err == "cffa synth: error: --n 0 must be > 0\n"
    assert "ray" not in sys.modules
