"""The one small interface both designs implement, so the Ray jobs never branch on the variant.

A model works on a *state*: the latent form of a batch of pairs whose layout only the model knows
(dual_unet: [B, 2, C, h, w], one latent per modality; joint_sdxl: [B, C, h, 2w], one joint latent).
Schedulers only ever do elementwise math on the state, so one scheduler walk serves both designs.

A training batch comes in one of two forms, and `forward` takes either:
    pixels:  cf, fa  uint8 [B, 3, R, R] (or float in [-1, 1]); the frozen VAE encodes them each step;
    cached:  the design's CACHE_COLUMNS, float16 [B, 2C, h, w'] each: the VAE posterior's mean and
             log-variance, computed once by the latent cache (`cache_moments`), sampled each step.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cffa_ray.config import DESIGN_LOSS_DEFAULTS, LOSS_DEFAULTS
from cffa_ray.models.designs import DESIGNS, noise_shape_for
from cffa_ray.models.vae import noise_schedule


class PairModel(nn.Module):
    # a design's facts (designs.Design), set by `class X(PairModel, design="name")`
    name: str = ""
    ADAPTERS: tuple[str, ...] = ()
    UNETS: tuple[str, ...] = ()
    CACHE_COLUMNS: tuple[str, ...] = ()
    FA_NOISES: tuple[str, ...] = ()
    STRUCT_GUIDANCE = False

    def __init_subclass__(cls, design: str, **kwargs):
        super().__init_subclass__(**kwargs)
        facts = DESIGNS[design]
        cls.name, cls.ADAPTERS, cls.UNETS = facts.name, facts.adapters, facts.unets
        cls.CACHE_COLUMNS, cls.FA_NOISES = facts.cache_columns, facts.fa_noises
        cls.STRUCT_GUIDANCE = facts.struct_guidance

    def _hold_base(self, parts, **loss) -> None:
        """What every design keeps of the frozen base, and its loss settings (config.LOSS_DEFAULTS' keys;
        those not given take the design's defaults, config.DESIGN_LOSS_DEFAULTS)."""

        self.vae = parts.vae
        self.register_buffer("prompt_embeds", parts.prompt_embeds, persistent=False)
        self._scheduler_config = parts.scheduler_config
        # a plain attribute, not a buffer: DeepSpeed would cast a buffer to bf16/fp16
        self._alphas_cumprod = noise_schedule(parts.scheduler_config)
        unknown = set(loss) - set(LOSS_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown loss settings: {sorted(unknown)}")
        for key, value in {**DESIGN_LOSS_DEFAULTS[self.name], **loss}.items():
            setattr(self, key, value)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the UNet weights are in (bf16/fp16 under DeepSpeed or for sampling): UNet inputs follow it."""
        return next(self.unets()[0].parameters()).dtype

    def unets(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.UNETS]

    def noise_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one pair's initial noise z0 (shared by both modalities where there are two)."""
        return noise_shape_for(self.name, self.vae.config, resolution)


    # ---- training
    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training losses for a batch (pixels or cached moments, see the module docstring);
        'loss' is the one to minimise. `t` [B] fixes the timesteps (validation), else they are drawn."""
        raise NotImplementedError

    @classmethod
    def cache_moments(cls, vae, cf: torch.Tensor, fa: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images [B, 3, R, R] -> {CACHE_COLUMNS: float32 posterior moments}: what the latent cache keeps."""
        raise NotImplementedError

    def batch_moments(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The posterior moments of a training batch: the cached columns, or the pixels encoded now."""
        if all(column in batch for column in self.CACHE_COLUMNS):
            return {column: batch[column] for column in self.CACHE_COLUMNS}
        with torch.no_grad():
            return self.cache_moments(self.vae, batch["cf"], batch["fa"])

    # ---- sampling
    def noise_to_state(self, noise: torch.Tensor, fa_noise: str = "same") -> torch.Tensor:
        """[B, *noise_shape] -> state: where both modalities start from z0 (`fa_noise`: one of FA_NOISES)."""
        raise NotImplementedError

    def encode_pair(self, cf: torch.Tensor, fa: torch.Tensor, generator: torch.Generator | None = None,
                    sample: bool = True) -> torch.Tensor:
        """Images [B, 3, R, R] in [-1, 1] -> clean state (sample=False: the VAE posterior mode)."""
        raise NotImplementedError

    def predict_noise(self, state: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_hat for a noisy state at integer timestep(s) t."""
        raise NotImplementedError

    def guide(self, state: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor, scale: float,
              target: str = "latent_edges") -> torch.Tensor:
        """eps_hat with --struct_guidance `scale` applied at alpha_bar `ab`, towards agreement on `target`
        (latent_edges: diffusion.structure_guidance; vessels: vessel_agreement.vessel_guidance)."""
        raise ValueError(f"--struct_guidance needs the two UNets of dual_unet, not {self.name}")

    def decode(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean state -> (cf, fa) images [B, 3, R, R] in [-1, 1]."""
        raise NotImplementedError

    # ---- LoRA checkpoints
    def adapters(self) -> dict[str, nn.Module]:
        """Checkpoint sub-folder name -> peft model whose adapter is saved there."""
        return dict(zip(self.ADAPTERS, self.unets()))

    def merge_lora(self) -> None:
        """Fold each LoRA into its UNet's weights and drop peft's wrappers: plain, faster UNets to sample
        with (no adapters to save afterwards). The UNets must not share base weights."""
        unets = self.unets()
        if len({u.base_model.model.conv_in.weight.data_ptr() for u in unets}) < len(unets):
            raise ValueError("merge_lora needs UNets with their own base weights (build with share_base=False)")
        for name, unet in zip(self.UNETS, unets):
            setattr(self, name, unet.merge_and_unload())

    def enable_gradient_checkpointing(self) -> None:
        """Recompute UNet activations in backward (diffusers' non-reentrant checkpointing)."""
        for peft_model in self.adapters().values():
            peft_model.base_model.model.enable_gradient_checkpointing()

    def save_extra(self, folder: Path, states: dict | None = None) -> None:
        """Extra export formats beside the peft folders (e.g. diffusers LoRA for SDXL).

        `states`: as for RunFolder.export, the LoRA weights to write instead of the module's own.
        """

    @property
    def scheduler_config(self) -> dict:
        return self._scheduler_config

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod
