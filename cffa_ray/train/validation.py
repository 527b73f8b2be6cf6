"""What the workers measure besides training: the validation losses (which pick best_checkpoint)
and the preview pairs of step_XXXXXX_random_pairs/.

Every rank runs both (with ZeRO-3 the weights are sharded, so a forward pass needs all ranks);
validation results are averaged across ranks so that every rank takes the same decisions.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from cffa_ray.diffusion import timestep_grid
from cffa_ray.images import to_uint8
from cffa_ray.sampling import pair_noise, sample_pairs
from cffa_ray.train.config import TrainConfig

VAL_TIMESTEPS = 8  # every validation pair is scored at this many timesteps spread over the schedule
PREVIEW_BATCH = 8  # preview pairs per sampling call


@torch.no_grad()
def validate(engine, val_batches: list[dict], cfg: TrainConfig, device) -> dict[str, float]:
    """Mean losses over the whole validation set, each pair at a fixed grid of timesteps and with
    fixed noise, so steps compare fairly and one unlucky draw of t cannot pick best_checkpoint.

    Every rank runs every batch (ZeRO-3 needs all ranks in each forward), then the results are
    averaged across ranks, so all ranks hold the very same numbers and take the same decisions
    (GPUs of different types would otherwise differ in the last bits and disagree on "best").

    Returns:
        {loss term: mean value}, the same keys as the model's forward.
    """
    engine.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    totals: dict[str, torch.Tensor] = {}
    count = 0
    grid = timestep_grid(VAL_TIMESTEPS, len(engine.module.alphas_cumprod))
    for batch in val_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = next(iter(batch.values())).shape[0]
        for t in grid:
            out = engine.module(batch, generator=gen, t=torch.full((n,), t, dtype=torch.long, device=device))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v.detach().double() * n
            count += n
    engine.train()
    keys = sorted(totals)
    stacked = torch.stack([totals[k] for k in keys]).to(device) / max(count, 1)  # NCCL reduces on the GPU
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.cpu().tolist()))


@torch.no_grad()
def sample_previews(model, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """The --num_sample_pairs preview pairs, the same z0 every time.

    Returns:
        (cf, fa) uint8 [N, H, W, 3] each.
    """
    model.eval()
    cfs, fas = [], []
    ids = list(range(cfg.num_sample_pairs))
    for start in range(0, len(ids), PREVIEW_BATCH):
        noise = pair_noise(model, cfg.resolution, cfg.seed, ids[start:start + PREVIEW_BATCH])
        cf, fa = sample_pairs(model, noise, steps=cfg.sample_steps, mixed_precision="no")
        cfs.append(to_uint8(cf))
        fas.append(to_uint8(fa))
    model.train()
    return np.concatenate(cfs), np.concatenate(fas)
