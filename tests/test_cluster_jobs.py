"""The cluster path for real: a Ray head started with `ray start --head` on 127.0.0.1 with token
authentication on, jobs sent with `ray job submit --working-dir .`, outputs on a URI (file://, the
same code path as s3:// and gs://), a training worker killed mid-run, and only our cluster stopped."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cffa_ray.faults import FAULT_ENV, fired
from tests.helpers import REPO

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.token = root / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.dashboard = free_port()
        # the job driver runs `python`: it must be this environment's
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.address = f"http://127.0.0.1:{self.dashboard}"
        # a short temp dir: Ray's unix socket paths must stay under ~107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="cffa-ray-", dir="/tmp")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
             f"--dashboard-port={self.dashboard}", "--dashboard-host=127.0.0.1",
             f"--ray-client-server-port={free_port()}", "--num-cpus=6", f"--temp-dir={self.temp_dir}"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.time() + 120
        while self.ray("job", "list").returncode != 0:
            assert self.proc.poll() is None, self.proc.stdout.read()
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(1)

    def stop(self) -> None:
        """Stop this cluster only: its `ray start --block` process group (never `ray stop`)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        left = subprocess.run(["pgrep", "-f", self.temp_dir], capture_output=True, text=True).stdout.split()
        for pid in left:
            os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args, "--address", self.address] if args[0] != "job" else
                              [RAY, args[0], args[1], "--address", self.address, *args[2:]],
                              env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def submit(self, job_id: str, *entrypoint: str, env_vars: dict[str, str] | None = None) -> None:
        """`ray job submit` with the project's runtime env file, or that env plus `env_vars`."""
        env_args = ["--runtime-env", "jobs/runtime_env.yaml"]
        if env_vars:
            runtime_env = yaml.safe_load((REPO / "jobs/runtime_env.yaml").read_text())
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
            env_args = ["--runtime-env-json", json.dumps(runtime_env)]
        proc = self.ray("job", "submit", "--submission-id", job_id, "--working-dir", ".", *env_args,
                        "--no-wait", "--", *entrypoint)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def status(self, job_id: str) -> str:
        """RUNNING, PENDING, SUCCEEDED, FAILED or STOPPED, as `ray job status` prints it."""
        out = re.sub(r"\x1b\[[0-9;]*m", "", self.ray("job", "status", job_id).stdout)
        if m := re.search(r"Status for job '[^']+': (\w+)", out):
            return m.group(1)
        for word, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("stopped", "STOPPED")):
            if f"Job '{job_id}' " in out and word in out:
                return status
        return "UNKNOWN"

    def wait(self, job_id: str, timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while (status := self.status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED", "UNKNOWN"):
            assert time.time() < deadline, f"{job_id} still {status}"
            time.sleep(2)
        return status

    def logs(self, job_id: str) -> str:
        return self.ray("job", "logs", job_id).stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    c.start()
    try:
        yield c
    finally:
        c.stop()
    assert subprocess.run(["pgrep", "-f", c.temp_dir], capture_output=True).returncode == 1, "processes left"


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
                   "--name", "c", "--preset", "tiny", "--resolution", "64", "--max_steps", "8", "--num_workers", "2",
                   "--zero_stage", "2", "--batch_size", "2", "--val_every", "4", "--sample_every", "8",
                   "--num_sample_pairs", "2")
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


def test_training_survives_a_killed_worker(cluster, pairs_dir, tmp_path):
    """The worker of rank 1 dies (os._exit, as a killed process) right before step 16, once; the group
    restarts from the step-8 checkpoint and finishes. Ray Train registers a reported checkpoint at its
    next poll of the workers (every 0.5 s here), and steps take ~0.4 s (128 px, 4 micro-batches), so the
    step-8 checkpoint is registered long before step 16 on any machine speed."""
    run = tmp_path / "runs/ft"
    every, fault_step = 8, 16
    fault = f"train_step={fault_step},rank=1,once={tmp_path / 'fault-fired'}"
    cluster.submit("cffa-fault", "python", "jobs/train.py", "--data", str(pairs_dir), "--output_dir",
                   str(tmp_path / "runs"), "--name", "ft", "--preset", "tiny", "--resolution", "128",
                   "--max_steps", "24", "--num_workers", "2", "--batch_size", "2", "--gradient_accumulation_steps", "4",
                   "--val_every", str(every), "--sample_every", "1000", "--log_every", "1", "--max_failures", "2",
                   env_vars={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", FAULT_ENV: fault})
    assert cluster.wait("cffa-fault") == "SUCCEEDED", cluster.logs("cffa-fault")[-5000:]
    logs = cluster.logs("cffa-fault")
    assert fired(fault), "the injected fault did not fire"
    assert f"injected fault: train_step {fault_step} (rank 1)" in logs
    resumed = [int(s) for s in re.findall(r"resuming at step (\d+)", logs)]
    assert resumed == [every], logs[-4000:]  # from the last checkpoint, once
    redone = fault_step - 1 - resumed[0]
    print(f"\nworker of rank 1 died before step {fault_step}; resumed from step {resumed[0]}: {redone} step(s) "
          f"redone (checkpoint interval {every})")
    assert 0 <= redone <= every  # at most one checkpoint interval
    steps = [int(s) for s in re.findall(r"^step=(\d+)", (run / "training_log.txt").read_text(), re.M)]
    assert steps == list(range(1, 25))  # the log was rewound and continued: every step once
