"""One progress line for a long Ray Data job: count, rate and ETA, instead of Ray's status dumps.

Ray Data's own progress display prints a block of per-operator lines (and, when stdout is not a
terminal, a new block every few seconds). A job the user runs from a terminal wants one line. The
pattern: turn Ray's display off, let the last stage of the pipeline emit small rows (ids, numbers,
never images), and iterate them in the driver, which advances one bar:

    from cffa_ray.progress import Progress
    from cffa_ray.quiet import quiet_ray_data

    quiet_ray_data()
    ds = ray.data.from_items(rows).map_batches(work, ...)          # the job, unchanged
    with Progress(total=len(rows), what="pairs", label="evaluate") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            bar.update(len(batch["pair_id"]))
            keep(batch)                                            # small per-row results

`track(ds, total, ...)` wraps that loop. A job that ends in a datasink (generation, latent caching)
can do the same by iterating the sink's small per-write result instead of calling `write_*`, or
by advancing the bar from a cheap `map_batches` stage placed after the heavy ones.

On a terminal the line is a tqdm bar redrawn in place; otherwise (`ray job logs`, CI, files) a
plain line is printed every `log_every_s` seconds and once at the end, so logs stay readable.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterator, TextIO

import pyarrow as pa
import ray
import ray.data
from tqdm import tqdm

from cffa_ray import internals


def _is_terminal(stream) -> bool:
    """A terminal with a width (a pty of 0 columns, as some consoles give, would show tqdm as nothing)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """A progress line for `total` items: `update(n)` as items finish, `close()` (or `with`) at the end."""

    def __init__(self, total: int, what: str = "items", label: str = "cffa", stream: TextIO | None = None,
                 log_every_s: float = 30.0, tty: bool | None = None):
        self.total, self.what, self.label = total, what, label
        self.stream = stream or sys.stderr
        self.tty = _is_terminal(self.stream) if tty is None else tty
        self.log_every_s = log_every_s
        self.done = 0
        self.start = self._last_log = time.monotonic()
        self._bar = None
        if self.tty:
            self._bar = tqdm(total=total, unit=f" {what}", desc=f"[{label}]", file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)

    def line(self) -> str:
        """'[label] 120/480 pairs, 12.3 pairs/s, ETA 0:29' (what the non-terminal mode prints)."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = f"ETA {_duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total \
            else f"{_duration(elapsed)} elapsed"
        return f"[{self.label}] {self.done}/{self.total} {self.what}, {rate:.2f} {self.what}/s, {eta}"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last_log >= self.log_every_s:
            self._last_log = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            print(self.line(), file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(ds, total: int, what: str = "items", label: str = "cffa", count_key: str | None = None,
          **iter_kwargs) -> Iterator[dict]:
    """Iterate a Ray Dataset's batches (numpy dicts) while one progress line counts their rows.

    `count_key`: the column whose length is the batch's row count (default: the first column).
    """
    iter_kwargs.setdefault("batch_size", None)
    iter_kwargs.setdefault("batch_format", "numpy")
    with Progress(total, what=what, label=label) as bar:
        for batch in ds.iter_batches(**iter_kwargs):
            key = count_key or next(iter(batch))
            bar.update(len(batch[key]))
            yield batch


def materialize(ds, total: int, what: str = "items", label: str = "cffa"):
    """`ds.materialize()` with one progress line: the blocks stay in Ray's object store, and the
    returned dataset reads them without running the pipeline again."""
    refs = []
    with Progress(total, what=what, label=label) as bar:
        for block_refs, rows in internals.iter_block_bundles(ds):
            refs.extend(block_refs)
            bar.update(rows)
    if not refs:
        return ds.materialize()  # an empty result: let Ray Data keep its schema
    is_arrow = isinstance(ray.get(refs[0]), pa.Table)
    return ray.data.from_arrow_refs(refs) if is_arrow else ray.data.from_pandas_refs(refs)
