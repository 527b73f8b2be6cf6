"""Memorisation: is a generated image closer to a training image than a held-out real image is?

Similarity is the cosine of a fixed embedding, not SSIM: every generated image meets every training
image, and N x M SSIMs (each a set of windowed filters) cost seconds per thousand pairs where one
matrix product of embeddings costs milliseconds; the embedding keeps what identifies an image (its
vessel tree and disc) and drops what every image shares. Per image (a THUMB_SIZE thumbnail, uint8
CF [S, S, 3] or FA [S, S]):

    1. a band-pass, Gaussian blur (sigma EMBED_SIGMAS[0] px) minus Gaussian blur (EMBED_SIGMAS[1] px):
       the fundus disc, the vignette and the overall brightness, the same in every image of a set, are
       gone; vessels and the optic disc remain, a little widened, so that a copy moved by a pixel or
       two still reads as a copy (measured on synthetic pairs at 64 px: a copy shifted by 1 px scores
       >= 0.85, by 2 px >= 0.5, against a held-out 99th percentile of 0.62 for CF and 0.39 for FA)
    2. zero outside the fundus (its rim eroded: the disc's edge is in every image too)
    3. zero mean, unit L2 norm: the cosine of two embeddings is their Pearson correlation

The reference is the held-out real set: the nearest-training-image similarity of each held-out image
says how close a new image of the same distribution comes to the training set by chance. A generated
image above the held-out 99th percentile is flagged as a possible copy.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from cffa_ray.evaluate.vessels import fundus_mask, grey_fa

EMBED_SIGMAS = (1.5, 4.0)  # px at THUMB_SIZE: the band-pass of step 1
EMBED_RIM = 3              # px eroded from the fundus rim
PERCENTILE = 99.0          # of the held-out similarities: the threshold of a flagged generated image
CLOSEST = 10               # closest generated-training pairs listed in evaluation.json


def embed(image: np.ndarray) -> np.ndarray:
    """One thumbnail (uint8 [S, S, 3] or [S, S]) -> float32 [S*S*C] of unit norm (zeros for a blank image)."""
    x = image.astype(np.float32)
    if x.ndim == 2:
        x = x[..., None]
    brightness = x.max(axis=-1) if x.shape[-1] == 3 else grey_fa(x)
    mask = fundus_mask(brightness, EMBED_RIM)
    low, high_cut = EMBED_SIGMAS
    high = ndi.gaussian_filter(x, sigma=(low, low, 0)) - ndi.gaussian_filter(x, sigma=(high_cut, high_cut, 0))
    high = np.where(mask[..., None], high, 0.0)
    inside = high[mask] if mask.any() else high.reshape(-1, high.shape[-1])
    high = np.where(mask[..., None], high - inside.mean(axis=0), 0.0).ravel()
    norm = np.linalg.norm(high)
    return (high / norm).astype(np.float32) if norm > 0 else np.zeros(high.size, np.float32)


def embed_all(images) -> np.ndarray:
    """float32 [N, D] embeddings of a stack or list of thumbnails."""
    return np.stack([embed(im) for im in images]) if len(images) else np.zeros((0, 1), np.float32)


def nearest(queries: np.ndarray, train: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(cosine [N], index [N]) of each query embedding's nearest training embedding [M, D]: one matrix
    product per `chunk` queries."""
    sims, idx = np.zeros(len(queries), np.float32), np.zeros(len(queries), np.int64)
    for s in range(0, len(queries), chunk):
        block = queries[s:s + chunk] @ train.T
        idx[s:s + chunk] = block.argmax(axis=1)
        sims[s:s + chunk] = block[np.arange(len(block)), idx[s:s + chunk]]
    return sims, idx


def _dist(v: np.ndarray) -> dict:
    if not len(v):
        return {"mean": None, "std": None, "min": None, "median": None, "p99": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "median": float(np.median(v)),
            "p99": float(np.percentile(v, PERCENTILE)), "max": float(v.max()), "n": int(len(v))}


def compare(generated: np.ndarray, held_out: np.ndarray, train: np.ndarray) -> dict:
    """Nearest-training similarities of generated [N, D] and held-out [K, D] embeddings against train [M, D].

    Returns {generated: distribution, held_out: distribution, threshold (held-out 99th percentile),
    fraction_above (of generated), generated_sims [N], generated_nn [N] (train indices),
    held_out_sims [K], held_out_nn [K]}.
    """
    g_sims, g_nn = nearest(generated, train)
    h_sims, h_nn = nearest(held_out, train)
    threshold = float(np.percentile(h_sims, PERCENTILE)) if len(h_sims) else math.nan
    above = float((g_sims > threshold).mean()) if len(g_sims) and math.isfinite(threshold) else math.nan
    return {"generated": _dist(g_sims), "held_out": _dist(h_sims), "threshold": threshold, "fraction_above": above,
            "generated_sims": g_sims, "generated_nn": g_nn, "held_out_sims": h_sims, "held_out_nn": h_nn}
