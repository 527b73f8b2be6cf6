"""Shared fixtures: synthetic pairs, a diffusers folder made with save_pretrained, the CLI runner,
and one trained tiny run that the generation tests reuse."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 600  # a hang (e.g. Ray Data starved of CPUs) fails the test instead of blocking CI


def _cli_env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # each run starts its own local Ray
    return env


def run_cli(*args: str, timeout: float = CLI_TIMEOUT_S, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cffa <args>` as a user would, in a fresh process (its own local Ray); `env` adds variables."""
    return subprocess.run([sys.executable, "-m", "cffa_ray.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env={**_cli_env(), **(env or {})})


def start_cli(*args: str) -> subprocess.Popen:
    """`cffa <args>` in the background, in its own session so the test can kill it with all of Ray."""
    return subprocess.Popen([sys.executable, "-m", "cffa_ray.cli", *map(str, args)], cwd=REPO, env=_cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory) -> Path:
    from cffa_ray.synth import write_synthetic_pairs

    out = tmp_path_factory.mktemp("pairs")
    write_synthetic_pairs(out, 16, 64, seed=0)
    return out


def write_tiny_tokenizer(folder: Path, max_length: int = 77):
    """A real CLIPTokenizer with a handful of tokens (no download), saved like a hub tokenizer."""
    from cffa_ray.models.presets import tiny_tokenizer

    return tiny_tokenizer(folder, max_length)


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory) -> Path:
    """A tiny Stable-Diffusion-1.5-layout pipeline folder written by diffusers' save_pretrained."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cffa_ray.models.presets import SD_SCHEDULER, TINY_CLIP, TINY_UNET, TINY_VAE

    out = tmp_path_factory.mktemp("sd15_tiny")
    torch.manual_seed(7)
    tokenizer = write_tiny_tokenizer(out / "tok_src")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_CLIP)),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**TINY_UNET),
        scheduler=DDPMScheduler.from_config(SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out / "model")
    return out / "model"


TRAIN_ARGS = ("--preset", "tiny", "--resolution", 64, "--max_steps", 12, "--num_workers", 2, "--zero_stage", 2,
              "--batch_size", 2, "--val_every", 4, "--sample_every", 6, "--num_sample_pairs", 2)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, pairs_dir):
    """The training issue's 'done when' command, run once: (run folder, completed process)."""
    out = tmp_path_factory.mktemp("runs")
    proc = run_cli("train", "--data", pairs_dir, "--output_dir", out, "--name", "t", *TRAIN_ARGS)
    assert_ok(proc)
    return out / "t", proc


# ------------------------------------------------------------------ bad-input tests (driver-side, in-process)

def fails_in_driver(capsys, argv, pattern, out_dir):
    """`cffa argv` through the real entry point: exit 2, one line naming the problem, `out_dir` untouched."""
    import re

    from cffa_ray.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"cffa {argv[0]}: error: ")
    assert "Traceback" not in captured.out + captured.err
    assert re.search(pattern, err), err
    assert not out_dir.exists(), f"{out_dir} was written"
    return err


@pytest.fixture
def data(tmp_path):
    from cffa_ray.synth import write_synthetic_pairs

    write_synthetic_pairs(tmp_path / "pairs", 6, 32)
    return tmp_path / "pairs"


def train_argv(data, out, *extra):
    return ["train", "--data", str(data), "--output_dir", str(out), "--name", "r", "--preset", "tiny",
            "--resolution", "32", "--num_workers", "2", "--batch_size", "1", *map(str, extra)]


MODEL_RECORD = {"model": "dual_unet", "base_model": None, "preset": "tiny", "resolution": 32,
                "unet_lora_rank": 4, "unet_lora_alpha": 4.0}


@pytest.fixture
def fake_checkpoint(tmp_path):
    """A checkpoint folder that passes the driver's file checks (its LoRA weights are not a real model's)."""
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "ckpt"
    for folder in ("unet_cf_lora", "unet_fa_lora"):
        (ckpt / folder).mkdir(parents=True)
        (ckpt / folder / "adapter_config.json").write_text("{}")
        save_file({"lora_A.weight": torch.zeros(4, 4)}, str(ckpt / folder / "adapter_model.safetensors"))
    (ckpt / "model.json").write_text(json.dumps(MODEL_RECORD))
    return ckpt


def gen_argv(ckpt, out, *extra):
    return ["generate", "--checkpoint_dir", str(ckpt), "--output_dir", str(out), *map(str, extra)]
