"""Scale-out on simulated multi-node clusters (tests/sim_cluster.py): a node lost during training and
during generation, the fake autoscaler growing and shrinking the cluster for `--concurrency 1-3`,
and an --output_dir that only one node's disk holds.

The jobs run as a user runs them on a cluster: `python -m cffa_ray.cli train|generate` with
RAY_ADDRESS pointing at the cluster's head, placed on the worker nodes with --worker_resources.
"Mid-run" does not depend on the machine's speed: the workers hold at a known point (the `hold` of
CFFA_INJECT_FAULT, cffa_ray/faults.py) until the test has made its fault, and a node is killed once a checkpoint or a
pair is there, never after a sleep. Every test has a hard timeout, every simulated cluster its own
RAY_TMPDIR and ports, and a test stops only the processes it started (the generation test's one-node
reference is the session's shared generation, made on the shared head).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import REPO, running
from tests.sim_cluster import (
    AutoscalingHead,
    SimCluster,
    can_unshare,
    hard_timeout,
    kill_group,
    namespaced_node,
    wait_for,
)

pytestmark = pytest.mark.slow
ACCELERATOR = "fake_gpu"  # a custom resource only the worker nodes offer, as cluster.yaml's gpu_24gb
ON_WORKERS = json.dumps({ACCELERATOR: 1})


# ------------------------------------------------------------------ reading what the jobs leave

def registered_steps(run: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its snapshot file, rewritten atomically)."""
    try:
        return [int(s) for s in re.findall(r'"checkpoint_(\d+)"',
                                           (run / "ray_train/checkpoint_manager_snapshot.json").read_text())]
    except FileNotFoundError:
        return []


def logged_steps(run: Path) -> list[int]:
    try:
        return [int(s) for s in re.findall(r"^step=(\d+)", (run / "training_log.txt").read_text(), re.M)]
    except FileNotFoundError:
        return []


def committed_pair_ids(out: Path) -> list[int]:
    """Pair ids in the committed parquet shards (hidden files are writes in flight)."""
    shards = sorted(p for p in (out / "parquet").glob("*.parquet") if not p.name.startswith("."))
    return [i for p in shards for i in pd.read_parquet(p, columns=["pair_id"]).pair_id]


