"""Paired alignment without weights: one vessel map per image, soft Dice between a pair's two maps.

CF vessels are dark ridges in the green channel (the channel with the most vessel contrast); FA
vessels are bright ridges. Both are found with the Frangi vesselness filter, only inside the fundus
(the bright disc of the photograph), whose rim is eroded: the step from fundus to black border is a
strong ridge-like edge in both modalities and would make any two images look aligned.

Inputs are uint8 arrays: CF [H, W, 3] RGB, FA [H, W] or [H, W, 3] (grey). Maps are float32 [H, W]
in [0, 1]; masks are bool [H, W].
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import frangi

BASE_SIGMAS = (1.0, 2.0, 3.0, 4.0)  # Frangi scales in pixels at 512 px (retinal vessels: 2-15 px wide)
FUNDUS_THRESHOLD = 0.04             # of the image's 99th percentile: darker is the border outside the eye
MAP_PERCENTILE = 99.0               # vesselness is scaled so this percentile inside the mask is 1


def sigmas_for(size: int) -> tuple[float, ...]:
    """Frangi scales for an image of side `size`: the 512 px scales, grown for larger images."""
    return tuple(s * max(1.0, size / 512) for s in BASE_SIGMAS)


def rim_for(size: int) -> int:
    """Pixels eroded from the fundus rim: beyond the reach (3 sigma) of the largest Frangi scale."""
    return int(np.ceil(3 * max(sigmas_for(size)))) + 1


def grey_fa(fa: np.ndarray) -> np.ndarray:
    return fa.mean(axis=-1) if fa.ndim == 3 else fa


def fundus_mask(image: np.ndarray, rim: int) -> np.ndarray:
    """bool [H, W]: pixels inside the eye, `rim` pixels away from its border.

    `image` is a float or uint8 [H, W] brightness (CF: channel max, FA: grey).
    """
    image = image.astype(np.float32)
    top = np.percentile(image, 99)
    if top <= 0:
        return np.zeros(image.shape, bool)
    mask = ndi.binary_fill_holes(ndi.binary_opening(image > FUNDUS_THRESHOLD * top))
    # Euclidean distance to the outside (the border counts as outside): a round erosion, not a diamond
    return ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1] > rim if rim > 0 else mask


def vessel_map(channel: np.ndarray, dark_vessels: bool, mask: np.ndarray, sigmas) -> np.ndarray:
    """Frangi vesselness of one channel [H, W], zero outside `mask`, scaled to [0, 1]."""

    v = frangi(channel.astype(np.float32) / 255.0, sigmas=sigmas, black_ridges=dark_vessels)
    v = np.where(mask, v, 0.0)
    if not mask.any():
        return v.astype(np.float32)
    scale = np.percentile(v[mask], MAP_PERCENTILE)
    return np.clip(v / scale, 0.0, 1.0).astype(np.float32) if scale > 0 else np.zeros_like(v, np.float32)


def pair_masks(cf: np.ndarray, fa: np.ndarray) -> np.ndarray:
    """The region both images see: CF fundus & FA fundus, rims eroded."""
    rim = rim_for(cf.shape[0])
    return fundus_mask(cf.max(axis=-1), rim) & fundus_mask(grey_fa(fa), rim)


def cf_vessels(cf: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return vessel_map(cf[..., 1], True, mask, sigmas_for(cf.shape[0]))


def fa_vessels(fa: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return vessel_map(grey_fa(fa), False, mask, sigmas_for(fa.shape[0]))


def soft_dice(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """2 sum(ab) / (sum(a) + sum(b)) over `mask`, for maps in [0, 1]; NaN when both are empty there."""
    a, b = a[mask].astype(np.float64), b[mask].astype(np.float64)
    total = a.sum() + b.sum()
    return float(2.0 * (a * b).sum() / total) if total > 0 else float("nan")


def pair_alignment(cf: np.ndarray, fa: np.ndarray) -> float:
    """Soft Dice of the CF and FA vessel maps of one pair, inside their common fundus (NaN: no fundus)."""
    return alignments_with_floor([cf], [fa])[0][0]


def vessel_maps(cfs: list[np.ndarray], fas: list[np.ndarray]) -> tuple[list, list, list]:
    """(masks, CF maps, FA maps) of a list of pairs: each map inside its own pair's common fundus."""
    masks = [pair_masks(cf, fa) for cf, fa in zip(cfs, fas)]
    return masks, [cf_vessels(cf, m) for cf, m in zip(cfs, masks)], [fa_vessels(fa, m) for fa, m in zip(fas, masks)]


def alignments_with_floor(cfs: list[np.ndarray], fas: list[np.ndarray],
                          maps: tuple[list, list, list] | None = None) -> tuple[list[float], list[float]]:
    """(registered, mismatched) soft Dice for a list of pairs (`maps`: their vessel_maps, if made already).

    registered[i] pairs CF i with FA i; mismatched[i] pairs CF i with FA i+1 (cyclically), the score
    of two unrelated vessel trees (NaN for a single pair). Each image's vessel map is computed once,
    inside its own pair's fundus; a mismatched score is taken where both pairs see the fundus.
    """
    masks, cf_maps, fa_maps = maps or vessel_maps(cfs, fas)
    n = len(cfs)
    registered = [soft_dice(c, f, m) if m.any() else float("nan") for c, f, m in zip(cf_maps, fa_maps, masks)]
    mismatched = []
    for i in range(n):
        j = (i + 1) % n
        both = masks[i] & masks[j]
        mismatched.append(soft_dice(cf_maps[i], fa_maps[j], both) if n > 1 and both.any() else float("nan"))
    return registered, mismatched
