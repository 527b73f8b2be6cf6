"""Synthetic registered CF/FA pairs: one random vessel tree drawn into both modalities.

CF: dark red vessels on an orange-red fundus disc with a bright optic disc, black outside.
FA: greyscale, bright vessels on a dark fundus, bright disc, a few leakage spots.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cffa_ray.errors import ConfigError
from cffa_ray.images import png_bytes
from cffa_ray.io import atomic_write_bytes


def _vessel_tree(rng: np.random.Generator, size: int, disc: tuple[float, float]) -> Image.Image:
    """A greyscale mask (255 = vessel) of branching vessels growing out of the optic disc."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    roots = int(rng.integers(4, 7))
    start = rng.uniform(0, 2 * math.pi)
    stack = [(disc[0], disc[1], start + 2 * math.pi * i / roots + rng.normal(0, 0.2), size * 0.014 + 1.5, 0)
             for i in range(roots)]
    while stack:
        x, y, angle, width, depth = stack.pop()
        length = size * rng.uniform(0.08, 0.16)
        for _ in range(int(rng.integers(4, 8))):
            angle += rng.normal(0, 0.35)
            nx, ny = x + length * math.cos(angle), y + length * math.sin(angle)
            draw.line([(x, y), (nx, ny)], fill=255, width=max(1, int(round(width))))
            x, y = nx, ny
            width = max(1.0, width * 0.93)
            if depth < 3 and rng.random() < 0.5:
                stack.append((x, y, angle + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0), width * 0.7, depth + 1))
            if not (0 <= x < size and 0 <= y < size):
                break
    return mask.filter(ImageFilter.GaussianBlur(radius=max(0.5, size / 512)))


def make_pair(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    """One registered pair: (CF as RGB, FA as L), both size x size."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    r = np.hypot(xx - 0.5, yy - 0.5)
    fundus = (r < 0.47).astype(np.float32)
    disc = (rng.uniform(0.3, 0.4) if rng.random() < 0.5 else rng.uniform(0.6, 0.7), rng.uniform(0.42, 0.58))
    disc_r = np.hypot(xx - disc[0], yy - disc[1])
    disc_glow = np.clip(1.0 - disc_r / 0.09, 0, 1) ** 0.8
    vessels = np.asarray(_vessel_tree(rng, size, (disc[0] * size, disc[1] * size)), np.float32) / 255.0
    vignette = np.clip(1.0 - 1.2 * r, 0.2, 1.0)

    base = np.array([rng.uniform(0.75, 0.9), rng.uniform(0.3, 0.42), rng.uniform(0.08, 0.15)], np.float32)
    cf = base[None, None, :] * vignette[..., None]
    cf = cf * (1 - 0.55 * vessels[..., None]) + disc_glow[..., None] * np.array([0.45, 0.55, 0.35], np.float32)
    cf = np.clip(cf * fundus[..., None], 0, 1)

    fa = 0.18 * vignette + 0.75 * vessels + 0.6 * disc_glow
    for _ in range(int(rng.integers(0, 4))):  # leakage spots
        c = rng.uniform(0.25, 0.75, 2)
        fa += 0.5 * np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * rng.uniform(0.005, 0.015) ** 2))
    fa = np.clip(fa * fundus, 0, 1)
    return (Image.fromarray((cf * 255).astype(np.uint8), "RGB"),
            Image.fromarray((fa * 255).astype(np.uint8), "L"))


def write_synthetic_pairs(out: str | Path, pairs: int, size: int = 512, seed: int = 0) -> list[str]:
    """Write out/cf/<stem>.png and out/fa/<stem>.png; returns the stems. Pair k depends on (seed, k)."""
    if pairs <= 0:
        raise ConfigError(f"--pairs {pairs} must be > 0")
    if size < 16:
        raise ConfigError(f"--size {size} must be >= 16")
    out = Path(out)
    stems = [f"synth_{k:05d}" for k in range(pairs)]
    for k, stem in enumerate(stems):
        cf, fa = make_pair(np.random.default_rng([seed, k]), size)
        atomic_write_bytes(out / "cf" / f"{stem}.png", png_bytes(cf))
        atomic_write_bytes(out / "fa" / f"{stem}.png", png_bytes(fa))
    return stems