def finished(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job still runs after {timeout} s:\n{log.read_text()[-4000:]}") from None
    return log.read_text()


def pairs_by_id(out: Path) -> dict[int, tuple[bytes, bytes]]:
    df = pd.read_parquet(out / "parquet")
    assert df.pair_id.is_unique, "a pair was written twice"
    return {int(r.pair_id): (r.cf_png, r.fa_png) for r in df.itertuples()}


# ------------------------------------------------------------------ training loses a node

def test_training_loses_the_node_of_rank_1(pairs_dir, tmp_path):
    """2 workers on 2 nodes, held halfway between two checkpoints; the node of rank 1 is SIGKILLed and a
    new node added: the run resumes from the last checkpoint, redoes at most one interval, and finishes."""
    every, held_at, steps = 4, 6, 12
    run, log, gate = tmp_path / "runs/mn", tmp_path / "train.log", tmp_path / "go"
    # Train's controller polls the workers every 0.5 s (default 2 s): a lost worker is seen sooner
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "CFFA_INJECT_FAULT": f"train_step={held_at + 1},hold={gate}"}
    with hard_timeout(900, "the training node-loss test"), SimCluster(tmp_path, head_cpus=2, env=env) as cluster:
        for _ in range(2):
            cluster.add_node(num_cpus=2, resources={ACCELERATOR: 1})
        t0 = time.time()
        proc = cluster.start_cffa(
            log, "train", "--data", pairs_dir, "--output_dir", tmp_path / "runs", "--name", "mn", "--preset", "tiny",
            "--resolution", 64, "--max_steps", steps, "--num_workers", 2, "--batch_size", 2, "--val_every", every,
            "--num_sample_pairs", 0, "--log_every", 1, "--max_failures", 2, "--worker_resources", ON_WORKERS,
            "--no-cache_latents")  # (the latent cache, a ~6 s actor start before Train's, is not what this tests)
        wait_for(lambda: running(proc, log) and every in registered_steps(run) and held_at in logged_steps(run),
                 600, f"step {held_at} and the step-{every} checkpoint")
        workers = cluster.actors("RayTrainWorker")
        assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2, workers  # one per node
        rank0 = re.search(r"\(RayTrainWorker pid=(\d+)[^)]*\)(?:\x1b\[0m)? \[cffa\] step", log.read_text())
        assert rank0, log.read_text()[-3000:]  # rank 0 prints the step lines, behind Ray's (colored) prefix
        rank0_pid = int(rank0.group(1))
        victim = next(w["node_id"] for w in workers if w["pid"] != rank0_pid)
        t_kill = time.time()
        cluster.remove_node(victim)
        last_checkpoint, reached = max(registered_steps(run)), max(logged_steps(run))
        gate.touch()  # the resumed group goes on past the hold point
        cluster.add_node(num_cpus=2, resources={ACCELERATOR: 1})  # what the autoscaler does after a loss
        resumed = wait_for(lambda: running(proc, log) and re.search(r"resuming at step (\d+)", log.read_text()),
                           240, "the resumed worker group")
        t_resumed = time.time()
        wait_for(lambda: running(proc, log) and max(logged_steps(run)) > int(resumed.group(1)), 120, "a resumed step")
        t_stepping = time.time()
        output = finished(proc, log, 240)
    assert proc.returncode == 0, output[-5000:]
    resumed_at = int(resumed.group(1))
    redone = reached - resumed_at
    print(f"\n[multinode] training: killed the node of rank 1 at step {reached} ({t_kill - t0:.1f}s into the job); "
          f"resumed from step {resumed_at} (last registered checkpoint {last_checkpoint}): {redone} step(s) redone "
          f"of a {every}-step interval; group restarted {t_resumed - t_kill:.1f}s after the kill, stepping again "
          f"after {t_stepping - t_kill:.1f}s; job {time.time() - t0:.1f}s")
    assert last_checkpoint <= resumed_at <= reached and 0 <= redone <= every
    assert len(re.findall(r"resuming at step", output)) == 1, output[-4000:]
    assert logged_steps(run) == list(range(1, steps + 1))  # the log was rewound and continued: every step once

    import torch
    from peft import PeftModel

    from cffa_ray.models.base import load_base

    for adapter in ("unet_cf_lora", "unet_fa_lora"):
        unet = load_base("dual_unet", "", "tiny").unet
        lora = PeftModel.from_pretrained(unet, run / "best_checkpoint" / adapter)
        b = [p for n, p in lora.named_parameters() if "lora_B" in n]
        assert b and any(float(p.abs().max()) > 0 for p in b), f"{adapter}: the LoRA was never trained"
        assert all(torch.isfinite(p).all() for p in b)


# ------------------------------------------------------------------ generation loses a node

# the shared generation's seed, steps and model batch (tests/helpers.GEN_ARGS): its first 24 pairs, in 6 batches
# (each model call pads its 4 pairs to the model batch, 8, as the pairs' pixels require)
GENERATE = ("--num_samples", 24, "--steps", 4, "--batch_size", 4, "--rows_per_shard", 4)
MODEL_ACTORS = 3  # one per node


