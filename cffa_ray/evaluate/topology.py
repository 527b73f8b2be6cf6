"""Vessel topology: is a vessel map a tree (few loops, branches and end points) or a mesh?

SWD on 7x7 neighbourhoods and the soft Dice of a pair cannot see topology: a honeycomb of bright
lines has the right local texture and can even align with its partner. A retinal vessel tree has
(almost) no loops; a mesh has many. From the vessel maps of vessels.py (float32 [H, W] in [0, 1],
zero outside the fundus) each image gets, after a threshold and scikit-image's skeletonize:

    density         vessel pixels / fundus pixels
    loops           holes of the vessel mask: background components that touch neither the image border
                    nor the outside of the fundus, at least MIN_HOLE_FRACTION of the fundus in area (the
                    thresholding leaves 1-2 px gaps that are not loops)
    branch_points   skeleton pixels with 3 or more skeleton neighbours, per 1,000 skeleton pixels
    end_points      skeleton pixels with exactly one skeleton neighbour, per 1,000 skeleton pixels
    segment_length  mean length in pixels of the skeleton pieces between branch points

None of them depends on where the tree lies: a shifted copy scores the same (topology is not
alignment). summarise() compares a generated set with a real one per measure: mean, std and the
standardised difference (Cohen's d with the pooled std).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

VESSEL_THRESHOLD = 0.3      # of the vessel map (its 99th percentile inside the fundus is 1)
MIN_HOLE_FRACTION = 0.001   # of the fundus area: smaller holes are thresholding gaps, not loops
FAR = 2.0                   # |standardised difference| above this: flagged far from real
MEASURES = ("density", "loops", "branch_points", "end_points", "segment_length")
_EIGHT = np.ones((3, 3), bool)
_NEIGHBOURS = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], np.int32)


def vessel_mask(vessel_map: np.ndarray, threshold: float = VESSEL_THRESHOLD) -> np.ndarray:
    """bool [H, W]: the vessels of a map, without single-pixel specks."""
    mask = vessel_map > threshold
    labels, n = ndi.label(mask, structure=_EIGHT)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    return (sizes > 1)[labels] & mask


def count_loops(vessels: np.ndarray, fundus: np.ndarray) -> int:
    """Holes of the vessel mask inside the fundus (4-connected background, the dual of 8-connected vessels)."""
    labels, n = ndi.label(~vessels)
    if n == 0:
        return 0
    outside = np.unique(np.concatenate([labels[~fundus], labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    min_area = max(2, MIN_HOLE_FRACTION * fundus.sum())
    keep = sizes >= min_area
    keep[0] = False
    keep[outside] = False
    return int(keep.sum())


def image_topology(vessel_map: np.ndarray, fundus: np.ndarray | None = None,
                   threshold: float = VESSEL_THRESHOLD) -> dict[str, float]:
    """The MEASURES of one vessel map [H, W] (fundus: bool [H, W], default where the map is defined,
    i.e. the whole image); NaN for all when the fundus is empty, per-skeleton ones when there is no skeleton."""
    if fundus is None:
        fundus = np.ones(vessel_map.shape, bool)
    area = int(fundus.sum())
    if area == 0:
        return {k: float("nan") for k in MEASURES}
    vessels = vessel_mask(vessel_map, threshold) & fundus
    skeleton = skeletonize(vessels)
    n_skel = int(skeleton.sum())
    out = {"density": float(vessels.sum() / area), "loops": float(count_loops(vessels, fundus))}
    if n_skel == 0:
        return {**out, "branch_points": float("nan"), "end_points": float("nan"), "segment_length": float("nan")}
    neighbours = ndi.convolve(skeleton.astype(np.int32), _NEIGHBOURS, mode="constant") * skeleton
    branches = skeleton & (neighbours >= 3)
    ends = skeleton & (neighbours == 1)
    # segments: the skeleton with its branch points (and their 8-neighbourhood) taken out, as components
    pieces = skeleton & ~ndi.binary_dilation(branches, structure=_EIGHT)
    n_segments = max(1, ndi.label(pieces, structure=_EIGHT)[1])
    return {**out, "branch_points": float(1000.0 * branches.sum() / n_skel),
            "end_points": float(1000.0 * ends.sum() / n_skel),
            "segment_length": float(pieces.sum() / n_segments)}


def _stat(values: list[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    return (float(v.mean()), float(v.std()), len(v)) if len(v) else (float("nan"), float("nan"), 0)


def standardised_difference(generated: list[float], real: list[float]) -> float:
    """Cohen's d, (mean_g - mean_r) / pooled std; NaN when either side is empty. A zero pooled std gives
    0 for equal means, else +-inf (capped at 1e6 to stay finite)."""
    mg, sg, ng = _stat(generated)
    mr, sr, nr = _stat(real)
    if not ng or not nr:
        return float("nan")
    pooled = math.sqrt((sg ** 2 + sr ** 2) / 2)
    if pooled == 0:
        return 0.0 if mg == mr else math.copysign(1e6, mg - mr)
    return float((mg - mr) / pooled)


def summarise(generated: list[dict], real: list[dict]) -> dict:
    """Per measure {generated: {mean, std, n}, real: {...}, d}, and max_abs_d (the worst measure) with its
    name and `far` (max_abs_d > FAR). `generated`, `real`: one image_topology dict per image."""
    out: dict = {}
    for key in MEASURES:
        g, r = [t[key] for t in generated], [t[key] for t in real]
        (mg, sg, ng), (mr, sr, nr) = _stat(g), _stat(r)
        out[key] = {"generated": {"mean": mg, "std": sg, "n": ng}, "real": {"mean": mr, "std": sr, "n": nr},
                    "d": standardised_difference(g, r)}
    finite = {k: abs(v["d"]) for k, v in out.items() if math.isfinite(v["d"])}
    worst = max(finite, key=finite.get) if finite else None
    out["max_abs_d"] = finite[worst] if worst else float("nan")
    out["worst"] = worst
    out["far"] = bool(worst and finite[worst] > FAR)
    return out
