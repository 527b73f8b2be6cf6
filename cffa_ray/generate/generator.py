"""The Ray Data model actor: loads a checkpoint once, turns batches of pair ids into images.

Input batch (numpy):   pair_id int64 [B], seed int64 [B]
                       (from_data) src_cf, src_fa float32 [B, 3, R, R] in [-1, 1]
Output batch adds:     cf, fa uint8 [B, R, R, 3]
"""
from __future__ import annotations

import numpy as np
import torch


class PairGenerator:
    def __init__(self, checkpoint_dir: str, cfg: dict):
        from cffa_ray.io import local_copy
        from cffa_ray.models import load_for_generation

        torch.set_grad_enabled(False)
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg["use_gpu"] else "cpu")
        self.model, record = load_for_generation(local_copy(checkpoint_dir), merge=True)
        self.model.to(self.device).eval()
        self.resolution = record["resolution"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cffa_ray.images import to_uint8
        from cffa_ray.sampling import pair_noise, sample_in_fixed_batches

        cfg = self.cfg
        noise = pair_noise(self.model, self.resolution, cfg["seed"], batch["pair_id"].tolist())
        sources = None
        if cfg["mode"] == "from_data":
            sources = (torch.from_numpy(batch["src_cf"]), torch.from_numpy(batch["src_fa"]))
        cf, fa = sample_in_fixed_batches(
            self.model, noise, cfg["model_batch"], init_images=sources, steps=cfg["steps"],
            scheduler=cfg["scheduler"], strength=cfg["strength"], mixed_precision=cfg["mixed_precision"])
        out = {k: v for k, v in batch.items() if not k.startswith("src_")}
        out["cf"], out["fa"] = to_uint8(cf), to_uint8(fa)
        return out
