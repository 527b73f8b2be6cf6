"""Ray start-up and resource checks, shared by every job (train, generate, evaluate).

A job joins the cluster named by RAY_ADDRESS (set inside `ray job submit` jobs and on cluster nodes)
or starts a local Ray sized so that it cannot starve its own Ray Data stages; on a local cluster a
request for resources the machine does not have is an error instead of an endless wait.
"""
from __future__ import annotations

import os
import sys

import ray

from cffa_ray import faults, quiet, stop_signals
from cffa_ray.errors import ConfigError


def init_ray(num_cpus_needed: float) -> None:
    """Join the cluster named by RAY_ADDRESS, else start a local one (no-op when Ray already runs).

    On a small machine, actors and training workers holding every CPU would leave Ray Data none and
    the job would wait forever, so a local cluster advertises at least the jobs' CPUs plus two.

    Args:
        num_cpus_needed: the CPUs the job's workers or actors reserve (local clusters only).
    """
    if ray.is_initialized():
        return
    plain_prefixes()
    if os.environ.get("RAY_ADDRESS"):
        env_vars = faults.job_env_vars()  # (a local Ray's workers inherit this process's environment)
        ray.init(log_to_driver=True, runtime_env={"env_vars": env_vars} if env_vars else None,
                 **quiet.ray_init_kwargs(local=False))
    else:
        # The dashboard also serves the state API that Train's placement-group cleaner polls.
        ray.init(num_cpus=max(os.cpu_count() or 1, int(num_cpus_needed + 0.999) + 2), log_to_driver=True,
                 **quiet.ray_init_kwargs(local=True))
    stop_signals.install()  # ray.init replaced the SIGTERM handler with its own
    quiet.after_ray_init()


def plain_prefixes() -> None:
    """Ray colours the `(RayTrainWorker pid=...)` prefix of forwarded worker lines; into a file or a pipe
    that is escape codes in the log, so there RAY_COLOR_PREFIX=0 (Ray reads it as it prints; a value
    of the user's own is kept)."""
    if not all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr)):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def check_resources(use_gpu: bool, count: int, what: str, accelerator_type: str | None,
                    custom: dict[str, float] | None = None) -> None:
    """On a local cluster (no autoscaler to add nodes), ask for what exists instead of waiting forever.

    Args:
        use_gpu: whether each of the `count` workers/actors needs one GPU.
        count: how many the job starts at least.
        what: the flag that set `count`, named in the error (e.g. "--num_workers").
        accelerator_type: the Ray accelerator type asked for, or None.
        custom: --worker_resources, the custom resources each of them asks for.
    Raises:
        ConfigError: the local machine cannot provide them.
    """
    if os.environ.get("RAY_ADDRESS"):
        return  # a cluster may scale up to meet the request
    have = ray.cluster_resources()
    if use_gpu and have.get("GPU", 0) < count:
        raise ConfigError(f"{what} {count} with --use_gpu needs {count} GPU(s); this machine's Ray has "
                          f"{int(have.get('GPU', 0))}: lower {what} or drop --use_gpu")
    if accelerator_type and not any(k == f"accelerator_type:{accelerator_type}" for k in have):
        kinds = sorted(k.split(":", 1)[1] for k in have if k.startswith("accelerator_type:"))
        raise ConfigError(f"--accelerator_type {accelerator_type} is not on this machine "
                          f"(it has: {', '.join(kinds) or 'none'})")
    short = {k: v * count for k, v in (custom or {}).items() if have.get(k, 0) < v * count}
    if short:
        name, need = next(iter(short.items()))
        raise ConfigError(f"--worker_resources: {what} {count} needs {need:g} {name}, this machine's Ray has "
                          f"{have.get(name, 0):g}; such resources are offered by a cluster's node types "
                          "(cluster.yaml): drop the flag here, or run on that cluster")
