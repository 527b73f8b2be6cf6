"""The CPU stages of the generation job that feed the model actors (Ray Data map_batches fns).

Rows start as {pair_id int64, seed int64} (+ for from_data: source_pair_id, src_cf_path, src_fa_path).
`add_noise` adds noise float32 [B, *noise_shape]; `load_sources` replaces the paths with
src_cf, src_fa uint8 [B, 3, R, R]. Doing this here keeps it off the GPU actors' critical path.
"""
from __future__ import annotations

import numpy as np

from cffa_ray.data import CF_PATH, FA_PATH, PAIR_ID
from cffa_ray.decoding import channels_first, load_image
from cffa_ray.seeds import noise_for, pair_seed


def pair_rows(seed: int, todo: list[int], sources: list[dict] | None) -> list[dict]:
    """The rows that flow through Ray Data: pair id, seed, and (from_data) the real pair it starts from."""
    rows = []
    for k in todo:
        row = {"pair_id": k, "seed": pair_seed(seed, k)}
        if sources:
            src = sources[k % len(sources)]
            row.update(source_pair_id=src[PAIR_ID], src_cf_path=src[CF_PATH], src_fa_path=src[FA_PATH])
        rows.append(row)
    return rows


def add_noise(batch: dict[str, np.ndarray], seed: int, noise_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Each pair's z0, a pure function of (seed, pair_id): float32 [B, *noise_shape]."""
    return {**batch, "noise": noise_for(tuple(noise_shape), seed, batch["pair_id"].tolist()).numpy()}


def load_sources(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """from_data: decode each row's real pair -> src_cf, src_fa uint8 [B, 3, R, R]."""
    out = {k: v for k, v in batch.items() if k not in ("src_cf_path", "src_fa_path")}
    for column, paths, mode in (("src_cf", batch["src_cf_path"], "RGB"), ("src_fa", batch["src_fa_path"], "L")):
        out[column] = channels_first(np.stack([load_image(p, resolution, mode) for p in paths]))
    return out
