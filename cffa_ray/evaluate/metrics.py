"""The math of the evaluation: realism (SWD; FID and KID by torch-fidelity), fidelity (SSIM, PSNR), summaries.

No Ray, no files: every function takes arrays and returns numbers, and is unit-tested on CPU.

Sliced Wasserstein distance (SWD) follows Karras et al. 2018 ("Progressive growing of GANs",
metrics/sliced_wasserstein.py): a Laplacian pyramid per image from full resolution down to 16 px,
random 7x7 neighbourhoods per image and level, descriptors normalised per channel (each set by its
own mean and std, as in the reference code), then the sliced Wasserstein-1 distance over random unit
directions, reported x 1e3. The reference needs equally many descriptors on both sides; here the two
empirical quantile functions are compared on a common grid, which is the same number for equal
counts and lets a large generated set meet a small real one.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import convolve1d
from skimage.metrics import structural_similarity

from cffa_ray import internals

NHOOD = 7                    # neighbourhood side (pixels) of an SWD descriptor
MIN_LEVEL_SIZE = 16          # the coarsest pyramid level
SWD_DIR_REPEATS, SWD_DIRS_PER_REPEAT = 4, 128
PSNR_CAP_DB = 100.0          # identical images: a finite number keeps means and JSON valid
_BINOMIAL = np.float32([1, 4, 6, 4, 1]) / 16.0  # separable 5x5 Gaussian of cv2.pyrDown


# ------------------------------------------------------------------ SWD

def pyramid_sizes(size: int) -> list[int]:
    """Level sides of the Laplacian pyramid: size, size/2, ... down to >= 16 (at least one level)."""
    sizes = [size]
    while sizes[-1] // 2 >= MIN_LEVEL_SIZE and sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes


def _blur(image: np.ndarray, gain: float = 1.0) -> np.ndarray:
    k = _BINOMIAL * gain
    return convolve1d(convolve1d(image, k, axis=0, mode="mirror"), k, axis=1, mode="mirror")


def laplacian_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """float32 [H, W, C] -> `levels` band-pass images [H/2^k, W/2^k, C]; the last is the low-pass rest."""
    pyramid = [image.astype(np.float32)]
    for _ in range(1, levels):
        down = _blur(pyramid[-1])[::2, ::2]
        up = np.zeros_like(pyramid[-1])
        up[::2, ::2] = down
        pyramid[-1] = pyramid[-1] - _blur(up, gain=2.0)  # gain 2 per axis: 4x for the zero-filled pixels
        pyramid.append(down)
    return pyramid


def swd_descriptors(image: np.ndarray, per_level: int, rng: np.random.Generator) -> np.ndarray:
    """One image's raw descriptors: float32 [levels, per_level, 7*7*C] from random neighbourhoods.

    `image` is uint8 or float [H, W, C] (C = 3 for CF, 1 for FA).
    """
    if image.ndim == 2:
        image = image[..., None]
    sizes = pyramid_sizes(image.shape[0])
    half = NHOOD // 2
    out = []
    for level in laplacian_pyramid(image, len(sizes)):
        h, w = level.shape[:2]
        ys = rng.integers(half, h - half, per_level)
        xs = rng.integers(half, w - half, per_level)
        patches = [level[y - half:y + half + 1, x - half:x + half + 1] for y, x in zip(ys, xs)]
        # channel-major like the reference: [C, 7, 7] flattened
        out.append(np.stack(patches).transpose(0, 3, 1, 2).reshape(per_level, -1))
    return np.stack(out).astype(np.float32)


def normalise_descriptors(desc: np.ndarray, channels: int) -> np.ndarray:
    """[N, C*49] descriptors of one level and set -> per-channel zero mean, unit std."""
    d = desc.astype(np.float64).reshape(len(desc), channels, -1)
    d = (d - d.mean(axis=(0, 2), keepdims=True)) / (d.std(axis=(0, 2), keepdims=True) + 1e-12)
    return d.reshape(len(desc), -1)


def _quantiles(sorted_x: np.ndarray, k: int) -> np.ndarray:
    """Empirical quantiles at (i + 0.5) / k, i < k, of each column of sorted_x [N, D] (linear between
    order statistics; for k == N exactly the sorted values)."""
    n = len(sorted_x)
    if n == k:
        return sorted_x
    pos = np.clip((np.arange(k) + 0.5) * n / k - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    w = (pos - lo)[:, None]
    return sorted_x[lo] * (1 - w) + sorted_x[hi] * w


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """W1 between the columns of a [N, D] and b [M, D] (empirical distributions), per column [D]."""
    k = max(len(a), len(b))
    qa, qb = _quantiles(np.sort(a, axis=0), k), _quantiles(np.sort(b, axis=0), k)
    return np.abs(qa - qb).mean(axis=0)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                       repeats: int = SWD_DIR_REPEATS, dirs_per_repeat: int = SWD_DIRS_PER_REPEAT) -> float:
    """Mean W1 of the projections of descriptor sets a [N, D] and b [M, D] on random unit directions."""
    results = []
    for _ in range(repeats):
        dirs = rng.standard_normal((a.shape[1], dirs_per_repeat))
        dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
        results.append(wasserstein_1d(a @ dirs, b @ dirs).mean())
    return float(np.mean(results))


def swd_per_level(desc_a: np.ndarray, desc_b: np.ndarray, channels: int, seed: int) -> list[float]:
    """SWD x 1e3 per pyramid level between two sets of raw descriptors [levels, N, D] and [levels, M, D]."""
    rng = np.random.default_rng(seed)
    return [1e3 * sliced_wasserstein(normalise_descriptors(a, channels), normalise_descriptors(b, channels), rng)
            for a, b in zip(desc_a, desc_b)]


def descriptors_per_image(n_images: int, budget: int = 32768, most: int = 128, least: int = 16) -> int:
    """Neighbourhoods per image and level: the reference's 128, fewer for large sets (memory)."""
    return int(min(most, max(least, math.ceil(budget / max(n_images, 1)))))


