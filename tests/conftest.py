"""Shared fixtures: synthetic pairs, a diffusers folder made with save_pretrained, a checkpoint folder,
and one trained tiny run that the generation tests reuse (helpers that are not fixtures: helpers.py)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from tests.helpers import (
    GEN_ARGS,
    MODEL_RECORD,
    SHARED_HEAD_ENV,
    TRAIN_ARGS,
    RayHead,
    assert_ok,
    run_cli,
    write_tiny_tokenizer,
)

# Ray Train's controller polls its workers every 2 s by default, so a run's start and its end each wait ~1 s
# for the next poll, and a tiny run takes ~4 s longer (measured). Every Ray the tests start (the shared head,
# the simulated clusters, a CLI run's local Ray) inherits this environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# Under pytest-xdist (`-n 2`: README, Development) two test streams share the cores, so each runs torch on one thread,
# and so does every process it starts (Ray's too): OpenMP threads of one stream spinning while the other's
# processes hold the cores made the in-process training tests ~10x slower (measured, 2 cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One Ray head for the session's `cffa` runs: a test module that asks for it (usefixtures) has its CLI
    runs join it (helpers.run_cli) instead of each starting and stopping a local Ray. Started on first use."""
    head = RayHead(tmp_path_factory.mktemp("ray_head"))
    head.start()
    os.environ[SHARED_HEAD_ENV] = json.dumps(head.cli_env)
    try:
        yield head
    finally:
        os.environ.pop(SHARED_HEAD_ENV, None)
        head.stop()
    assert subprocess.run(["pgrep", "-f", head.temp_dir], capture_output=True).returncode == 1, "processes left"


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory) -> Path:
    from cffa_ray.synth import write_synthetic_pairs

    def make(folder: Path) -> str:
        write_synthetic_pairs(folder, 16, 64, seed=0)
        return str(folder)

    return Path(once_per_session(tmp_path_factory, "pairs", make))


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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, pairs_dir, ray_head):
    """The training issue's 'done when' command, run once per test session: (run folder, completed process)."""

    def make(folder: Path) -> dict:
        proc = run_cli("train", "--data", pairs_dir, "--output_dir", folder, "--name", "t", *TRAIN_ARGS)
        assert_ok(proc)
        return {"run": str(folder / "t"), "stdout": proc.stdout, "stderr": proc.stderr}

    done = once_per_session(tmp_path_factory, "trained_run", make)
    return Path(done["run"]), subprocess.CompletedProcess([], 0, done["stdout"], done["stderr"])


@pytest.fixture(scope="session")
def generated(trained_run, tmp_path_factory):
    """The generation issue's 40 pairs from the shared run (GEN_ARGS), made once per session: (output folder,
    completed process). The multi-node generation test compares its pairs with these."""
    run, _ = trained_run

    def make(folder: Path) -> dict:
        proc = run_cli("generate", "--checkpoint_dir", run / "best_checkpoint", "--output_dir", folder / "G", *GEN_ARGS)
        assert_ok(proc)
        return {"out": str(folder / "G"), "stdout": proc.stdout, "stderr": proc.stderr}

    done = once_per_session(tmp_path_factory, "generated", make)
    return Path(done["out"]), subprocess.CompletedProcess([], 0, done["stdout"], done["stderr"])


def once_per_session(tmp_path_factory, name: str, make):
    """make(folder) -> a JSON value, run once per test session. Under pytest-xdist (`-n 2`) the first
    worker to ask makes it in the session's shared temp dir and the others wait for it (a file lock),
    as pytest-xdist's docs advise for an expensive session fixture: every worker reads the same folder."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # this test session's folder, above every worker's
    record = shared / f"{name}.json"
    with FileLock(str(record) + ".lock"):
        if not record.exists():
            (shared / name).mkdir()
            record.write_text(json.dumps(make(shared / name)))
    return json.loads(record.read_text())


@pytest.fixture
def data(tmp_path):
    from cffa_ray.synth import write_synthetic_pairs

    write_synthetic_pairs(tmp_path / "pairs", 6, 32)
    return tmp_path / "pairs"


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
