"""One writing job per output folder: a lock file that names its holder.

Two `cffa generate` into one folder would both make every missing pair (the result is right, the
work is doubled), and one's clean-up of half-written leftovers could delete the other's files in
flight; two `cffa train` into one run folder (the same --output_dir and --name) would write over each
other's checkpoints and logs. So the driver holds an exclusive lock on <folder>/.cffa.lock while it
writes; a second job refuses at once, in one line naming the holder (pid, host, since when), before it starts Ray.

The lock is fcntl's POSIX record lock (lockf): released by the kernel when the holder exits in any
way, kill -9 included (no stale lock to clean up), and honoured across the nodes of an NFS mount
(NFSv4 and NLM carry these locks; plain flock is local on some clients). The holder removes the file
as it lets go (a killed one leaves it, unlocked: the next job takes it over), and the folders too
that the lock made (the run folder and its missing parents) when nothing else was written in them.
Object stores (s3://, gs://) have no locks: there nothing is checked.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator

from cffa_ray.errors import ConfigError
from cffa_ray.paths import is_uri

LOCK_FILE = ".cffa.lock"


@contextlib.contextmanager
def folder_lock(folder: str, flag: str, job: str, rerun: str = "makes only what is missing",
                instead: str | None = None) -> Iterator[None]:
    """Hold <folder>/.cffa.lock (creating the folder) for the `with` block.

    Args:
        folder: the output folder (a URI: no lock).
        flag: the flag that named it, for the message (e.g. "--output_dir").
        job: what holds it, as the message names it (e.g. "cffa generate").
        rerun: what a rerun does once the holder has ended, for the message.
        instead: the other way out, for the message (default: "give another <flag>").
    Raises:
        ConfigError: another process holds the lock.
    """
    if is_uri(folder):
        yield
        return
    made = _missing_folders(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    fd = _lock(path, f"{flag} {folder}: another job is writing into it ({{holder}}); wait for it to end (a rerun "
                     f"then {rerun}) or {instead or 'give another ' + flag}")
    try:
        line = (f"{job}, pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before the lock goes: a job that opened it meanwhile sees it gone (_lock)
        os.close(fd)
        for made_folder in made:  # innermost first
            try:
                os.rmdir(made_folder)
            except OSError:  # not empty: something was written
                break


def _missing_folders(folder: str) -> list[str]:
    """`folder` and each of its missing parents, innermost first: what makedirs(folder) would make."""
    missing = []
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def _lock(path: str, refusal: str) -> int:
    """An open descriptor of `path` holding its lock; the file at `path` is the one locked (a holder
    that removed it between our open and our lock leaves us a lock on a file no one else can see).
    Held by another process: ConfigError(refusal, its {holder} filled in)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(refusal.replace("{holder}", holder)) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
