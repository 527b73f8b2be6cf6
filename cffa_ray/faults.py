"""Deterministic fault injection, for the tests of fault tolerance: a training worker or a generation
actor dies at a named point, once, when the environment asks for it.

    CFFA_INJECT_FAULT="train_step=6,rank=1,once=/tmp/x/fired"   worker of rank 1 dies before step 6
    CFFA_INJECT_FAULT="generate_batch=2,once=/tmp/x/fired"       a model actor dies in its 2nd call

`once` names a marker file: the fault fires only while it is absent (and creates it), so the restarted
worker or actor goes on. The process exits at once (os._exit), as a crashed or killed one would. With
the variable unset (normal use) a check costs one dictionary lookup. The variable must reach the
process: a local Ray's workers inherit the driver's environment, a `cffa` driver that joins a
cluster hands it to its job's workers in the job's runtime env (`job_env_vars`), and a job sent with
`ray job submit` carries it in its own (`--runtime-env-json '{"env_vars": {"CFFA_INJECT_FAULT": ...}}'`).

`hold` names a file to wait for instead: the job stops at the point, from there on, until the test
creates the file, so that a fault the test makes itself (a node killed) lands mid-run whatever the
machine's speed:

    CFFA_INJECT_FAULT="train_step=13,hold=/tmp/x/go"      every rank waits before step 13 (12 is done)
    CFFA_INJECT_FAULT="generate_batch=2,hold=/tmp/x/go"   every model actor waits before its 2nd call
    CFFA_INJECT_FAULT="command=1,hold=/tmp/x/go"          the `cffa` command waits before it starts its job
                                                          (its stop-signal handlers are in place)
"""
from __future__ import annotations

import os
import time
from pathlib import Path

HOLD_POLL_S = 0.05

FAULT_ENV = "CFFA_INJECT_FAULT"


def parse(spec: str) -> dict[str, str]:
    """'train_step=6,rank=1,once=/p' -> {'train_step': '6', 'rank': '1', 'once': '/p'}."""
    return dict(part.split("=", 1) for part in spec.split(",") if "=" in part)


def maybe_fail(point: str, index: int, rank: int = 0) -> None:
    """Exit this process if CFFA_INJECT_FAULT asks for `point` at `index` (and `rank`), once; with
    `hold`, wait there (and at every later index) until the hold file exists instead.

    Args:
        point: "train_step", "generate_batch" or "command".
        index: the step about to run, or the 1-based call of this actor.
        rank: the training worker's rank (generation actors: 0, and the spec's rank is ignored).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault = parse(spec)
    if "hold" in fault:
        _hold(fault, point, index, rank)
        return
    if fault.get(point) != str(index) or (point == "train_step" and int(fault.get("rank", 0)) != rank):
        return
    marker = fault.get("once")
    if marker:
        try:  # O_EXCL: of two processes reaching the point together, one fires
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    print(f"[cffa] injected fault: {point} {index} (rank {rank}), exiting", flush=True)
    os._exit(1)


def _hold(fault: dict[str, str], point: str, index: int, rank: int) -> None:
    """Wait while the `hold` file is absent, at `point` from its index on (every rank, or the spec's `rank`)."""
    if point not in fault or index < int(fault[point]) or ("rank" in fault and int(fault["rank"]) != rank):
        return
    while not os.path.exists(fault["hold"]):
        time.sleep(HOLD_POLL_S)


def fired(spec: str) -> bool:
    """Whether the fault of `spec` has fired (its `once` marker exists)."""
    marker = parse(spec).get("once")
    return bool(marker) and Path(marker).exists()


SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a `ray job submit` job


def job_env_vars() -> dict[str, str]:
    """The fault's variable, for the runtime env of a job that joins a cluster (whose workers were not
    started from this process's environment); {} when no fault is asked for, and in a submitted job,
    whose own runtime env already reaches its workers (Ray refuses a key given in both)."""
    spec = os.environ.get(FAULT_ENV)
    return {FAULT_ENV: spec} if spec and SUBMITTED_JOB_ENV not in os.environ else {}
