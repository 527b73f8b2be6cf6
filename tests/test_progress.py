"""The one-line progress display of long Ray Data jobs (no Ray needed: a stand-in dataset)."""
import io
import re

import numpy as np

from cffa_ray.progress import Progress, track


class FakeDataset:
    def __init__(self, batches):
        self.batches = batches
        self.kwargs = None

    def iter_batches(self, **kwargs):
        self.kwargs = kwargs
        yield from self.batches


def test_plain_line_when_not_a_terminal():
    out = io.StringIO()
    with Progress(10, what="pairs", label="cffa evaluate", stream=out, log_every_s=0.0) as bar:
        bar.update(4)
        bar.update(6)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # one per update (log_every_s=0) and the final one
    assert re.fullmatch(r"\[cffa evaluate\] 4/10 pairs, [\d.]+ pairs/s, ETA \d+:\d\d", lines[0]), lines[0]
    assert re.fullmatch(r"\[cffa evaluate\] 10/10 pairs, [\d.]+ pairs/s, \d+:\d\d elapsed", lines[-1]), lines[-1]


def test_plain_mode_prints_rarely():
    out = io.StringIO()
    with Progress(1000, stream=out, log_every_s=3600) as bar:
        for _ in range(1000):
            bar.update()
    assert len(out.getvalue().splitlines()) == 1  # only the final line


def test_terminal_mode_is_one_redrawn_tqdm_line():
    out = io.StringIO()
    with Progress(5, what="pairs", label="x", stream=out, tty=True) as bar:
        bar.update(5)
    text = out.getvalue()
    assert "5/5" in text and "pairs" in text and "\r" in text
    assert text.count("\n") <= 1


def test_track_counts_rows_and_yields_batches(capsys):
    ds = FakeDataset([{"pair_id": np.arange(3)}, {"pair_id": np.arange(2)}])
    seen = [len(b["pair_id"]) for b in track(ds, 5, what="pairs", label="t")]
    assert seen == [3, 2]
    assert ds.kwargs == {"batch_size": None, "batch_format": "numpy"}
    assert "[t] 5/5 pairs" in capsys.readouterr().err


def test_a_terminal_without_width_gets_plain_lines():
    class NoWidth(io.StringIO):
        def isatty(self):
            return True  # a pty whose size is unknown: fileno() / get_terminal_size fail or give 0 columns

    out = NoWidth()
    with Progress(3, stream=out) as bar:
        bar.update(3)
    assert out.getvalue().startswith("[cffa] 3/3 items")