# ------------------------------------------------------------------ FID, KID (Inception pool features)

def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between feature sets [N, D] and [M, D]: torch-fidelity's own statistics and formula (float64).

    Clamped at 0: round-off gives -1e-12 for identical sets. Needs torch-fidelity (the [fid] extra).
    """
    import torch  # here, not at the top: the scoring tasks that import this module never need torch

    fid = internals.import_torch_fidelity("metric_fid")
    stats = [fid.fid_features_to_statistics(torch.from_numpy(f.astype(np.float64))) for f in (feats_a, feats_b)]
    return max(float(fid.fid_statistics_to_metric(*stats, verbose=False)[fid.KEY_METRIC_FID]), 0.0)


def kernel_inception_distance(feats_a: np.ndarray, feats_b: np.ndarray, seed: int, subsets: int = 100,
                              subset_size: int = 1000) -> tuple[float, float]:
    """KID (mean, std over `subsets` random subsets): torch-fidelity's unbiased MMD^2 with its cubic polynomial
    kernel, subsets drawn with `seed`. The subset size shrinks to the smaller set; NaN below 2 samples.
    Needs torch-fidelity (the [fid] extra)."""
    size = min(subset_size, len(feats_a), len(feats_b))
    if size < 2:
        return float("nan"), float("nan")
    import torch  # (see frechet_distance)

    kid = internals.import_torch_fidelity("metric_kid")
    out = kid.kid_features_to_metric(torch.from_numpy(feats_a.astype(np.float64)),
                                     torch.from_numpy(feats_b.astype(np.float64)),
                                     kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(out[kid.KEY_METRIC_KID_MEAN]), float(out[kid.KEY_METRIC_KID_STD])


# ------------------------------------------------------------------ fidelity to a source pair (from_data)

def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two uint8 images [H, W] or [H, W, C] (data range 255)."""

    channel_axis = -1 if a.ndim == 3 else None
    win = min(7, min(a.shape[:2]) // 2 * 2 - 1)  # odd, and no larger than the image
    return float(structural_similarity(a, b, data_range=255, channel_axis=channel_axis, win_size=win))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images, capped at PSNR_CAP_DB (identical images)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return PSNR_CAP_DB if mse == 0 else float(min(PSNR_CAP_DB, 10 * np.log10(255.0 ** 2 / mse)))


# ------------------------------------------------------------------ summaries

def mean_std(values) -> dict:
    """{mean, std, n} over the finite values (NaN for none)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(len(v))}


def normalised_alignment(generated: float | None, real: float | None, floor: float | None) -> float | None:
    """(generated - floor) / (real - floor): 0 = unrelated trees, 1 = as aligned as real pairs."""
    if generated is None or real is None or floor is None or real <= floor:
        return None
    return float((generated - floor) / (real - floor))
