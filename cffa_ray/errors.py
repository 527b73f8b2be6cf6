"""The project's exceptions: what the CLI maps to one line and an exit code (see cli.main).

    ConfigError, DataError  the input's fault (a flag, a file): exit 2, nothing written
    RunStopped              an error every retry would meet again (a diverged loss): exit 1
    Interrupted             the user or the system stopped the run: exit 130 (SIGTERM 143, SIGHUP 129),
                            the message says how to go on
    a full disk or quota    (an OSError, or Ray's wrapping of one: see `disk_full`): exit 1, one line
"""
from __future__ import annotations

import errno
import re
import sys
import traceback

DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded|StorageFull|\[Errno (?:28|122)\]")
FULL_FILE = re.compile(r"\[Errno (?:28|122)\] [^\n:]*: '([^'\n]+)'")  # OSError's text when it names its file


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


def disk_full(error: BaseException) -> str | None:
    """None unless `error` is a full disk or quota (ENOSPC, EDQUOT), itself, in its chain, or in the text of
    a Ray task's or training worker's error that Ray re-raised here (which keeps only the text); then the
    file it was writing, or "" where the error does not say."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(seen.filename or "")
        seen = seen.__cause__ or seen.__context__
    text = "".join(traceback.format_exception(error))
    if not DISK_FULL.search(text):
        return None
    named = FULL_FILE.search(text)
    return named.group(1) if named else ""
