"""FID/KID features: torch-fidelity's InceptionV3 (the TensorFlow-compatible FID network), loaded from
a local weights file (`--inception_weights`, e.g. pt_inception-2015-12-05-6726825d.pth), never
downloaded.

torch-fidelity is an optional extra (`pip install "cffa-ray[fid]"`): it declares torchvision, and
PyPI's torchvision needs a matching torch build. Its package `__init__` imports torchvision for the
CLIP/VGG/DINOv2 extractors, but the InceptionV3 extractor itself uses torch alone; where torchvision
is missing or cannot load beside this torch, that one module is loaded without the package
`__init__` (internals.import_torch_fidelity).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from cffa_ray import internals
from cffa_ray.errors import ConfigError

FEATURES = "2048"  # the pool features FID and KID are defined on
FEATURE_DIM = 2048
INSTALL_HINT = ('--inception_weights needs torch-fidelity: pip install "cffa-ray[fid]" (with the torchvision '
                'build that matches your torch), or pip install --no-deps "torch-fidelity>=0.3,<0.5"')


def inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3 class (ConfigError with the install line if absent)."""
    try:
        return internals.import_torch_fidelity("feature_extractor_inceptionv3").FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == internals.TORCH_FIDELITY:
            raise ConfigError(INSTALL_HINT) from None
        raise


def load_inception(weights: str):
    """The InceptionV3 feature extractor with `weights` loaded (eval mode, no grad), on CPU."""
    if not os.path.isfile(weights):
        raise ConfigError(f"--inception_weights {weights} is not a file; give the local path of the "
                          "pt_inception-2015-12-05 weights (they are never downloaded)")
    cls = inception_class()
    try:
        return cls("inception-v3-compat", [FEATURES], feature_extractor_weights_path=weights)
    except Exception as e:  # torch.load / load_state_dict raise several types for a wrong file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--inception_weights {weights} is not an InceptionV3 FID state dict "
                          f"(pt_inception-2015-12-05): {first}") from None


def as_rgb_uint8_nchw(images: np.ndarray):
    """uint8 [B, H, W] or [B, H, W, C] -> torch uint8 [B, 3, H, W] (grey replicated)."""

    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


class InceptionFeatures:
    """Ray Data actor: the network loaded once; adds pool features, drops the images.

    Input batch:  cf_u8 uint8 [B, R, R, 3], fa_u8 uint8 [B, R, R] (plus any other columns)
    Output batch: the other columns + inception_cf, inception_fa float32 [B, 2048]
    """

    def __init__(self, weights: str, use_gpu: bool, chunk: int = 16):
        torch.set_grad_enabled(False)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = load_inception(weights).to(self.device)
        self.chunk = chunk

    def features(self, images: np.ndarray) -> np.ndarray:
        x = as_rgb_uint8_nchw(images)
        out = [self.model(x[i:i + self.chunk].to(self.device))[0].float().cpu().numpy()
               for i in range(0, len(x), self.chunk)]
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k not in ("cf_u8", "fa_u8")}
        out["inception_cf"] = self.features(batch["cf_u8"])
        out["inception_fa"] = self.features(batch["fa_u8"])
        return out
