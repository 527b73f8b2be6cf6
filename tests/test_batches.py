"""cffa_ray/batches.py: Ray Data batch columns as tensors."""
import warnings

import numpy as np

from cffa_ray.batches import as_tensor


def test_a_read_only_column_is_copied_into_a_writable_tensor_without_torchs_warning():
    """A batch from another node's object store is read-only: torch would warn on the user's terminal."""
    frozen = np.arange(6, dtype=np.float32).reshape(2, 3)
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (torch warns once per process: the two checks below do not rely on it)
        t = as_tensor(frozen)
    assert t.tolist() == frozen.tolist() and t.dtype.is_floating_point
    assert t.numpy().flags.writeable and not np.shares_memory(t.numpy(), frozen)


def test_a_writable_column_is_shared_not_copied():
    pixels = np.zeros((1, 3, 2, 2), np.uint8)
    as_tensor(pixels)[0, 0, 0, 0] = 7
    assert pixels[0, 0, 0, 0] == 7
