"""The frozen VAE: images <-> scaled latents, and the base's noise schedule."""
from __future__ import annotations

import torch


def vae_scale(vae) -> int:
    """Pixels per latent cell (8 for SD/SDXL and the tiny presets)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_images(vae, images: torch.Tensor, generator: torch.Generator | None = None,
                  sample: bool = True) -> torch.Tensor:
    """[B, 3, R, R] in [-1, 1] -> float32 latents [B, C, R/8, R/8], scaled as the UNet expects.

    sample=False takes the posterior mode (deterministic; used when generating from real pairs).
    """
    dtype = next(vae.parameters()).dtype
    dist = vae.encode(images.to(dtype)).latent_dist
    latents = (dist.sample(generator) if sample else dist.mode()).float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images [B, 3, R, R] in [-1, 1]."""
    dtype = next(vae.parameters()).dtype
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(dtype)).sample
    return images.float().clamp(-1, 1)


def noise_schedule(scheduler_config: dict) -> torch.Tensor:
    """alpha_bar_t [T] (float32) of the base's training scheduler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.float().clone()
