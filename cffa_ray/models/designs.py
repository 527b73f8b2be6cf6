"""What the jobs' drivers need to know of a design without building it: its checkpoint folders, latent
cache columns, start noises and noise shape.

This module imports neither torch nor diffusers nor peft, so `cffa train` and `cffa generate` reach
Ray about 10 s sooner on 2 cores; the model classes (`DualUNet`, `JointSDXL`) take these facts
as their class attributes (`PairModel.__init_subclass__`), so each fact is written once, here.
"""
from __future__ import annotations

from dataclasses import dataclass

from cffa_ray.errors import ConfigError


@dataclass(frozen=True)
class Design:
    name: str
    adapters: tuple[str, ...]  # checkpoint sub-folders, one per LoRA adapter
    unets: tuple[str, ...]  # the attributes holding those adapters' UNets, in the same order
    cache_columns: tuple[str, ...]  # the latent cache's columns for this design
    latent_width_factor: int = 1  # latent width / height (the joint design's latent is twice as wide)
    fa_noises: tuple[str, ...] = ("same",)  # generation's --fa_noise values this design can start from
    struct_guidance: bool = False  # whether generation's --struct_guidance applies (two UNets to nudge)


DESIGNS = {d.name: d for d in (
    Design("dual_unet", adapters=("unet_cf_lora", "unet_fa_lora"), unets=("unet_cf", "unet_fa"),
           cache_columns=("cf_moments", "fa_moments"), fa_noises=("same", "negated"), struct_guidance=True),
    Design("joint_sdxl", adapters=("unet_lora",), unets=("unet",), cache_columns=("joint_moments",),
           latent_width_factor=2),
)}


def design(name: str) -> Design:
    """The facts of design `name`; a one-line ConfigError for a name no design has."""
    try:
        return DESIGNS[name]
    except KeyError:
        raise ConfigError(f"--model {name!r} is unknown; choose {' or '.join(DESIGNS)}") from None


def adapter_folders(name: str) -> tuple[str, ...] | None:
    """The LoRA sub-folders a checkpoint of design `name` holds (None: not a design we know)."""
    return DESIGNS[name].adapters if name in DESIGNS else None


def vae_scale(vae_config) -> int:
    """Pixels per latent cell (8 for SD/SDXL and the tiny presets), from the VAE's config."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def noise_shape_for(name: str, vae_config, resolution: int) -> tuple[int, ...]:
    """Shape of one pair's initial noise z0 (shared by both modalities where there are two), from the
    VAE's config alone (the generation driver loads no model)."""
    side = resolution // vae_scale(vae_config)
    return (vae_config["latent_channels"], side, side * design(name).latent_width_factor)
