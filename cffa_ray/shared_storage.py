"""Output folders on a multi-node cluster: the same folder on every node, or the job stops.

A local path (or a file:// URI) names a folder on each node's own disk unless a shared file system
is mounted there. Pairs, checkpoints and logs that a worker on another node writes into it would
sit where the driver cannot see them, and the job would end "successfully" with nothing to show.
Two checks keep that from ever ending in a silent success:

* before any work the driver writes a probe file into the folder and asks a zero-CPU task pinned to
  every alive node whether it reads the same bytes there (`check_shared_folder`): refused up front;
* a node that joins later (an autoscaling cluster starts with its head alone) is caught where it
  writes: the writer first looks for a record the driver wrote into the folder before the job
  (`check_driver_record`), and the job stops with the same one-line message when it is not there.

Object stores (s3://, gs://) are shared by nature and are not probed.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cffa_ray.errors import ConfigError
from cffa_ray.paths import is_uri

PROBE_TIMEOUT_S = 60  # a node starts a worker process for the probe: seconds on a busy machine
FIX = "use storage that every node shares: s3://, gs://, or a file system mounted at the same path on every node"


class NotShared(RuntimeError):
    """A worker does not see the folder the driver wrote into: the message names the node and the fix."""


def local_folder(path: str) -> str | None:
    """The local path behind `path` (a plain path or a file:// URI); None for object stores."""
    if str(path).startswith("file://"):
        return str(path)[len("file://"):]
    if is_uri(path):
        return None
    return os.path.abspath(os.path.expanduser(path))


def message(flag: str, path: str, nodes: str) -> str:
    return (f"{flag} {path} is not the same folder on every node ({nodes} cannot see what the driver writes "
            f"there); {FIX}")


def _node_name(node_id: str, address: str) -> str:
    return f"node {address} {node_id[:8]}"


def _reads(probe: str, token: str) -> bool:
    """On one node: does `probe` hold `token` there?"""
    try:
        return Path(probe).read_text() == token
    except OSError:
        return False


def check_shared_folder(path: str, flag: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Driver, Ray initialised: ConfigError when an alive node sees another folder at `path`.

    The probe goes into `path` or, when it does not exist yet, its deepest existing parent (a node
    that sees another parent sees another `path` too), and is removed again: nothing stays behind.
    Nodes that do not answer within `timeout_s` are named in a warning; their writes are still
    checked by `check_driver_record`.
    """
    folder = local_folder(path)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if folder is None or len(nodes) < 2:
        return
    existing = Path(folder)
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent
    token = uuid.uuid4().hex
    probe = existing / f".cffa-shared-probe-{token[:12]}"
    probe.write_text(token)
    try:
        reads = ray.remote(num_cpus=0, max_retries=0)(_reads)
        refs = {reads.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe), token): n for n in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        blind = [refs[r] for r in ready if not ray.get(r)]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise ConfigError(message(flag, path, ", ".join(_node_name(n["NodeID"], n["NodeManagerAddress"])
                                                        for n in blind)))
    if pending:
        print(f"[cffa] warning: {len(pending)} of {len(nodes)} nodes did not answer whether they see {flag} {path} "
              f"within {timeout_s:.0f} s; a node that writes there without seeing it stops the job", flush=True)


def unseen_record(record: str, flag: str, path: str) -> str:
    """On a worker about to write into `path`: "" when `record`, which the driver wrote there before
    the job started, is visible on this node, else the one-line message that says it is not."""
    local = local_folder(record)
    if local is None or os.path.exists(local):
        return ""
    return message(flag, path, _node_name(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()))


def check_driver_record(record: str, flag: str, path: str) -> None:
    """`unseen_record`, raised as NotShared (in Ray Data tasks, whose error reaches the driver)."""
    if problem := unseen_record(record, flag, path):
        raise NotShared(problem)
