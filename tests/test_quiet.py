"""A readable terminal (cffa_ray/quiet.py): Ray's routine lines go and errors stay, and a command's closing
line (cli.last_line) is the last thing it prints, whatever Ray does as it is left."""
import os
import subprocess
import sys

import pytest

from cffa_ray.quiet import is_noise, silenced
from tests.helpers import REPO

DROPPED = [
    "(raylet) Task MapWorker(MapBatches(add_noise)->MapBatches(PairGenerator)).submit failed. There are infinite "
    "retries remaining, so the task will be retried. Error: The actor is dead because it was killed by `ray.kill`.",
    "(SplitCoordinator pid=1) Progress bars disabled. To enable, set `ray.data.DataContext...`",
    "Loading weights:  50%|#####     | 1/2",
]
KEPT = [
    "(raylet) Task MapWorker(MapBatches(PairGenerator)).submit failed. There are infinite retries remaining, so "
    "the task will be retried. Error: The actor died unexpectedly before finishing this task.",  # a crash: news
    "Traceback (most recent call last):",
    "(RayTrainWorker pid=7) [cffa] step 10/12 loss 2.6140 2.09 steps/s eta 1s",
    "cffa generate: error: out of memory sampling 8 pairs at once",
]


@pytest.mark.parametrize("line", DROPPED)
def test_routine_ray_lines_are_noise(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", KEPT)
def test_errors_and_the_projects_lines_pass(line):
    assert not is_noise(line)


def test_silenced_drops_native_and_python_writes_and_gives_both_back(capfd):
    print("before", flush=True)
    with silenced():
        print("python out")
        print("python err", file=sys.stderr)
        os.write(1, b"native out\n")
        os.write(2, b"native err\n")
    print("after", file=sys.stderr)
    assert capfd.readouterr() == ("before\n", "after\n")


# A stand-in for Ray whose shutdown does what the real one does only by chance: prints a worker line that was
# on its way, or ends the process from native code. (`cli.last_line` looks Ray up in sys.modules.)
LEAVE_RAY = """
import os, sys, types, argparse
late = lambda: (print("(RayTrainWorker pid=1) [cffa] step 8/9"), os.write(2, b"[core_worker.cc] late\\n"))
sys.modules["ray"] = types.SimpleNamespace(is_initialized=lambda: True, shutdown={shutdown})
from cffa_ray.cli import last_line
sys.exit(last_line(argparse.Namespace(command="train"), "training interrupted by SIGTERM", 143))
"""


# Ray's own dispatcher of forwarded worker lines, fed by a thread as Ray's log thread feeds it, in batches:
# the closing line comes after every line printed and before none.
WORKER_LINES = """
import argparse, os, sys, threading, time
import ray
from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

def printer(data):
    for line in data["lines"]:
        print(line, flush=True)
        time.sleep(0.001)

dispatcher.add_handler("ray_print_logs", printer)
feeding = threading.Thread(target=lambda: [dispatcher.emit({"lines": [f"(Worker pid=1) line {k}"] * 20})
                                           for k in range(10**6)], daemon=True)
feeding.start()
time.sleep(0.2)
ray.is_initialized, ray.shutdown = (lambda: True), (lambda: None)
from cffa_ray.cli import last_line
sys.exit(last_line(argparse.Namespace(command="train"), "training interrupted by SIGTERM", 143))
"""


def test_no_worker_line_follows_the_closing_line():
    for _ in range(2):  # (without the printer stopped first, a run left the line last 1 time in 20)
        proc = subprocess.run([sys.executable, "-c", WORKER_LINES], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=120)  # one pipe, as a terminal shows it
        lines = proc.stdout.splitlines()
        assert proc.returncode == 143 and len(lines) > 20, proc.stdout[-2000:]
        assert lines[-1] == "cffa train: training interrupted by SIGTERM", lines[-3:]
        assert all(line.startswith("(Worker pid=1) line ") for line in lines[:-1])


@pytest.mark.parametrize("shutdown, code", [("late", 143), ("lambda: os._exit(1)", 1)])
def test_the_closing_line_is_out_before_ray_is_left_and_nothing_follows_it(shutdown, code):
    proc = subprocess.run([sys.executable, "-c", LEAVE_RAY.format(shutdown=shutdown)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "cffa train: training interrupted by SIGTERM\n")


# Ray leaves a thread behind that prints after the shutdown (seen: Ray Data's executor cancelling a task, a
# traceback ending "TypeError: No owner found for object." after the closing line of a SIGHUP)
LINGERING_THREAD = """
import argparse, sys, threading, time, types
say = lambda: (time.sleep(0.3), print("TypeError: No owner found for object.", file=sys.stderr, flush=True))
sys.modules["ray"] = types.SimpleNamespace(is_initialized=lambda: True,
                                           shutdown=lambda: threading.Thread(target=say).start())
from cffa_ray.cli import end, last_line
{exit}(last_line(argparse.Namespace(command="generate"), "generation interrupted by SIGHUP", 129))
"""


def test_a_thread_ray_leaves_behind_prints_nothing_after_the_closing_line():
    runs = {how: subprocess.run([sys.executable, "-c", LINGERING_THREAD.format(exit=how)], cwd=REPO,
                                capture_output=True, text=True, timeout=60) for how in ("end", "sys.exit")}
    assert runs["end"].returncode == 129
    assert (runs["end"].stdout, runs["end"].stderr) == ("", "cffa generate: generation interrupted by SIGHUP\n")
    # the same process left by a plain sys.exit: the thread's line comes last (what `end` is for)
    assert runs["sys.exit"].stderr.splitlines()[-1] == "TypeError: No owner found for object."
