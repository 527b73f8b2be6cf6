"""A readable terminal: the project's own lines, Ray's and DeepSpeed's routine chatter turned off.

Where a setting exists the noise is turned off where it is made:
* RAY_AUTH_MODE=token for a local cluster: Ray turns token authentication on for a new local cluster
  anyway and warns that it did; asking for it explicitly keeps it on, without the warning (a
  RAY_AUTH_MODE of the user's own is left as it is).
* ray.init(logging_level=WARNING): no "Started a local Ray instance" line.
* Ray Train's LoggingConfig(log_level=WARNING) (see `train_logging`): no "Requesting resources",
  "Started training worker group ..." and "Setting up process group" lines on every attempt.
* Ray Data: one progress bar per run on a terminal (not one per operator), its INFO lines off in
  the driver, and its "Progress bars disabled" warning marked as already said where we run code.

Lines that Ray's own actors print and that no setting controls are dropped, by exact pattern
(NOISE below), from the worker output Ray forwards to this terminal; Ray's C++ warning about its
own actors' constructor arguments, which the driver process itself writes to stderr, is dropped
by a filter on that file descriptor. Everything else, errors and tracebacks included, passes. The
full logs stay in Ray's session folder (/tmp/ray/session_latest/logs), and CFFA_RAW_LOGS=1 turns
the filters off.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import socket
import sys
import threading
import warnings

from cffa_ray import internals

# ray is imported inside the functions below, never at the top: `terminal()` must set RAY_AUTH_MODE
# before the first import of ray in a CLI process (Ray reads it then).

NOISE = re.compile("|".join([
    # Ray Data / Ray Train actors create actors with arguments in the object store (ray issue 53727)
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store",
    # Ray Data, in the actors that Ray Train starts to split the dataset
    r"Progress bars disabled\. To enable, set",
    r"Dataset \S+ execution finished in [\d.]+ seconds",
    # Ray Train passes a deprecated option to Ray Data (the warning, then its source line)
    r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is deprecated",
    r"^\s*self\.exclude_resources = exclude_resources\s*$",
    # Ray Train's placement-group cleaner when the state API is briefly busy (it retries)
    r"Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable",
    # transformers' bar while it reads a local text encoder (a base folder such as tiny-retina): instant
    r"Loading weights: +\d+%\|",
    # Ray Data killing its model actors as a stopped job ends, with a call in flight: nothing is retried
    r"Task \S+ failed\. There are infinite retries remaining, so the task will be retried\. Error: The actor is "
    r"dead because it was killed by `ray\.kill`",
]))

_active = False  # set while `terminal()` runs: only the CLI asks for the filters


def is_noise(line: str) -> bool:
    return bool(NOISE.search(line))


@contextlib.contextmanager
def terminal():
    """Around a CLI command: quiet settings before Ray starts, filters once it runs (see module doc)."""
    global _active
    _active = True
    if "ray" not in sys.modules and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when ray is imported (see module doc)
    try:
        yield
    finally:
        _active = False
        _StderrFilter.remove()


def ray_init_kwargs(local: bool) -> dict:
    """Settings for ray.init.

    A local cluster gets a dashboard port of its own, named in RAY_API_SERVER_ADDRESS (inherited by
    its workers): Ray Train's placement-group cleaner looks the state API up by address, and with
    another local Ray instance on the machine its lookup fails ("Found multiple active Ray
    instances") and its thread dies with a traceback.
    """
    kwargs = {"logging_level": logging.WARNING} if _active else {}
    if local:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs["dashboard_port"] = port
    return kwargs


def after_ray_init() -> None:
    """Filter the forwarded worker output and this process's stderr (CLI runs only)."""
    internals.mark_logged_once("ray_data_progress_manager_disabled")
    if not _active or os.environ.get("CFFA_RAW_LOGS"):
        return
    import ray.data

    # One progress bar per Ray Data run on a terminal, not one per operator; elsewhere (logs, pipes)
    # Ray Data would instead log a block of operator states every 10 s.
    ray.data.DataContext.get_current().enable_operator_progress_bars = False
    internals.mark_logged_once("ray_data_progress_manager_global")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    internals.filter_worker_lines(lambda line: not is_noise(line))
    _StderrFilter.install()


def quiet_ray_data() -> None:
    """Turn off Ray Data's own progress bars and per-execution banners (this process only): a job
    that draws its own progress line (progress.py) calls this first."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # "Progress bars disabled. To enable, ..." is the answer to the line above, not news to the user
    logging.getLogger(internals.RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
    internals.mark_logged_once("ray_data_progress_manager_disabled")


def quiet_ray() -> None:
    """In the training driver and workers: Ray Data's per-execution bars and Ray Train's per-report lines
    drown the run's own log; DeepSpeed's ZeRO gathers and reduce-scatters warn of deprecated collectives once
    per step."""
    quiet_ray_data()
    for name in ("ray.train", internals.ray_train_report_logger()):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                            category=FutureWarning)  # (reduce_scatter: ZeRO-3's gradients, torch >= 2.13)


@contextlib.contextmanager
def silenced():
    """stdout and stderr sent to /dev/null for the block: file descriptors 1 and 2 (native writes) and
    Python's sys.stdout and sys.stderr; what was written before is flushed first, and both come back after."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    saved: list[int] = []
    with contextlib.suppress(OSError):  # a closed descriptor (a daemon's): nothing to silence
        saved = [os.dup(1)]
        saved.append(os.dup(2))
    if len(saved) < 2:
        for copy in saved:
            os.close(copy)
        yield
        return
    python = sys.stdout, sys.stderr
    with open(os.devnull, "w") as null:
        try:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            sys.stdout = sys.stderr = null
            yield
        finally:
            sys.stdout, sys.stderr = python
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def train_logging():
    """Ray Train's own log level: warnings and errors only."""
    return internals.train_logging_config("WARNING")


class _StderrFilter:
    """Native writes to file descriptor 2 (Ray's C++ logging) go through a pipe whose reader drops
    NOISE lines; Python's sys.stderr moves to a copy of the real stderr, so that Python output
    (progress bars, which draw only on a terminal, tracebacks, warnings) reaches it directly."""

    _saved: int | None = None
    _python_stderr = None
    _thread: threading.Thread | None = None

    @classmethod
    def install(cls) -> None:
        if cls._saved is not None:
            return
        try:
            sys.stderr.flush()
            read_end, write_end = os.pipe()
            cls._saved = os.dup(2)
            direct = os.fdopen(os.dup(cls._saved), "w", buffering=1, encoding=sys.stderr.encoding,
                               errors="backslashreplace")
            os.dup2(write_end, 2)
            os.close(write_end)
        except (OSError, ValueError, AttributeError):
            return
        cls._python_stderr, sys.stderr = sys.stderr, direct
        cls._thread = threading.Thread(target=cls._pump, args=(read_end, cls._saved), daemon=True,
                                       name="cffa-stderr-filter")
        cls._thread.start()
        atexit.register(cls.remove)

    @staticmethod
    def _pump(read_end: int, out: int) -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                kept = [ln + b"\n" for ln in lines if not is_noise(ln.decode(errors="replace"))]
                if kept:
                    os.write(out, b"".join(kept))
        if pending and not is_noise(pending.decode(errors="replace")):
            os.write(out, pending)

    @classmethod
    def remove(cls) -> None:
        """Give fd 2 and sys.stderr back (the pipe closes, the reader writes what is left and ends)."""
        if cls._saved is None:
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        direct, sys.stderr = sys.stderr, cls._python_stderr
        os.dup2(cls._saved, 2)
        if cls._thread is not None:
            cls._thread.join(timeout=2)
        os.close(cls._saved)
        with contextlib.suppress(OSError, ValueError):
            direct.close()
        cls._saved, cls._thread, cls._python_stderr = None, None, None
