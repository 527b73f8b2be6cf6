"""Each pair's starting noise z0: a pure function of (seed, pair id), never of the batch, actor or node
that samples it. Light on purpose: the generation driver names the noise stage that uses it, and imports
torch only where it runs (see noise_for)."""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def pair_seed(seed: int, pair_id: int) -> int:
    """A 63-bit seed for pair `pair_id`, a pure function of (seed, pair_id)."""

    digest = hashlib.sha256(f"cffa:{seed}:{pair_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noise_for(shape: tuple[int, ...], seed: int, pair_ids) -> torch.Tensor:
    """[B, *shape] float32 on CPU: row i is pair_ids[i]'s z0, a pure function of (seed, pair id)."""
    import torch  # here, in the noise stage's processes: the driver starts 1.4 s sooner without it

    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(pair_seed(seed, int(k))))
                        for k in pair_ids])
