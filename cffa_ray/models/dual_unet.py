"""Seed system A (v27): two UNets, one LoRA each, trained decoupled, sampled from one shared z0."""
from __future__ import annotations

import torch

from cffa_ray import diffusion as D
from cffa_ray.models.base import BaseParts
from cffa_ray.models.interface import PairModel
from cffa_ray.models.lora import LORA_TARGETS, twin, with_lora
from cffa_ray.models.paired import is_zero3_partitioned, paired_merged, paired_view
from cffa_ray.models.vae import decode_latents, encode_images, latent_moments, sample_latents
from cffa_ray.vessel_agreement import vessel_guidance


class DualUNet(PairModel, design="dual_unet"):
    SAMPLING_UNETS = ("unet_pair",)  # after merge_lora

    def __init__(self, parts: BaseParts, rank: int, alpha: float, *, resolution: int,
                 lora_targets: tuple[str, ...] = LORA_TARGETS, share_base: bool = True, **loss):
        super().__init__()
        unet_fa = twin(parts.unet, share_base)
        # both halves of a training batch in one forward over the shared base (models/paired.py)
        pair_base = twin(parts.unet, True) if share_base else None
        self.unet_cf = with_lora(parts.unet, rank, alpha, lora_targets)
        self.unet_fa = with_lora(unet_fa, rank, alpha, lora_targets)
        self.unet_pair = paired_view(pair_base, self.unet_cf, self.unet_fa) if share_base else None
        self.batched = share_base  # False: the two UNets run apart (tests compare the two forms)
        self._hold_base(parts, **loss)

    def _unet_eps(self, unet, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_hat in float32; the UNet itself runs in its own dtype (bf16/fp16 under DeepSpeed)."""
        dtype = self.compute_dtype
        context = self.prompt_embeds.to(dtype).expand(x_t.shape[0], -1, -1)
        return unet(x_t.to(dtype), t, encoder_hidden_states=context).sample.float()

    @classmethod
    def cache_moments(cls, vae, cf, fa):
        moments = latent_moments(vae, torch.cat([cf, fa]))
        return dict(zip(cls.CACHE_COLUMNS, moments.chunk(2)))

    def forward(self, batch, generator=None, t=None):
        moments = self.batch_moments(batch)
        b = moments["cf_moments"].shape[0]
        # one draw for both modalities, in the order the pixel path has always used (cf rows, then fa)
        x0 = sample_latents(self.vae, torch.cat([moments["cf_moments"], moments["fa_moments"]]), generator)
        ac = self._alphas_cumprod
        # Decoupled: each modality draws its own noise and its own timesteps (cf first, then fa).
        views = {key: D.noised_view(x0_m, ac, self.offset_noise_strength, generator, self.loss_weighting, t)
                 for key, x0_m in (("cf", x0[:b]), ("fa", x0[b:]))}
        if self.batched and not is_zero3_partitioned(self.unet_pair):
            eps = self._unet_eps(self.unet_pair, torch.cat([views["cf"]["x_t"], views["fa"]["x_t"]]),
                                 torch.cat([views["cf"]["t"], views["fa"]["t"]])).chunk(2)
        else:
            eps = [self._unet_eps(unet, views[key]["x_t"], views[key]["t"])
                   for key, unet in (("cf", self.unet_cf), ("fa", self.unet_fa))]
        for v, eps_hat in zip(views.values(), eps):
            v["eps_hat"] = eps_hat
            v["pred_x0"] = D.predict_x0(v["x_t"].float(), eps_hat, v["t"], ac)
        return D.dual_loss(views["cf"], views["fa"], self.hf_lambda, self.struct_lambda)

    def enable_gradient_checkpointing(self) -> None:
        super().enable_gradient_checkpointing()
        if self.unet_pair is not None:
            self.unet_pair.enable_gradient_checkpointing()

    def noise_to_state(self, noise, fa_noise="same"):
        # negated: the FA UNet starts from -z0. CF vessels are dark and FA vessels bright, and from one z0
        # the two UNets draw vessel trees that avoid each other; from z0 and -z0 they overlap (BENCHMARKS.md)
        if fa_noise not in self.FA_NOISES:
            raise ValueError(f"fa_noise {fa_noise!r}: one of {self.FA_NOISES}")
        return torch.stack([noise, noise if fa_noise == "same" else -noise], dim=1)

    def encode_pair(self, cf, fa, generator=None, sample=True):
        x0 = encode_images(self.vae, torch.cat([cf, fa]), generator, sample)
        return torch.stack(x0.chunk(2), dim=1)

    def predict_noise(self, state, t):
        t = t.expand(state.shape[0]) if t.ndim == 0 else t
        if self.UNETS == self.SAMPLING_UNETS:  # merged: both modalities in one call (merge_lora)
            eps = self._unet_eps(self.unet_pair, torch.cat([state[:, 0], state[:, 1]]), torch.cat([t, t]))
            return torch.stack(eps.chunk(2), dim=1)
        return torch.stack([self._unet_eps(self.unet_cf, state[:, 0], t),
                            self._unet_eps(self.unet_fa, state[:, 1], t)], dim=1)

    def guide(self, state, eps, ab, scale, target="latent_edges"):
        halves = (state[:, 0], state[:, 1], eps[:, 0], eps[:, 1], ab, scale)
        if target == "vessels":
            guided = vessel_guidance(*halves, decode=lambda latents: decode_latents(self.vae, latents))
        elif target == "latent_edges":
            guided = D.structure_guidance(*halves)
        else:
            raise ValueError(f"struct guidance target {target!r}: latent_edges or vessels")
        return torch.stack(guided, dim=1)

    def merge_lora(self) -> None:
        """Both LoRAs folded into per-half weights of one plain UNet (models/paired.py): a sampling step
        runs both modalities in one batched call over one copy of the base weights, instead of two UNets
        with two copies. Afterwards `unets()` is that one UNet, and there are no adapters to save."""
        self.unet_pair = paired_merged(self.unet_cf, self.unet_fa)
        del self.unet_cf, self.unet_fa
        self.UNETS = self.SAMPLING_UNETS

    def decode(self, state):
        images = decode_latents(self.vae, torch.cat([state[:, 0], state[:, 1]]))
        return tuple(images.chunk(2))
