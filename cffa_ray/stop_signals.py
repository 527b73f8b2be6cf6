"""SIGTERM and SIGHUP stop a job the way Ctrl-C (SIGINT) does: one line saying how to go on.

SIGTERM is what spot preemption, `ray job stop`, Kubernetes and `kill` send; SIGHUP is a closed
terminal or SSH session. Left alone, Ray's own handlers make them an exit in the middle of a call
(Python's sys.exit, or its native handler's stack dump and exit 134), and a training run's workers
go on after the driver has named the step to resume from.

Here each of them calls the SIGINT handler in place when it arrives: Python's own (a
KeyboardInterrupt, which the jobs turn into the resume line) or, while `cffa train` waits for its
run, Ray Train's (which aborts the run, workers included, before `fit` returns, so the checkpoint the
line names is the last one). The process then exits with 128 + the signal's number, as a process
killed by it would: 143 for SIGTERM, 129 for SIGHUP (Ctrl-C: 130).

`install()` runs at the start of every command and again right after ray.init, which puts its own
SIGTERM handlers in place.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []


def _handler(signum: int, frame) -> None:
    _received.append(signum)
    on_sigint = signal.getsignal(signal.SIGINT)
    if callable(on_sigint):
        on_sigint(signal.SIGINT, frame)
    else:  # SIG_IGN / SIG_DFL: nothing of Python's would stop the work
        raise KeyboardInterrupt


def install() -> None:
    """Make SIGTERM and SIGHUP act like SIGINT in this process (main thread only: no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)


def received() -> int | None:
    """The first stop signal this process received (None: none, or only SIGINT)."""
    return _received[0] if _received else None


def interrupted() -> str:
    """'interrupted', or 'interrupted by SIGTERM' after a stop signal: the start of the resume lines."""
    signum = received()
    return "interrupted" if signum is None else f"interrupted by {signal.Signals(signum).name}"


def exit_code() -> int:
    """128 + the signal that stopped the run: SIGINT's 130 unless a stop signal came."""
    return 128 + (received() or signal.SIGINT)
