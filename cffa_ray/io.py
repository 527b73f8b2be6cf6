"""Atomic file writes and reads, for local paths and cloud URIs alike (pyarrow file systems).

Nothing is ever visible under its final name half-written: files go to a temporary name in the
same folder and are renamed (local paths and file:// URIs), or are uploaded in one PUT (object
stores, where a key only appears once the upload completes).

The temporary files and folders (tempfile's, private: 0600 and 0700) are given the permissions the
process's umask allows before they take their final names, as files any other tool writes get: on
shared storage other users and other nodes' accounts can read the results (`umask` decides).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from cffa_ray.errors import ConfigError
from cffa_ray.paths import is_uri


def filesystem(path: str):
    """(pyarrow FileSystem, path inside it) for a local path or an s3:// / gs:// URI."""

    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), os.path.abspath(path)


def local_copy(path: str) -> str:
    """A local folder with the contents of `path`: the path itself, or a download of a URI folder."""
    if not is_uri(path):
        return path

    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise FileNotFoundError(path)
    target = tempfile.mkdtemp(prefix="cffa-download-")
    pafs.copy_files(p, target, source_filesystem=fs)
    return target


def changed_fields(path: str, new: dict, aliases: dict[str, dict] | None = None,
                   free: tuple[str, ...] = ()) -> list[str] | None:
    """'key old -> new' for each field of the JSON record at `path` that differs from `new`
    (None when there is no record yet). `aliases`: {key: {older value: its current name}} for the record;
    `free`: keys the record holds that may change (not compared)."""

    text = read_text(path)
    if text is None:
        return None
    try:
        old = json.loads(text)
    except ValueError:
        raise ConfigError(f"{path} is not readable JSON (damaged); delete it or use another folder") from None
    for key, names in (aliases or {}).items():
        if old.get(key) in names:
            old[key] = names[old[key]]
    keys = sorted((set(old) | set(new)) - set(free))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def read_text(path: str) -> str | None:
    """A small file's text, local or URI; None when it does not exist."""

    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def read_bytes(path: str) -> bytes:
    """A whole file's bytes, local or URI (OSError when it cannot be read)."""
    if is_uri(path):
        fs, p = filesystem(path)
        with fs.open_input_stream(p) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def umask() -> int:
    """This process's umask (read without changing it where Linux says it in /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere it can only be read by setting it
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    if is_uri(path):
        _put(*filesystem(str(path)), data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 -> what a plain open() would have made
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write() says no file: name the one it was for (a full disk)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def publish_dir(staging: str | os.PathLike, final: str | os.PathLike, marker: str | None = None) -> None:
    """Move a finished local folder to `final` (replacing it), or upload it under a URI.

    Locally the old folder is swapped out by rename, so readers see either the old or the new one.
    An object store has no folder rename: there the `marker` file (a checkpoint's model.json) is
    removed first and uploaded last, so while `final` is being replaced it reads as incomplete
    (refused), never as a mix of old and new files.
    """
    staging = Path(staging)
    _umask_modes(staging)
    if is_uri(final):
        _upload_dir(staging, str(final), marker)
        shutil.rmtree(staging, ignore_errors=True)
        return
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _umask_modes(folder: Path) -> None:
    """The umask's modes for a staged folder and everything in it: libraries that write through private
    temporary files (safetensors' save_file makes 0600 files) would otherwise publish them unreadable."""
    mask = umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _upload_dir(staging: Path, final: str, marker: str | None) -> None:
    fs, root = filesystem(final)
    before = {i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
              if i.type == pafs.FileType.File}
    if marker and f"{root}/{marker}" in before:
        fs.delete_file(f"{root}/{marker}")
        before.discard(f"{root}/{marker}")
    rel = [f.relative_to(staging).as_posix() for f in sorted(staging.rglob("*")) if f.is_file()]
    payload = [r for r in rel if r != marker]
    for r in payload:
        _put(fs, f"{root}/{r}", (staging / r).read_bytes())
    for stale in sorted(before - {f"{root}/{r}" for r in rel}):
        fs.delete_file(stale)
    if marker in rel:
        _put(fs, f"{root}/{marker}", (staging / marker).read_bytes())


def _put(fs, dest: str, data: bytes) -> None:
    """Write one file through a pyarrow filesystem, all or nothing: object stores PUT the key whole;
    a file:// (shared file system) target is written beside itself and renamed."""

    folder, name = dest.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)  # a no-op on object stores, needed on file://
    target = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp" if isinstance(fs, pafs.LocalFileSystem) else dest
    with fs.open_output_stream(target) as out:
        out.write(data)
    if target != dest:
        fs.move(target, dest)


@contextlib.contextmanager
def staged(final: str | os.PathLike, marker: str | None = None) -> Iterator[Path]:
    """A staging folder to fill in the `with` block, published as `final` after it (`publish_dir`);
    removed instead when the block fails (a full disk), so that no half-made folder is left beside."""
    stage = staging_dir(final)
    try:
        yield stage
        publish_dir(stage, final, marker)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def remove_paths(paths: list[Path]) -> int:
    """Delete local files and folders (a killed job's staging leftovers); returns how many were given."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return len(paths)


def staging_dir(final: str | os.PathLike) -> Path:
    """A fresh local folder to build `final` in (beside it when local, so the rename is atomic)."""
    if is_uri(final):
        return Path(tempfile.mkdtemp(prefix="cffa-stage-"))
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-")
    os.chmod(stage, 0o777 & ~umask())  # mkdtemp's 0700 -> what a plain mkdir would have made
    return Path(stage)
