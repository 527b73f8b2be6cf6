"""The cluster path for real: a Ray head started with `ray start --head` on 127.0.0.1 with token
authentication on, jobs sent with `ray job submit --working-dir .`, outputs on a URI (file://, the
same code path as s3:// and gs://). A worker lost mid-run is tested where a whole node dies
(test_multinode.py), with the fault placed deterministically (cffa_ray/faults.py)."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cffa_ray.models.joint_sdxl import DIFFUSERS_LORA_FILE
from tests.helpers import RAY, assert_ok, run_clis

pytestmark = pytest.mark.slow
@pytest.fixture(scope="module")
def cluster(ray_head):
    """The session's shared head (conftest): a real `ray start --head` with token authentication."""
    yield ray_head


def test_jobs_refuse_a_client_without_the_token(cluster):
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = "0" * 64
    proc = subprocess.run([RAY, "job", "list", "--address", cluster.address], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0


def test_the_joint_design_trains_and_generates_through_ray_job_submit(cluster, pairs_dir, tmp_path):
    """Training, then generation, sent with `ray job submit`, outputs on a file:// URI, with the joint_sdxl design
    (every other job test runs dual_unet through the same jobs): its checkpoints in both LoRA formats, a preview,
    and pairs whose joint.png is CF|FA exactly. While the generation runs, the from_data mode and two refusals
    of a joint checkpoint where a dual-UNet one is asked for run on the same head (independent jobs at once)."""
    runs, out = f"file://{tmp_path}/runs", tmp_path / "generated"
    train = cluster.submit("cffa-train", "python", "jobs/train.py", "--model", "joint_sdxl", "--preset", "tiny-sdxl",
                           "--data", str(pairs_dir), "--output_dir", runs, "--name", "c", "--resolution", "64",
                           "--max_steps", "8", "--num_workers", "1", "--zero_stage", "2", "--batch_size", "2",
                           "--val_every", "4", "--sample_every", "8", "--num_sample_pairs", "2", "--sample_steps", "4")
    cluster.finished("cffa-train", train)
    run = tmp_path / "runs/c"
    latest = run / "latest_checkpoints"
    assert sorted(p.name for p in latest.iterdir()) == ["step_000004", "step_000008"]
    for ckpt in (run / "best_checkpoint", latest / "step_000004", latest / "step_000008"):
        assert (ckpt / "unet_lora/adapter_config.json").is_file()
        assert (ckpt / "unet_lora/adapter_model.safetensors").is_file()
        assert (ckpt / DIFFUSERS_LORA_FILE).is_file()
        assert json.loads((ckpt / "model.json").read_text())["model"] == "joint_sdxl"
    for name in ("cf.png", "fa.png", "joint.png"):
        assert (run / "step_000008_random_pairs/pair_01" / name).is_file()

    ckpt = run / "best_checkpoint"
    generate = cluster.submit("cffa-generate", "python", "jobs/generate.py", "--checkpoint_dir",
                              f"{runs}/c/best_checkpoint", "--num_samples", "24", "--steps", "3", "--batch_size", "8",
                              "--concurrency", "2", "--output_dir", f"file://{out}")
    from_data, wrong, retrain = run_clis(
        ("generate", "--checkpoint_dir", ckpt, "--num_samples", 2, "--steps", 3, "--mode", "from_data", "--data",
         pairs_dir, "--strength", 0.6, "--output_dir", tmp_path / "fd"),
        ("generate", "--checkpoint_dir", ckpt, "--model", "dual_unet", "--output_dir", tmp_path / "w"),
        ("train", "--model", "dual_unet", "--preset", "tiny", "--data", pairs_dir, "--output_dir", tmp_path / "runs",
         "--name", "c", "--resolution", 64))
    assert "generated 24 pairs" in cluster.finished("cffa-generate", generate)
    df = pd.read_parquet(out / "parquet")
    assert sorted(df.pair_id) == list(range(24)) and (df.model == "joint_sdxl").all()
    assert len(list((out / "png/shard_0000").iterdir())) == 24
    pair = out / "png/shard_0000/pair_000002"
    joint_png = Image.open(pair / "joint.png")
    assert joint_png.size == (128, 64)
    j = np.asarray(joint_png)
    assert np.array_equal(j[:, :64], np.asarray(Image.open(pair / "cf.png")))       # CF = left half, exactly
    assert np.array_equal(j[:, 64:, 0], np.asarray(Image.open(pair / "fa.png")))    # FA = right half
    assert_ok(from_data)
    assert set(pd.read_parquet(tmp_path / "fd/parquet").source_pair_id) == {"synth_00000", "synth_00001"}
    # a joint checkpoint is not a dual-UNet one, and the jobs say so
    assert wrong.returncode == 2 and "holds a joint_sdxl model" in wrong.stderr
    assert retrain.returncode == 2 and "model 'joint_sdxl' -> 'dual_unet'" in retrain.stderr
