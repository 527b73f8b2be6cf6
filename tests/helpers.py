"""Helpers the test modules share (fixtures live in conftest.py): running the real CLI, checking a
one-line driver error, model and data builders."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 600  # a hang (e.g. Ray Data starved of CPUs) fails the test instead of blocking CI


def _cli_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env.pop("RAY_ADDRESS", None) if "RAY_ADDRESS" not in (extra or {}) else None  # each run starts its own Ray
    return env


def run_cli(*args: str, timeout: float = CLI_TIMEOUT_S, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cffa <args>` as a user would, in a fresh process (its own local Ray); `env` adds variables."""
    return subprocess.run([sys.executable, "-m", "cffa_ray.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=_cli_env(env))


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`cffa <args>` in the background, in its own session so the test can signal it with all of Ray."""
    return subprocess.Popen([sys.executable, "-m", "cffa_ray.cli", *map(str, args)], cwd=REPO, env=_cli_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def write_tiny_tokenizer(folder: Path, max_length: int = 77):
    """A real CLIPTokenizer with a handful of tokens (no download), saved like a hub tokenizer."""
    from cffa_ray.models.presets import tiny_tokenizer

    return tiny_tokenizer(folder, max_length)


TRAIN_ARGS = ("--preset", "tiny", "--resolution", 64, "--max_steps", 12, "--num_workers", 2, "--zero_stage", 2,
              "--batch_size", 2, "--val_every", 4, "--sample_every", 6, "--num_sample_pairs", 2)


def train_argv(data, out, *extra):
    return ["train", "--data", str(data), "--output_dir", str(out), "--name", "r", "--preset", "tiny",
            "--resolution", "32", "--num_workers", "2", "--batch_size", "1", *map(str, extra)]


def gen_argv(ckpt, out, *extra):
    return ["generate", "--checkpoint_dir", str(ckpt), "--output_dir", str(out), *map(str, extra)]


MODEL_RECORD = {"model": "dual_unet", "base_model": None, "preset": "tiny", "resolution": 32,
                "unet_lora_rank": 4, "unet_lora_alpha": 4.0}


def fails_in_driver(capsys, argv, pattern, out_dir):
    """`cffa argv` through the real entry point: exit 2, one line naming the problem, `out_dir` untouched."""
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


def randomise_lora(model: torch.nn.Module, std: float, seed: int | None = 0) -> torch.nn.Module:
    """Give every LoRA B matrix random values (a fresh adapter has B = 0 and changes nothing), as after
    training; returns the model."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model


def odd_pairs(folder):
    """Six pairs, five of them odd in one way each (plus a 16-bit FA, which is not odd)."""
    from cffa_ray.synth import write_synthetic_pairs

    write_synthetic_pairs(folder, 6, 64)
    cf, fa = folder / "cf", folder / "fa"
    Image.open(cf / "synth_00001.png").convert("L").save(cf / "synth_00001.png")  # grey CF
    rgba = Image.open(fa / "synth_00002.png").convert("RGBA")
    rgba.putalpha(200)
    rgba.save(fa / "synth_00002.png")  # RGBA FA, half transparent
    Image.open(fa / "synth_00003.png").resize((96, 96)).save(fa / "synth_00003.png")  # pair of two sizes
    for image in (cf / "synth_00004.png", fa / "synth_00004.png"):
        Image.open(image).resize((64, 48)).save(image)  # not square
    for image in (cf / "synth_00005.png", fa / "synth_00005.png"):
        Image.open(image).resize((8, 8)).save(image)  # 8x8 for --resolution 64
    grey = np.asarray(Image.open(fa / "synth_00000.png"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(fa / "synth_00000.png")  # 16-bit FA
    return folder
