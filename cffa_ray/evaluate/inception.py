"""FID/KID features: torch-fidelity's InceptionV3 (the TensorFlow-compatible FID network), loaded from
a local weights file (`--inception_weights`, e.g. pt_inception-2015-12-05-6726825d.pth), never
downloaded.

torch-fidelity is an optional extra (`pip install "cffa-ray[fid]"`): it declares torchvision, and
PyPI's torchvision needs a matching torch build. Its package `__init__` imports torchvision for the
CLIP/VGG/DINOv2 extractors, but the InceptionV3 extractor itself uses torch alone; where torchvision
is missing or cannot load beside this torch, that one module is loaded without the package
`__init__` (see `inception_class`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import numpy as np

from cffa_ray.config import ConfigError

FEATURES = "2048"  # the pool features FID and KID are defined on
FEATURE_DIM = 2048
INSTALL_HINT = ('--inception_weights needs torch-fidelity: pip install "cffa-ray[fid]" (with the torchvision '
                'build that matches your torch), or pip install --no-deps "torch-fidelity>=0.3,<0.5"')


def inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3 class (ConfigError with the install line if absent)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "torch_fidelity":
            raise ConfigError(INSTALL_HINT) from None
        if not (e.name or "").startswith("torchvision"):
            raise
    except RuntimeError as e:  # a torchvision built for another torch fails while registering its ops
        if "torchvision" not in str(e):
            raise
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(INSTALL_HINT)
    # A bare package object stands in for torch_fidelity's __init__ while the extractor module and the
    # two helpers it imports (torch-only) load; it is removed again so nothing else sees it.
    saved = sys.modules.get("torch_fidelity")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        if saved is None:
            sys.modules.pop("torch_fidelity", None)
        else:
            sys.modules["torch_fidelity"] = saved
    return module.FeatureExtractorInceptionV3


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
    import torch

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
        import torch

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
