"""The frozen VAE: images <-> scaled latents, the posterior's moments (what the latent cache holds),
and the base's noise schedule."""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, R, R] (the compact form on the wire) or float in [-1, 1] -> float32 in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images.float()


def latent_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, R, R] (uint8, or float in [-1, 1]) -> the VAE posterior's parameters, float32
    [B, 2C, R/8, R/8]: mean and log-variance stacked on the channel axis, as diffusers keeps them."""
    dtype = next(vae.parameters()).dtype
    return vae.encode(to_unit_range(images).to(dtype)).latent_dist.parameters.float()


def sample_latents(vae, moments: torch.Tensor, generator: torch.Generator | None = None,
                   sample: bool = True) -> torch.Tensor:
    """Posterior moments [B, 2C, h, w] -> float32 latents [B, C, h, w], scaled as the UNet expects.

    sample=True draws latent_dist.sample() (training); False takes the mode (deterministic). The
    draw is float32 whatever the moments' dtype, so cached fp16 moments and freshly encoded ones
    consume the same random numbers from `generator`.
    """

    dist = DiagonalGaussianDistribution(moments.float())
    latents = dist.sample(generator) if sample else dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def encode_images(vae, images: torch.Tensor, generator: torch.Generator | None = None,
                  sample: bool = True) -> torch.Tensor:
    """[B, 3, R, R] (uint8, or float in [-1, 1]) -> float32 latents [B, C, R/8, R/8], scaled."""
    return sample_latents(vae, latent_moments(vae, images), generator, sample)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images [B, 3, R, R] in [-1, 1], float32 (the VAE runs in its own dtype)."""
    dtype = next(vae.parameters()).dtype
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(dtype)).sample
    return images.float().clamp(-1, 1)


def noise_schedule(scheduler_config: dict) -> torch.Tensor:
    """alpha_bar_t [T] (float32) of the base's training scheduler."""

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.float().clone()