def test_generation_loses_a_node_and_nothing_else(trained_run, generated, tmp_path):
    """Model actors on 3 nodes, each held after its first call; one node SIGKILLed once pairs are committed:
    exactly N pairs, each once, byte-identical to the same pairs made on one node (the session's shared
    generation, on the shared head)."""
    ckpt = trained_run[0] / "best_checkpoint"
    one_node, _ = generated
    out, log, gate = tmp_path / "generated", tmp_path / "generate.log", tmp_path / "go"
    with hard_timeout(480, "the generation node-loss test"), \
            SimCluster(tmp_path, head_cpus=2, env={"CFFA_INJECT_FAULT": f"generate_batch=2,hold={gate}"}) as cluster:
        for _ in range(MODEL_ACTORS):
            cluster.add_node(num_cpus=1, resources={ACCELERATOR: 1})
        t0 = time.time()
        proc = cluster.start_cffa(log, "generate", "--checkpoint_dir", ckpt, "--output_dir", out, *GENERATE,
                                  "--concurrency", MODEL_ACTORS, "--worker_resources", ON_WORKERS)
        wait_for(lambda: running(proc, log) and committed_pair_ids(out), 180, "the first committed pairs")
        # every actor is held before its 2nd call, so the job cannot end before the others are up: await them.
        # But Ray Data releases an actor that it has no input left for: seen once with one of the three (its
        # death cause "all references to the actor were removed", printed below), and twice, after the training
        # node-loss test, with two, all the work then queued on the third. Then the one live actor's node is the
        # one lost, and the job must restart it.
        def spread() -> bool:
            found = cluster.actors("PairGenerator", state=None)
            alive = {a["node_id"] for a in found if a["state"] == "ALIVE"}
            settled = len(found) >= MODEL_ACTORS and all(a["state"] in ("ALIVE", "DEAD") for a in found)
            return len(alive) >= 2 or bool(alive and settled)

        try:
            wait_for(lambda: running(proc, log) and spread(), 240,
                     "model actors alive on two nodes (or on one, the others released)", every=1)
        except AssertionError as e:
            raise AssertionError(f"{e}; the model actors: {cluster.actors('PairGenerator', state=None)}\n"
                                 f"{log.read_text()[-4000:]}") from None
        released = [a["death_cause"] for a in cluster.actors("PairGenerator", state="DEAD")]
        actors = cluster.actors("PairGenerator")
        t_kill = time.time()
        cluster.remove_node(actors[0]["node_id"])
        done_at_kill = len(committed_pair_ids(out))
        gate.touch()
        output = finished(proc, log, 240)
        t_end = time.time()
    assert proc.returncode == 0, output[-5000:]
    assert "Warning" not in output, output[-5000:]  # e.g. torch's about read-only batches from another node
    n = GENERATE[1]
    print(f"\n[multinode] generation: killed a node with a model actor {t_kill - t0:.1f}s into the job with "
          f"{done_at_kill}/{n} pairs committed ({len(actors)} live actor(s); ended before the kill: {released}); "
          f"the job finished {t_end - t_kill:.1f}s later")
    assert done_at_kill < n, "the node was lost after the job had made every pair: not mid-run"
    assert sorted(committed_pair_ids(out)) == list(range(n))  # exactly N, none twice
    made, expected = pairs_by_id(out), pairs_by_id(one_node)
    assert [k for k in made if made[k] != expected[k]] == []  # byte-identical to the one-node run
    folders = sorted((out / "png").glob("shard_*/pair_*"))
    twins = {f.name: f for f in (one_node / "png").glob("shard_*/pair_*")}
    assert len(folders) == n
    for folder in folders:
        twin = twins[folder.name]
        assert all((folder / f).read_bytes() == (twin / f).read_bytes() for f in ("cf.png", "fa.png", "joint.png"))


# ------------------------------------------------------------------ the autoscaler

def test_autoscaler_grows_to_three_nodes_for_generation_and_back(trained_run, tmp_path):
    """The fake autoscaler with cluster.yaml's node types (1 CPU and one fake accelerator each, at most 3
    of a type, idle after 0.2 min): `--concurrency 1-3 --worker_resources '{"gpu_24gb": 1}'` grows the
    cluster to 3 gpu_24gb nodes while work queues (each actor held after its first call until the third
    is up), and it shrinks back to the head alone after the job. (Ray Data may also ask for CPUs, which
    the autoscaler meets with `cpu` nodes, as on the real cluster; the timeline shows them.)"""
    ckpt = trained_run[0] / "best_checkpoint"
    out, log, gate = tmp_path / "generated", tmp_path / "generate.log", tmp_path / "go"
    n = 48
    events: list[tuple[float, str]] = []
    with hard_timeout(420, "the autoscaling test"), \
            AutoscalingHead(tmp_path, REPO / "cluster.yaml", head_cpus=4, max_workers=3, idle_timeout_minutes=0.2,
                            env={"CFFA_INJECT_FAULT": f"generate_batch=2,hold={gate}"}) as head:
        assert head.worker_nodes() == []
        t0 = time.time()
        proc = head.start_cffa(log, "generate", "--checkpoint_dir", ckpt, "--output_dir", out, "--num_samples", n,
                               "--steps", 4, "--batch_size", 4, "--model_batch", 4, "--rows_per_shard", 4,
                               "--concurrency", "1-3", "--worker_resources", json.dumps({"gpu_24gb": 1}))
        known: dict[str, str] = {}  # node id -> its type
        most = 0  # gpu_24gb nodes at once
        while proc.poll() is None:
            workers = head.worker_nodes()
            for node in workers:
                if node["node_id"] not in known:
                    known[node["node_id"]] = kind = node_type(node["resources"])
                    events.append((time.time() - t0, f"node added: {kind} ({len(workers)} worker nodes)"))
            if not any("first pair" in e for _, e in events) and committed_pair_ids(out):
                events.append((time.time() - t0, "first pair"))
            most = max(most, sum(known[n["node_id"]] == "gpu_24gb" for n in workers))
            if most == 3 and not gate.exists():
                gate.touch()
                events.append((time.time() - t0, "3 gpu_24gb nodes: the actors' hold released"))
            assert time.time() - t0 < 300, log.read_text()[-4000:]
            time.sleep(0.5)
        events.append((time.time() - t0, f"last pair (job exit {proc.returncode})"))
        output = log.read_text()
        assert proc.returncode == 0, output[-5000:]
        left = {n["node_id"] for n in head.worker_nodes()}
        while left:
            now = {n["node_id"] for n in head.worker_nodes()}
            for gone in sorted(left - now):
                events.append((time.time() - t0, f"node removed: {known.get(gone)} ({len(now)} worker nodes left)"))
            left = now
            assert time.time() - t0 < 400, "the idle nodes were not removed"
            time.sleep(0.5)
    print("\n[multinode] autoscaling timeline (s since `cffa generate` started):")
    for at, what in events:
        print(f"  {at:6.1f}  {what}")
    assert most == 3, events  # scaled up to the pool's MAX on nodes of the type asked for
    assert sorted(committed_pair_ids(out)) == list(range(n))  # and back to 0 worker nodes (the loop above)


