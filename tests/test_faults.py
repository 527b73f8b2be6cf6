"""The fault injection the fault-tolerance tests rely on: it fires exactly where and as often as asked."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from cffa_ray.faults import FAULT_ENV, SUBMITTED_JOB_ENV, fired, job_env_vars, maybe_fail

CALL = "from cffa_ray.faults import maybe_fail; maybe_fail({point!r}, {index}, {rank}); print('went on')"


def run_point(spec: str, point: str, index: int, rank: int = 0) -> subprocess.CompletedProcess:
    """maybe_fail at one point, in a process of its own (a firing fault exits it)."""
    code = CALL.format(point=point, index=index, rank=rank)
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, FAULT_ENV: spec},
                          capture_output=True, text=True, timeout=60)


def test_a_fault_fires_at_its_step_and_rank_once(tmp_path):
    spec = f"train_step=6,rank=1,once={tmp_path / 'fired'}"
    assert "went on" in run_point(spec, "train_step", 5, rank=1).stdout  # another step
    assert "went on" in run_point(spec, "train_step", 6, rank=0).stdout  # another rank
    assert not fired(spec)
    proc = run_point(spec, "train_step", 6, rank=1)
    assert proc.returncode == 1 and "went on" not in proc.stdout
    assert "injected fault: train_step 6 (rank 1)" in proc.stdout and fired(spec)
    assert "went on" in run_point(spec, "train_step", 6, rank=1).stdout  # the restarted worker goes on


def test_a_generation_fault_ignores_the_rank_and_other_points(tmp_path):
    spec = f"generate_batch=2,once={tmp_path / 'fired'}"
    assert "went on" in run_point(spec, "train_step", 2).stdout
    assert run_point(spec, "generate_batch", 2, rank=3).returncode == 1


def test_hold_waits_from_its_index_until_the_file_exists(tmp_path, monkeypatch):
    go = tmp_path / "go"
    monkeypatch.setenv(FAULT_ENV, f"generate_batch=2,hold={go}")
    maybe_fail("generate_batch", 1)  # before the held index: no wait
    released = []
    waiter = threading.Thread(target=lambda: (maybe_fail("generate_batch", 3), released.append(time.time())))
    waiter.start()
    time.sleep(0.3)
    assert not released, "it went on before the hold file existed"
    go.touch()
    waiter.join(timeout=10)
    assert released


def test_unset_does_nothing(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    maybe_fail("train_step", 1)


def test_a_driver_joining_a_cluster_hands_the_fault_on_unless_its_job_was_submitted(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    monkeypatch.delenv(SUBMITTED_JOB_ENV, raising=False)
    assert job_env_vars() == {}
    monkeypatch.setenv(FAULT_ENV, "generate_batch=2,once=/tmp/x")
    assert job_env_vars() == {FAULT_ENV: "generate_batch=2,once=/tmp/x"}
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")  # the job's own runtime env carries it: Ray refuses it twice
    assert job_env_vars() == {}
