"""Ray Data batch columns as torch tensors, for the actors that map over batches (the generator, the latent cache)."""
from __future__ import annotations

import numpy as np
import torch


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A batch column as a tensor, without copying where torch can share the memory.

    Args:
        array: one column of a Ray Data numpy batch. A block that came from another node's object store is
            read-only, and torch prints a "not writable" UserWarning for such arrays to the user's terminal
            (once per actor): those are copied (a batch column is small).

    Returns:
        A CPU tensor of the array's dtype and shape.
    """
    return torch.from_numpy(np.require(array, requirements="W"))
