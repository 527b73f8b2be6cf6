"""End to end: the real `cffa train` on the tiny preset, 2 Ray Train workers, DeepSpeed ZeRO-2.

A worker killed mid-run is tested on a real `ray start` cluster in test_cluster_jobs.py."""
import json
import shutil

import pytest
import torch
from peft import PeftModel
from PIL import Image

from tests.helpers import TRAIN_ARGS, assert_ok, log_steps, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_head")]  # CLI runs join one Ray head


def test_run_folder_is_complete(trained_run, pairs_dir):
    run, proc = trained_run
    assert json.loads((run / "run.json").read_text())["data"] == str(pairs_dir)  # evaluate's memorisation reads it
    assert "ZeRO-2" in proc.stdout and "2 worker(s)" in proc.stdout
    assert "VAE-encoded once (latent cache)" in proc.stdout  # --cache_latents is the default
    assert "Traceback" not in proc.stdout + proc.stderr  # e.g. a Ray Data prefetcher failing on every window
    assert log_steps(run / "training_log.txt") == [10, 12]
    assert log_steps(run / "validation_log.txt") == [4, 8, 12]
    assert "val_loss=" in (run / "validation_log.txt").read_text()
    assert sorted(p.name for p in run.glob("step_*_random_pairs")) == [
        "step_000000_random_pairs", "step_000006_random_pairs", "step_000012_random_pairs"]
    for step in ("000000", "000006", "000012"):
        pairs = sorted(p.name for p in (run / f"step_{step}_random_pairs").iterdir())
        assert pairs == ["pair_00", "pair_01"]
        for pair in pairs:
            folder = run / f"step_{step}_random_pairs" / pair
            assert Image.open(folder / "cf.png").size == (64, 64) and Image.open(folder / "cf.png").mode == "RGB"
            assert Image.open(folder / "fa.png").mode == "L"
            assert Image.open(folder / "joint.png").size == (128, 64)
    assert sorted(p.name for p in (run / "latest_checkpoints").iterdir()) == [
        "step_000004", "step_000008", "step_000012"]
    for ckpt in [run / "best_checkpoint", *(run / "latest_checkpoints").iterdir()]:
        for adapter in ("unet_cf_lora", "unet_fa_lora"):
            assert (ckpt / adapter / "adapter_config.json").is_file()
            assert (ckpt / adapter / "adapter_model.safetensors").is_file()
        record = json.loads((ckpt / "model.json").read_text())
        assert record["model"] == "dual_unet" and record["preset"] == "tiny" and record["resolution"] == 64
        assert record["unet_lora_rank"] == 16 and record["unet_lora_alpha"] == 16
    assert json.loads((run / "latest_checkpoints/step_000012/model.json").read_text())["trained_steps"] == 12
    assert "val_loss" in json.loads((run / "best_checkpoint/model.json").read_text())
    # every rank's DeepSpeed state went through ray.train.report into the run folder
    ray_ckpts = sorted(p.name for p in (run / "ray_train").glob("checkpoint_0*"))
    assert ray_ckpts[-1] == "checkpoint_000012"
    assert list((run / "ray_train" / ray_ckpts[-1]).rglob("*optim_states.pt"))
    assert not list(run.rglob(".*tmp*")), "a temporary file was left behind"


def test_saved_lora_loads_with_peft_and_changes_the_unet(trained_run):
    from cffa_ray.models.base import load_base

    run, _ = trained_run
    parts = load_base("dual_unet", "", "tiny")
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([300, 700]), parts.prompt_embeds.expand(2, -1, -1)
    before = parts.unet(x, t, encoder_hidden_states=ctx).sample
    for adapter in ("unet_cf_lora", "unet_fa_lora"):
        base = load_base("dual_unet", "", "tiny").unet
        after = PeftModel.from_pretrained(base, run / "best_checkpoint" / adapter)(x, t, encoder_hidden_states=ctx)
        assert (after.sample - before).abs().max() > 1e-4, adapter


def test_a_finished_run_rerun_trains_nothing(trained_run, pairs_dir, tmp_path):
    """A rerun of a finished run starts no Ray Train at all, also with its pairs read from elsewhere (run.json's
    data is not compared). Resuming and extending a run: test_errors_e2e (odd images, then a higher
    --max_steps), test_reliability (SIGTERM, Ctrl-C) and test_multinode (a lost node)."""
    run, _ = trained_run
    out = tmp_path / "runs"
    shutil.copytree(run, out / "t")
    log_before = (out / "t/training_log.txt").read_text()

    moved = tmp_path / "pairs_moved"  # the same pairs read from elsewhere: resumable (run.json's data is free)
    moved.symlink_to(pairs_dir)
    same = run_cli("train", "--data", moved, "--output_dir", out, "--name", "t", *TRAIN_ARGS)
    assert_ok(same)
    assert "is already at step 12 (--max_steps 12): nothing to train" in same.stdout
    assert "[cffa] step" not in same.stdout and "worker(s)" not in same.stdout  # no Ray Train run at all
    assert (out / "t/training_log.txt").read_text() == log_before


def test_diffusers_folder_base_with_zero3_bf16_and_accumulation(sd15_folder, pairs_dir, tmp_path):
    """The GPU-style settings on CPU: ZeRO-3 (sharded weights, shared frozen base), bf16, accumulation,
    and the pixel path (uint8 pixels encoded by the VAE each step) instead of the latent cache."""
    proc = run_cli("train", "--data", pairs_dir, "--output_dir", tmp_path, "--name", "f", "--base_model",
                   sd15_folder, "--resolution", 64, "--max_steps", 2, "--num_workers", 2, "--zero_stage", 3,
                   "--mixed_precision", "bf16", "--gradient_accumulation_steps", 2, "--batch_size", 1,
                   "--val_every", 2, "--sample_every", 2, "--num_sample_pairs", 1, "--sample_steps", 2,
                   "--unet_lora_rank", 4, "--max_failures", 0, "--no-cache_latents",
                   local=True)  # the path of a user's first run: a local Ray of its own
    assert_ok(proc)
    assert "pairs decoded at 64px" in proc.stdout and "latent cache" not in proc.stdout
    assert "ZeRO-3" in proc.stdout and "x 2 accumulation = 4 pairs/step" in proc.stdout
    assert "Warning" not in proc.stdout + proc.stderr, proc.stdout[-3000:]  # ZeRO-3's collectives, filtered
    record = json.loads((tmp_path / "f/best_checkpoint/model.json").read_text())
    assert record["base_model"] == str(sd15_folder) and record["preset"] is None
    from safetensors.torch import load_file

    lora = load_file(tmp_path / "f/best_checkpoint/unet_fa_lora/adapter_model.safetensors")
    # from the fp32 masters: values a bf16 copy of the weights could not hold
    assert all(v.dtype == torch.float32 for v in lora.values())
    assert any((v != v.bfloat16().float()).any() for v in lora.values())
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # trained (B starts at 0)
    # the checkpoint of a diffusers-folder base generates (in-process: the Ray job is test_generate_e2e's)
    from cffa_ray.models.build import load_for_generation
    from cffa_ray.sampling import pair_noise, sample_pairs

    model, record = load_for_generation(tmp_path / "f/best_checkpoint")
    cf, fa = sample_pairs(model, pair_noise(model, record["resolution"], 0, [0, 1]), steps=2)
    assert cf.shape == fa.shape == (2, 3, 64, 64) and torch.isfinite(cf).all() and torch.isfinite(fa).all()