def node_type(resources: dict) -> str:
    """The cluster.yaml type of a fake node, by the custom resource it offers (`cpu`: none)."""
    return next((k for k in ("gpu_24gb", "gpu_48gb") if k in resources), "cpu")


# ------------------------------------------------------------------ an output folder on one node's disk

def test_node_local_output_dir_never_ends_in_success(trained_run, pairs_dir, tmp_path):
    """--output_dir exists on every node, but on one node it is that node's own disk (a bind mount in its
    mount namespace): refused before any work while that node is up, and a job whose writers land on such
    a node after the start stops with one line; neither leaves a pair or reports success."""
    if reason := can_unshare():
        pytest.skip(f"mount namespaces are not permitted here ({reason}): no node-local disk can be simulated")
    ckpt = trained_run[0] / "best_checkpoint"
    out, private = tmp_path / "out", tmp_path / "node_disk"
    out.mkdir()
    private.mkdir()
    generate = ("generate", "--checkpoint_dir", ckpt, "--output_dir", out, "--num_samples", 8, "--steps", 2,
                "--worker_resources", ON_WORKERS)
    with hard_timeout(300, "the node-local output test"), SimCluster(tmp_path, head_cpus=0) as cluster:
        node = namespaced_node(cluster, private, out, tmp_path / "node.log", num_cpus=2, resources={ACCELERATOR: 1})
        wait_for(lambda: cluster.worker_nodes(), 60, "the node with its own disk")
        train = ("train", "--data", pairs_dir, "--output_dir", out, "--name", "r", "--preset", "tiny",
                 "--resolution", 32, "--max_steps", 2, "--worker_resources", ON_WORKERS)
        with ThreadPoolExecutor(2) as pool:  # both refused by the driver: independent, so at once
            refusals = list(pool.map(lambda argv: subprocess.run(
                [sys.executable, "-m", "cffa_ray.cli", *map(str, argv)], cwd=REPO, env=cluster.driver_env(),
                capture_output=True, text=True, timeout=180), (generate, train)))
        for proc in refusals:
            err = proc.stderr.strip()
            assert proc.returncode == 2 and len(err.splitlines()) == 1, proc.stdout[-3000:] + err[-3000:]
            assert re.search(r"--output_dir .* is not the same folder on every node .* every node shares", err), err
            assert list(out.iterdir()) == [] and list(private.iterdir()) == [], "something was written"

        # An autoscaling cluster starts with its head alone: the folder passes the driver's probe, and the
        # node that will write is added while the job waits for its resources.
        kill_group(node)
        wait_for(lambda: not cluster.worker_nodes(), 60, "the node to leave")
        log = tmp_path / "late.log"
        proc = cluster.start_cffa(log, *generate)
        wait_for(lambda: running(proc, log) and "[cffa] generating" in log.read_text(), 120, "the job to start")
        namespaced_node(cluster, private, out, tmp_path / "node2.log", num_cpus=2, resources={ACCELERATOR: 1})
        output = finished(proc, log, 180)
    assert proc.returncode == 1 and "generated 8 pairs" not in output, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("cffa generate: error: ")]
    assert len(errors) == 1, output[-4000:]
    assert re.search(r"--output_dir .* is not the same folder on every node .* every node shares",
                     errors[0]), output[-4000:]
    assert not committed_pair_ids(out) and not list((private).rglob("*.png")), "pairs were written"
