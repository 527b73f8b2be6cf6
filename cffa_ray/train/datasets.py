"""The training and validation datasets the workers read: decoded once, latents cached once,
and the training pairs laid out as shuffled passes.

    records -> decode (CPU tasks; every bad file named)  -> [latent cache (VAE actors)]
            -> train: shuffled epochs, several per pass  | val: as is
Columns the workers see: the design's CACHE_COLUMNS (float16 moments) or cf, fa (uint8 pixels).
"""
from __future__ import annotations

import numpy as np
from ray.data.expressions import col

from cffa_ray.data import CF, FA, PAIR_ID
from cffa_ray.decoding import decoded_pairs
from cffa_ray.models.designs import design
from cffa_ray.train.config import TrainConfig
from cffa_ray.train.latent_cache import cache_latents

MIN_ROWS_PER_PASS = 2048  # a pass restarts a streaming split (~0.1 s): amortise it over many batches
PASS_BYTES = 512 * 2**20  # but hold at most this much of repeated pairs in the object store
SHUFFLE_BUFFER = 256  # rows mixed on each worker when the set is too large to lay out in epochs


def repeats_for(n_rows: int, row_bytes: float, min_rows: int = MIN_ROWS_PER_PASS,
                max_bytes: float = PASS_BYTES) -> int:
    """Epochs per pass: enough for min_rows, within max_bytes; at least 1."""
    wanted = -(-min_rows // max(n_rows, 1))
    affordable = int(max_bytes // max(n_rows * row_bytes, 1))
    return max(1, min(wanted, affordable))


def shuffled_epochs(table, copies: int, seed: int):
    """map_batches fn over the whole (single-block) set: `copies` epochs, each a fresh permutation.

    Yielded as new tables, so every repeat is a block of its own in the object store (Ray Data's
    block prefetcher refuses the same block reference twice in its window).
    """
    rng = np.random.default_rng(seed)
    for _ in range(copies):
        yield table.take(rng.permutation(table.num_rows))


def model_columns(model_name: str, cached: bool) -> list[str]:
    return list(design(model_name).cache_columns) if cached else [CF, FA]


def training_datasets(cfg: TrainConfig, train_records: list[dict], val_records: list[dict]):
    """(train, val, shuffle_buffer): materialised Ray Datasets; shuffle_buffer is the rows each worker
    mixes locally (0 when the passes are already shuffled epochs)."""

    by_id = {r[PAIR_ID]: r for r in train_records + val_records}
    pairs = decoded_pairs(list(by_id.values()), cfg.resolution, cfg.strict)
    if cfg.cache_latents:
        pairs = cache_latents(pairs, cfg)
    columns = model_columns(cfg.model, cfg.cache_latents)

    def subset(records):
        ids = [r[PAIR_ID] for r in records]
        return pairs.filter(expr=col(PAIR_ID).is_in(ids)).select_columns(columns).materialize()

    train, val = subset(train_records), subset(val_records)
    copies = repeats_for(len(train_records), train.size_bytes() / max(len(train_records), 1))
    if copies == 1 and train.size_bytes() > 2 * PASS_BYTES:  # too large for one task to permute
        return train.randomize_block_order(), val, SHUFFLE_BUFFER
    epochs = train.repartition(1).map_batches(shuffled_epochs, fn_kwargs={"copies": copies, "seed": cfg.seed},
                                              batch_size=None, batch_format="pyarrow")
    return epochs.materialize().randomize_block_order(seed=cfg.seed), val, 0
