"""A generated pair as the PNG files users look at: cf, fa, joint, cf_fa_chessboard."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

PAIR_FILES = ("cf.png", "fa.png", "joint.png", "cf_fa_chessboard.png")
CHESSBOARD_TILES = 8


def png_bytes(image: Image.Image) -> bytes:
    """The image encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    import torch  # here: the generation driver imports this module for its PNG helpers, and starts 1.4 s sooner

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grey(fa: np.ndarray) -> np.ndarray:
    """FA is greyscale: uint8 [H, W, 3] -> [H, W] (channel mean, rounded)."""
    return np.round(fa.astype(np.float32).mean(axis=-1)).astype(np.uint8)


def chessboard(cf: np.ndarray, fa: np.ndarray, tiles: int = CHESSBOARD_TILES) -> np.ndarray:
    """Checkerboard of alternating CF and FA tiles ([H, W, 3] each; tile (0, 0) is CF)."""
    h, w = cf.shape[:2]
    ys = (np.arange(h) * tiles // h)[:, None]
    xs = (np.arange(w) * tiles // w)[None, :]
    return np.where(((ys + xs) % 2 == 1)[..., None], fa, cf)


def pair_pngs(cf: np.ndarray, fa: np.ndarray) -> dict[str, bytes]:
    """uint8 [H, W, 3] CF and FA -> {file name: PNG bytes} for the four PAIR_FILES."""
    fa_grey = grey(fa)
    fa_rgb = np.repeat(fa_grey[..., None], 3, axis=-1)
    return {
        "cf.png": png_bytes(Image.fromarray(cf, "RGB")),
        "fa.png": png_bytes(Image.fromarray(fa_grey, "L")),
        "joint.png": png_bytes(Image.fromarray(np.concatenate([cf, fa_rgb], axis=1), "RGB")),
        "cf_fa_chessboard.png": png_bytes(Image.fromarray(chessboard(cf, fa_rgb), "RGB")),
    }
