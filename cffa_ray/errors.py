"""The project's exceptions: what the CLI maps to one line and an exit code (see cli.main).

    ConfigError, DataError  the input's fault (a flag, a file): exit 2, nothing written
    RunStopped              an error every retry would meet again (a diverged loss): exit 1
    Interrupted             the user or the system stopped the run: exit 130, the message says how to go on
"""
from __future__ import annotations

import sys


class ConfigError(ValueError):
    """A bad flag value; the message names the flag and how to fix it."""


class DataError(ValueError):
    """Bad pairs input; the message names the file(s) and the fix."""


class RunStopped(RuntimeError):
    """A run ended early on an error that every retry would meet again; the message says why and what to do."""


class Interrupted(RuntimeError):
    """The user stopped a run (Ctrl-C); the message says how to go on from where it stopped."""


def first_few(items: list[str], sep: str = "; ", most: int = 3) -> str:
    """The first `most` items and how many more: 'a; b; c (and 4 more)', for one-line messages about
    what may be a long list (bad files, warnings)."""
    more = f" (and {len(items) - most} more)" if len(items) > most else ""
    return sep.join(items[:most]) + more


def warn(message: str) -> None:
    """One warning line on stderr: '[cffa] warning: ...'."""
    print(f"[cffa] warning: {message}", file=sys.stderr, flush=True)
