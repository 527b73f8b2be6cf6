"""Publishing finished folders: local rename, and object-store uploads (file:// takes the same path
as s3:// and gs://) where a checkpoint's model.json is the commit marker."""
from __future__ import annotations

import pytest

from cffa_ray import io


def stage(tmp_path, name: str, files: dict[str, str]):
    folder = tmp_path / name
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def tree(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("as_uri", [False, True])
def test_publish_replaces_the_folder_and_drops_stale_files(tmp_path, as_uri):
    final = tmp_path / "out/best_checkpoint"
    target = f"file://{final}" if as_uri else final
    io.publish_dir(stage(tmp_path, "s1", {"a/w.bin": "old", "gone.txt": "x", "model.json": "1"}), target,
                   marker="model.json")
    io.publish_dir(stage(tmp_path, "s2", {"a/w.bin": "new", "model.json": "2"}), target, marker="model.json")
    assert tree(final) == {"a/w.bin": "new", "model.json": "2"}
    assert not (tmp_path / "s2").exists()  # the staging folder is consumed
    assert [p.name for p in final.parent.iterdir()] == ["best_checkpoint"]  # no .old/.tmp left beside it


def test_an_interrupted_upload_leaves_no_marker(tmp_path, monkeypatch):
    final = tmp_path / "out/best_checkpoint"
    io.publish_dir(stage(tmp_path, "s1", {"a/w.bin": "old", "model.json": "1"}), f"file://{final}",
                   marker="model.json")
    real_put, calls = io._put, []

    def failing_put(fs, dest, data):  # the connection drops after the first file of the new version
        calls.append(dest)
        if len(calls) > 1:
            raise OSError("connection reset")
        real_put(fs, dest, data)

    monkeypatch.setattr(io, "_put", failing_put)
    with pytest.raises(OSError):
        io.publish_dir(stage(tmp_path, "s2", {"a/w.bin": "new", "b/w.bin": "new", "model.json": "2"}),
                       f"file://{final}", marker="model.json")
    # a reader now sees an incomplete checkpoint (refused), not old model.json beside new weights
    assert "model.json" not in tree(final)
    assert tree(final)["a/w.bin"] == "new"


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    io.atomic_write_text(tmp_path / "d/summary.json", "{}")
    io.atomic_write_text(f"file://{tmp_path}/u/summary.json", "{}")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        ["d/summary.json", "u/summary.json"]


def test_latest_checkpoints_are_pruned_by_step_number(tmp_path):
    from cffa_ray.train.run_folder import RunFolder

    run = RunFolder(str(tmp_path / "run"))
    for step in (999_998, 999_999, 1_000_000):
        (tmp_path / f"run/latest_checkpoints/step_{step:06d}").mkdir(parents=True)
    run._prune_latest(2)
    assert run.latest_steps() == ["step_999999", "step_1000000"]  # not by name, where 1000000 < 999998


@pytest.mark.parametrize("as_uri", [False, True])
def test_a_killed_runs_staging_files_are_removed(tmp_path, as_uri):
    from cffa_ray.generate.outputs import remove_leftovers

    (tmp_path / "png/shard_0000/.pair_000001.tmp-ab12").mkdir(parents=True)
    (tmp_path / "png/shard_0000/pair_000000").mkdir()
    (tmp_path / "parquet").mkdir()
    (tmp_path / "parquet/.part-000000-000003-n4.parquet.ab12cd34.tmp").write_bytes(b"half")
    (tmp_path / "parquet/part-000004-000007-n4.parquet").write_bytes(b"done")
    assert remove_leftovers(f"file://{tmp_path}" if as_uri else str(tmp_path)) == 2
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "parquet", "parquet/part-000004-000007-n4.parquet", "png", "png/shard_0000", "png/shard_0000/pair_000000"]


def test_a_killed_training_runs_staging_is_removed_and_nothing_else(tmp_path):
    from cffa_ray.train.run_folder import RunFolder

    run = tmp_path / "run"
    for kept in ("best_checkpoint/model.json", "latest_checkpoints/step_000004/model.json", "training_log.txt",
                 "ray_train/.checkpoint_000004.tmp", ".cffa.lock"):
        (run / kept).parent.mkdir(parents=True, exist_ok=True)
        (run / kept).write_text("kept")
    # what a run killed mid-write leaves: the staging folders and files of io.py, made by io.py itself
    io.staging_dir(run / "latest_checkpoints/step_000008")
    io.staging_dir(run / "step_000008_random_pairs")
    (run / ".best_checkpoint.old-1a2b3c4d").mkdir()
    (run / ".training_log.txt.x1y2z3.tmp").write_text("half")
    assert RunFolder(str(run)).remove_leftovers() == 4
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == [
        ".cffa.lock", "best_checkpoint/model.json", "latest_checkpoints/step_000004/model.json",
        "ray_train/.checkpoint_000004.tmp", "training_log.txt"]
    assert sorted(p.name for p in run.iterdir()) == [".cffa.lock", "best_checkpoint", "latest_checkpoints",
                                                     "ray_train", "training_log.txt"]
