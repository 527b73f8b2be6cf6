"""The noise filter of the forwarded Ray output (cffa_ray/quiet.py): Ray's routine lines go, errors stay."""
import pytest

from cffa_ray.quiet import is_noise

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
