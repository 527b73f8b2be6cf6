"""End to end: the real `cffa generate` Ray Data job on the tiny run's checkpoint."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cffa_ray.faults import FAULT_ENV, fired
from tests.helpers import GEN_ARGS, assert_ok, run_cli, start_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_head")]  # CLI runs join one Ray head


def tree_digest(root):
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def png_digest(root):
    return tree_digest(root / "png")


def settle(folder, quiet_s=3.0, timeout_s=60.0):
    """Wait until nothing changes in `folder` for quiet_s: Ray worker processes of a killed driver
    can outlive it by a moment and still commit a shard."""
    deadline = time.time() + timeout_s
    last, since = None, time.time()
    while time.time() < deadline:
        now = sorted(p.name for p in folder.iterdir())
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet_s:
            return
        time.sleep(0.2)


def test_forty_pairs_in_parquet_and_png_shards(generated, trained_run):
    out, proc = generated
    assert "generated 40 pairs, skipped 0 already done" in proc.stdout
    df = pd.read_parquet(out / "parquet")
    assert len(df) == 40 and df.pair_id.nunique() == 40 and sorted(df.pair_id) == list(range(40))
    assert {"pair_id", "seed", "cf_png", "fa_png", "mode", "steps", "scheduler", "strength", "source_pair_id",
            "checkpoint"} <= set(df.columns)
    assert (df["mode"] == "noise").all() and (df.steps == 4).all() and (df.scheduler == "ddim").all()
    assert df.strength.isna().all() and df.source_pair_id.isna().all()
    assert df.seed.nunique() == 40
    assert pq.read_table(out / "parquet").num_rows == 40
    folders = sorted((out / "png/shard_0000").iterdir())
    assert [f.name for f in folders] == [f"pair_{k:06d}" for k in range(40)]
    for folder in folders[:3] + folders[-2:]:
        assert sorted(p.name for p in folder.iterdir()) == ["cf.png", "cf_fa_chessboard.png", "fa.png", "joint.png"]
        assert Image.open(folder / "cf.png").size == (64, 64)
        assert Image.open(folder / "fa.png").size == (64, 64) and Image.open(folder / "fa.png").mode == "L"
        assert Image.open(folder / "joint.png").size == (128, 64)
        assert Image.open(folder / "cf_fa_chessboard.png").size == (64, 64)
    # parquet bytes are the PNG files
    row = df.set_index("pair_id").loc[7]
    assert row.cf_png == (out / "png/shard_0000/pair_000007/cf.png").read_bytes()
    assert row.fa_png == (out / "png/shard_0000/pair_000007/fa.png").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_made"] == 40 and summary["pairs_skipped"] == 0 and summary["pairs_per_s"] > 0
    assert summary["arguments"]["concurrency"] == "2"
    # the auto flags, made concrete for a CPU run and recorded
    assert (summary["model_batch"], summary["compile"], summary["mixed_precision"]) == (8, False, "no")
    ident = json.loads((out / "generation.json").read_text())
    assert (ident["model_batch"], ident["compile"], ident["mixed_precision"]) == (8, False, "no")
    assert summary["startup_s"] > 0 and summary["steady_pairs_per_s"] > 0 and summary["gpu_peak_gib"] == 0
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "temporary files left behind"


def test_ray_data_reads_the_parquet(generated, ray_head):
    out, _ = generated
    code = f"import ray; ray.init(); print(ray.data.read_parquet({str(out / 'parquet')!r}).count())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ray_head.cli_env})  # a plain Ray client of the shared head
    assert proc.stdout.strip().splitlines()[-1] == "40", proc.stderr[-2000:]


def test_rerun_adds_nothing(generated, trained_run):
    out, _ = generated
    run, _ = trained_run
    before = {k: v for k, v in tree_digest(out).items() if k != "summary.json"}
    proc = run_cli("generate", "--checkpoint_dir", run / "best_checkpoint", "--output_dir", out, *GEN_ARGS)
    assert_ok(proc)
    assert "generated 0 pairs, skipped 40 already done" in proc.stdout
    assert {k: v for k, v in tree_digest(out).items() if k != "summary.json"} == before


def test_killed_job_resumes_with_only_the_missing_pairs_whatever_the_batches_or_a_dead_actor(generated, trained_run,
                                                                                            tmp_path):
    """A job killed part-way; its rerun, with another batch size, an autoscaling pool of 1 to 2 actors and a
    model actor that dies in its 2nd call (once: Ray Data restarts it and redoes the call), makes only the
    missing pairs, each once, byte-identical to an uninterrupted run with other batches."""
    out_ref, _ = generated
    run, _ = trained_run
    out = tmp_path / "g"
    job = ["generate", "--checkpoint_dir", run / "best_checkpoint", "--output_dir", out, "--num_samples", 40,
           "--steps", 4, "--rows_per_shard", 4]
    proc = start_cli(*job, "--batch_size", 4, "--concurrency", 1)
    try:
        deadline = time.time() + 300
        while len(list((out / "parquet").glob("part-*.parquet"))) < 2:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    settle(out / "parquet")
    shards_before = {p.name: p.read_bytes() for p in (out / "parquet").glob("part-*.parquet")}
    done_before = set(pd.read_parquet(out / "parquet").pair_id)
    assert 0 < len(done_before) < 40, "the job was not stopped part-way"
    pngs_before = {k: v for k, v in png_digest(out).items() if int(k.split("pair_")[1][:6]) in done_before}

    assert 40 - len(done_before) >= 7, "too few pairs left for a 2nd call of an actor: the fault would not fire"
    fault = f"generate_batch=2,once={tmp_path / 'fault-fired'}"
    proc = run_cli(*job, "--batch_size", 3, "--concurrency", "1-2",
                   env={FAULT_ENV: fault})  # the driver hands the variable to its actors (faults.job_env_vars)
    assert_ok(proc)
    assert fired(fault), "the injected fault did not fire"
    assert f"generated {40 - len(done_before)} pairs, skipped {len(done_before)}" in proc.stdout
    df = pd.read_parquet(out / "parquet")
    assert len(df) == 40 and df.pair_id.nunique() == 40
    for name, data in shards_before.items():
        assert (out / "parquet" / name).read_bytes() == data  # finished work untouched
    after = png_digest(out)
    assert all(after[k] == v for k, v in pngs_before.items())
    assert len([k for k in after if k.endswith("/joint.png")]) == 40
    assert len({v for k, v in after.items() if k.endswith("/cf.png")}) == 40  # and pairs are not all alike
    # and the result is the same as an uninterrupted run with batches of 8 on 2 actors
    assert after == png_digest(out_ref)


def test_from_data_mode_into_a_folder_a_failed_run_left(trained_run, pairs_dir, tmp_path):
    """from_data with guidance, into a folder left by a run that made no pair: its generation.json names other
    arguments and blocks nothing (a folder with pairs would refuse them: test_bad_input)."""
    run, _ = trained_run
    out = tmp_path / "fd"
    out.mkdir()
    (out / "generation.json").write_text(json.dumps({"checkpoint": "/a/failed/run", "steps": 50}))
    proc = run_cli("generate", "--checkpoint_dir", run / "best_checkpoint", "--output_dir", out, "--num_samples", 6,
                   "--steps", 4, "--batch_size", 4, "--mode", "from_data", "--data", pairs_dir, "--strength", 0.5,
                   "--struct_guidance", 1.5, "--struct_guidance_target", "vessels")
    assert_ok(proc)
    recorded = json.loads((out / "generation.json").read_text())  # guided too: the actors take the flags
    assert (recorded["struct_guidance"], recorded["struct_guidance_target"]) == (1.5, "vessels")
    assert (recorded["checkpoint"], recorded["steps"]) == (str(run / "best_checkpoint"), 4)
    assert json.loads((out / "summary.json").read_text())["pairs_in_output"] == 6
    df = pd.read_parquet(out / "parquet").sort_values("pair_id")
    assert list(df.pair_id) == list(range(6))
    assert (df["mode"] == "from_data").all() and (df.strength == 0.5).all()
    assert list(df.source_pair_id) == [f"synth_{k:05d}" for k in range(6)]
    assert len(png_digest(out)) == 24


def test_out_of_memory_names_model_batch(trained_run, tmp_path):
    run, _ = trained_run
    out = tmp_path / "oom"
    # 2**40 pairs per call cannot be allocated: the CPU allocator fails at once, as CUDA's would
    proc = run_cli("generate", "--checkpoint_dir", run / "best_checkpoint", "--output_dir", out, "--steps", 2,
                   "--num_samples", 2, "--concurrency", 1, "--model_batch", 2**40)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "out of memory sampling 1099511627776 pairs at once" in last and "--model_batch 549755813888" in last
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list(out.glob("parquet/*.parquet"))


def test_seed_b_interface_writes_numbered_folders_and_a_rerun_keeps_the_folders_model_batch(trained_run):
    """`-n EXP --savedir NAME --amount N`: the run's best_checkpoint, outputs in <runs>_preds/EXP/NAME/1, 2, ...
    A rerun for more pairs makes only the missing ones, with the folder's --model_batch (2), not the CPU
    default (8) that `--model_batch auto` would pick for a new folder."""
    run, _ = trained_run
    argv = ("generate", "-n", run.name, "--runs_root", run.parent, "--savedir", "exp1_noise", "--steps", 2, "--mode",
            "noise", "--concurrency", 1)
    assert_ok(run_cli(*argv, "--amount", 3, "--model_batch", 2))
    out = run.parent.parent / f"{run.parent.name}_preds" / run.name / "exp1_noise"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["1", "2", "3", "parquet"]
    proc = run_cli(*argv, "--amount", 5)
    assert_ok(proc)
    assert "generated 2 pairs, skipped 3 already done" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["model_batch"] == 2
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["1", "2", "3", "4", "5", "parquet"]
    for k in ("1", "2", "3", "4", "5"):
        assert sorted(p.name for p in (out / k).iterdir()) == ["cf.png", "cf_fa_chessboard.png", "fa.png", "joint.png"]
    df = pd.read_parquet(out / "parquet")
    assert sorted(df.pair_id) == [0, 1, 2, 3, 4]
    assert df.set_index("pair_id").loc[0].cf_png == (out / "1/cf.png").read_bytes()  # folder k+1 is pair k
    assert df.set_index("pair_id").loc[4].cf_png == (out / "5/cf.png").read_bytes()
    assert json.loads((out / "generation.json").read_text())["checkpoint"] == str(run / "best_checkpoint")
