"""The cluster path for real: a Ray head started with `ray start --head` on 127.0.0.1 with token
authentication on, jobs sent with `ray job submit --working-dir .`, outputs on a URI (file://, the
same code path as s3:// and gs://). A worker lost mid-run is tested where a whole node dies
(test_multinode.py), with the fault placed deterministically (cffa_ray/faults.py)."""
from __future__ import annotations

import subprocess

import pandas as pd
import pytest

from tests.helpers import RAY

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


def test_train_then_generate_through_ray_job_submit(cluster, pairs_dir, tmp_path):
    runs, out = f"file://{tmp_path}/runs", f"file://{tmp_path}/generated"
    cluster.submit("cffa-train", "python", "jobs/train.py", "--data", str(pairs_dir), "--output_dir", runs,
                   "--name", "c", "--preset", "tiny", "--resolution", "64", "--max_steps", "8", "--num_workers", "1",
                   "--zero_stage", "2", "--batch_size", "2", "--val_every", "4", "--sample_every", "8",
                   "--num_sample_pairs", "2", "--sample_steps", "4")
    assert cluster.wait("cffa-train") == "SUCCEEDED", cluster.logs("cffa-train")[-5000:]
    run = tmp_path / "runs/c"
    assert (run / "best_checkpoint/unet_cf_lora/adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "latest_checkpoints").iterdir()) == ["step_000004", "step_000008"]
    assert (run / "step_000008_random_pairs/pair_01/joint.png").is_file()

    cluster.submit("cffa-generate", "python", "jobs/generate.py", "--checkpoint_dir", f"{runs}/c/best_checkpoint",
                   "--num_samples", "24", "--steps", "3", "--batch_size", "8", "--concurrency", "2",
                   "--output_dir", out)
    assert cluster.wait("cffa-generate") == "SUCCEEDED", cluster.logs("cffa-generate")[-5000:]
    assert "generated 24 pairs" in cluster.logs("cffa-generate")
    df = pd.read_parquet(tmp_path / "generated/parquet")
    assert sorted(df.pair_id) == list(range(24))
    assert len(list((tmp_path / "generated/png/shard_0000").iterdir())) == 24
