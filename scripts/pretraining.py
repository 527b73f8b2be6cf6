"""What the tiny pretraining scripts share: the synthetic image set, the learning-rate schedule, the log
line, the base UNet's denoising loop (EMA kept) and the atomic write of a diffusers pipeline folder."""
from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cffa_ray.models.presets import SD_SCHEDULER  # noqa: E402
from cffa_ray.synth import make_pair  # noqa: E402

IMAGE_SEED = 917_331  # synthetic images of the pretraining set; demo, tests and benches use small seeds


def synthetic_images(count: int, size: int, seed: int = IMAGE_SEED) -> torch.Tensor:
    """`count` CF and `count` FA images, unpaired (CF of pair 2k, FA of pair 2k+1), alternating:
    float [2*count, 3, S, S] in [-1, 1]."""
    images = []
    for k in range(count):
        cf, _ = make_pair(np.random.default_rng([seed, 2 * k]), size)
        _, fa = make_pair(np.random.default_rng([seed, 2 * k + 1]), size)
        images += [np.asarray(cf), np.repeat(np.asarray(fa)[..., None], 3, axis=-1)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def flips(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips: the synthetic fundus is symmetric under both."""
    h = torch.rand(x.shape[0], generator=g) < 0.5
    v = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(h[:, None, None, None], x.flip(-1), x)
    return torch.where(v[:, None, None, None], x.flip(-2), x)


def cosine_lr(step: int, steps: int, lr: float, warmup: int = 100) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def set_cosine_lr(opt: torch.optim.Optimizer, step: int, steps: int, lr: float) -> None:
    """Every parameter group of `opt` to cosine_lr at `step`."""
    for group in opt.param_groups:
        group["lr"] = cosine_lr(step, steps, lr)


def log(stage: str, step: int, steps: int, t0: float, **values: float) -> None:
    terms = " ".join(f"{k} {v:.4f}" for k, v in values.items())
    print(f"[{stage}] step {step}/{steps} {terms} {time.time() - t0:.0f}s", flush=True)


def min_snr_weight(a: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample weight of the epsilon MSE under Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR,
    SNR = a / (1 - a). It lowers the weight of the low-noise steps (fine detail), so more of the gradient
    goes to the high-noise steps where a sample's global layout is decided. None: 1 for every sample."""
    if gamma is None:
        return torch.ones_like(a)
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / snr


def train_unet(unet, moments: torch.Tensor, scaling_factor: float, condition, steps: int, batch: int, lr: float,
               offset_noise: float, ema_decay: float, stage: str = "unet", min_snr_gamma: float | None = None):
    """Epsilon MSE on the SD noise schedule with offset noise; returns the EMA copy and a record.

    Args:
        unet: the UNet2DConditionModel to train (its initial weights already set).
        moments: VAE posterior parameters [N, 2C, h, w] of the training images.
        condition: (rows, generator) -> the UNet's keyword arguments (prompt embeddings, SDXL's added
            conditions) for the sampled rows; called right after the rows are drawn.
        min_snr_gamma: weight each sample's MSE by min_snr_weight (None: unweighted, as the shipped bases).
    Returns:
        (EMA UNet in eval mode, {"steps", "mse", "seconds"}); "mse" is unweighted.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from cffa_ray.models.vae import noise_schedule

    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    alphas = noise_schedule(SD_SCHEDULER)
    g = torch.Generator().manual_seed(2)
    t0, history = time.time(), []
    for step in range(steps):
        set_cosine_lr(opt, step, steps, lr)
        rows = torch.randint(0, len(moments), (batch,), generator=g)
        kwargs = condition(rows, g)
        x0 = DiagonalGaussianDistribution(moments[rows]).sample(g) * scaling_factor
        noise = torch.randn(x0.shape, generator=g) + offset_noise * torch.randn(
            (batch, x0.shape[1], 1, 1), generator=g)
        t = torch.randint(0, len(alphas), (batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(x_t, t, **kwargs).sample
        if min_snr_gamma is None:  # as the shipped bases were trained (the same floats on a rerun)
            loss = F.mse_loss(pred, noise)
            mse = loss.detach()
        else:
            mse = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (min_snr_weight(alphas[t], min_snr_gamma) * mse).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        history.append(mse.mean().item())
        if (step + 1) % 100 == 0 or step == 0:
            log(stage, step + 1, steps, t0, mse=float(np.mean(history[-100:])))
    mse = float(np.mean(history[-200:])) if history else None  # (0 steps: the UNet as it came)
    return ema.eval(), {"steps": steps, "mse": mse, "seconds": round(time.time() - t0)}


def save_pipeline(out: Path, pipe, record: dict) -> None:
    """Write a diffusers pipeline folder and its pretraining.json, replacing `out` only once all is written."""
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "model"
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out)
