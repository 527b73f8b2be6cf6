"""Seed system B (v25-SDXL): one SDXL UNet + one LoRA on the joint image cat([cf, fa], width).

The joint image is 3 x R x 2R (latent 4 x R/8 x R/4); CF is its left half and FA its right half,
with no resizing either way. SDXL's size conditioning sees the real, non-square size.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from cffa_ray import diffusion as D
from cffa_ray.models.base import BaseParts
from cffa_ray.models.interface import PairModel
from cffa_ray.models.lora import LORA_TARGETS, with_lora
from cffa_ray.models.vae import decode_latents, encode_images, latent_moments, sample_latents

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def sdxl_time_ids(height: int, width: int) -> torch.Tensor:
    """SDXL added time ids [1, 6]: original size, crop top-left (0, 0), target size — as (h, w) pairs."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


def joint(cf: torch.Tensor, fa: torch.Tensor) -> torch.Tensor:
    """[B, 3, R, R] x 2 -> [B, 3, R, 2R]: CF on the left, FA on the right."""
    return torch.cat([cf, fa], dim=-1)


def split(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, 2W] -> left and right halves, exactly (no resizing)."""
    w = images.shape[-1] // 2
    return images[..., :w], images[..., w:]


class JointSDXL(PairModel, design="joint_sdxl"):

    def __init__(self, parts: BaseParts, rank: int, alpha: float, *, resolution: int,
                 lora_targets: tuple[str, ...] = LORA_TARGETS, share_base: bool = True, **loss):
        super().__init__()
        if parts.pooled_prompt_embeds is None:
            raise ValueError("joint_sdxl needs an SDXL base (two text encoders)")
        self.unet = with_lora(parts.unet, rank, alpha, lora_targets)
        self._hold_base(parts, **loss)
        self.register_buffer("pooled_prompt_embeds", parts.pooled_prompt_embeds, persistent=False)
        self.register_buffer("time_ids", sdxl_time_ids(resolution, 2 * resolution), persistent=False)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x_t.shape[0]
        dtype = self.compute_dtype
        cond = {"text_embeds": self.pooled_prompt_embeds.to(dtype).expand(b, -1),
                "time_ids": self.time_ids.to(dtype).expand(b, -1)}
        out = self.unet(x_t.to(dtype), t, encoder_hidden_states=self.prompt_embeds.to(dtype).expand(b, -1, -1),
                        added_cond_kwargs=cond).sample
        return out.float()

    @classmethod
    def cache_moments(cls, vae, cf, fa):
        # the joint image is encoded whole: the VAE sees across the seam, as it does when sampling
        return {"joint_moments": latent_moments(vae, joint(cf, fa))}

    def forward(self, batch, generator=None, t=None):
        x0 = sample_latents(self.vae, self.batch_moments(batch)["joint_moments"], generator)
        ac = self._alphas_cumprod
        v = D.noised_view(x0, ac, self.offset_noise_strength, generator, self.loss_weighting, t)
        eps_hat = self._eps(v["x_t"], v["t"])
        pred_x0 = D.predict_x0(v["x_t"], eps_hat, v["t"], ac)
        out = D.modality_loss(eps_hat, v["eps"], pred_x0, x0, v["w"], self.hf_lambda)
        struct = D.structure_loss(*split(pred_x0), v["w"]) if self.struct_lambda > 0 else out["loss"].new_zeros(())
        return {"loss": out["loss"] + self.struct_lambda * struct, "mse": out["mse"], "hf": out["hf"],
                "struct": struct}

    def noise_to_state(self, noise, fa_noise="same"):
        if fa_noise not in self.FA_NOISES:  # one latent for both halves: no FA start noise of its own
            raise ValueError(f"fa_noise {fa_noise!r}: the joint model takes only {self.FA_NOISES}")
        return noise

    def encode_pair(self, cf, fa, generator=None, sample=True):
        return encode_images(self.vae, joint(cf, fa), generator, sample)

    def predict_noise(self, state, t):
        return self._eps(state, t.expand(state.shape[0]) if t.ndim == 0 else t)

    def decode(self, state):
        return split(decode_latents(self.vae, state))

    def save_extra(self, folder: Path, states: dict | None = None) -> None:
        """The LoRA in diffusers' format too: StableDiffusionXLPipeline.load_lora_weights(folder) takes it."""

        state = get_peft_model_state_dict(self.unet, state_dict=(states or {}).get("unet_lora"))
        state = {k.removeprefix("base_model.model."): v.detach().float().cpu().contiguous() for k, v in state.items()}
        config = self.unet.peft_config["default"].to_dict()
        config["target_modules"] = sorted(config["target_modules"])  # a set is not JSON
        StableDiffusionXLLoraLoaderMixin.save_lora_weights(  # what StableDiffusionXLPipeline.save_lora_weights is
            str(folder), unet_lora_layers=convert_state_dict_to_diffusers(state), weight_name=DIFFUSERS_LORA_FILE,
            unet_lora_adapter_metadata=config)
