"""Batched pair sampling, shared by training previews, generation and the benchmarks.

Both modalities (or both halves of the joint latent) walk one scheduler together: the state holds
all of them, and a scheduler step is elementwise. Pair k's noise depends only on (seed, k), never
on the batch it lands in.
"""
from __future__ import annotations

import contextlib
import time

import diffusers
import numpy as np
import torch

from cffa_ray.images import to_uint8
from cffa_ray.models.inference import DTYPES
from cffa_ray.models.interface import PairModel
from cffa_ray.seeds import noise_for

SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler"}


def make_scheduler(name: str, scheduler_config: dict):
    cls = getattr(diffusers, SCHEDULER_CLASSES[name])
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpm++" else {}
    return cls.from_config(scheduler_config, **extra)


def pair_noise(model: PairModel, resolution: int, seed: int, pair_ids: list[int]) -> torch.Tensor:
    """noise_for the model's noise shape at `resolution`."""
    return noise_for(model.noise_shape(resolution), seed, pair_ids)


def autocast(device: torch.device, mixed_precision: str):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def gpu_autocast_dtype(model: PairModel, mixed_precision: str) -> torch.dtype | None:
    """The dtype sample_pairs autocasts to, or None: it runs without autocast where the UNets' weights
    already are in the compute dtype (prepare_for_sampling). Autocast would then only cast every norm's
    input, weight and bias up to fp32 and the result back down: ~880 of a step's ~2,300 ops at SD1.5."""
    if mixed_precision == "no" or model.compute_dtype == DTYPES[mixed_precision]:
        return None
    return DTYPES[mixed_precision]


def sampling_autocast(model: PairModel, device: torch.device, mixed_precision: str):
    """The autocast context sample_pairs denoises under (see gpu_autocast_dtype)."""
    if gpu_autocast_dtype(model, mixed_precision) is None:
        return contextlib.nullcontext()
    return autocast(device, mixed_precision)


def denoise_step(model: PairModel | None, sched, state: torch.Tensor, t: torch.Tensor, t_host: int,
                 eps: torch.Tensor | None = None, struct_guidance: float = 0.0,
                 struct_guidance_target: str = "latent_edges") -> torch.Tensor:
    """One step of the walk: the model's eps_hat at `t` (a device tensor), nudged by `struct_guidance`
    (dual_unet: the two predicted clean latents pulled towards one structure, measured on
    `struct_guidance_target`, PairModel.guide), then the
    scheduler's step at `t_host` (the same timestep as a Python int: no host sync in the scheduler).
    `eps` given: only the scheduler's step (bench/op_count.py counts the two apart)."""
    if eps is None:
        eps = model.predict_noise(sched.scale_model_input(state, t), t)
    if struct_guidance:
        eps = model.guide(state, eps.float(), sched.alphas_cumprod[t_host], struct_guidance, struct_guidance_target)
    return sched.step(eps.float(), t_host, state).prev_sample


@torch.no_grad()
def sample_pairs(model: PairModel, noise: torch.Tensor, *, steps: int, scheduler: str = "ddim",
                 init_images: tuple[torch.Tensor, torch.Tensor] | None = None, strength: float = 1.0,
                 mixed_precision: str = "no", fa_noise: str = "same",
                 struct_guidance: float = 0.0, struct_guidance_target: str = "latent_edges",
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise a batch of pairs -> (cf, fa) images [B, 3, R, R] in [-1, 1], float32 on the model's device.

    noise:      [B, *model.noise_shape] initial z0, one per pair (both modalities share it).
    fa_noise:   same | negated (dual_unet: the FA UNet starts from -z0), see GenerateConfig.fa_noise.
    struct_guidance: S >= 0 (dual_unet), see GenerateConfig.struct_guidance; 0 is the unguided walk, bit for bit.
    struct_guidance_target: latent_edges | vessels, see GenerateConfig.struct_guidance_target.
    init_images: (cf, fa) real pairs [B, 3, R, R], uint8 or in [-1, 1] (from_data mode): encoded (latent mode,
                no sampling), noised with that same z0 to `strength` (1.0 = pure noise) and
                denoised from there, as diffusers' img2img does.
    """
    device = next(model.parameters()).device
    sched = make_scheduler(scheduler, model.scheduler_config)
    sched.set_timesteps(steps, device=device)
    timesteps = sched.timesteps
    z0 = model.noise_to_state(noise.to(device), fa_noise)
    if init_images is None:
        state = z0 * sched.init_noise_sigma
    else:
        init_state = model.encode_pair(*(x.to(device) for x in init_images), sample=False)
        start = steps - min(steps, max(1, int(round(steps * strength))))
        timesteps = timesteps[start:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        state = sched.add_noise(init_state.to(device).float(), z0, timesteps[:1].repeat(z0.shape[0]))
    with sampling_autocast(model, device, mixed_precision):
        for t, t_host in zip(timesteps, timesteps.tolist()):
            state = denoise_step(model, sched, state, t, t_host, struct_guidance=struct_guidance,
                                 struct_guidance_target=struct_guidance_target)
    # Decoding runs outside autocast: the SDXL VAE overflows in fp16, and it is a few % of the cost.
    return model.decode(state)


def sample_in_fixed_batches(model: PairModel, noise: torch.Tensor, model_batch: int,
                            init_images: tuple[torch.Tensor, torch.Tensor] | None = None, as_uint8: bool = False,
                            **kwargs):
    """sample_pairs over chunks of exactly `model_batch` pairs (the last one padded with copies).

    Batched GEMM and convolution kernels pick their summation order by tensor shape, so the same
    pair denoised in batches of different sizes can differ in the last bits. With one fixed shape
    every row is computed the same way whatever its neighbours, so pair k's pixels depend only on
    (seed, k): not on --batch_size, --concurrency, or which pairs a resumed run still had to make.

    Returns (cf, fa) float32 [B, 3, R, R] in [-1, 1] on the model's device, or with `as_uint8`
    numpy uint8 [B, R, R, 3] (converted on the device, chunk by chunk: only uint8 crosses to the host).
    """

    def padded(x: torch.Tensor, start: int) -> torch.Tensor:
        chunk = x[start:start + model_batch]
        pad = model_batch - chunk.shape[0]
        return torch.cat([chunk, chunk[:1].expand(pad, *chunk.shape[1:])]) if pad else chunk

    cfs, fas = [], []
    for start in range(0, noise.shape[0], model_batch):
        n = min(model_batch, noise.shape[0] - start)
        images = None if init_images is None else tuple(padded(x, start) for x in init_images)
        cf, fa = sample_pairs(model, padded(noise, start), init_images=images, **kwargs)
        cfs.append(to_uint8(cf[:n]) if as_uint8 else cf[:n])
        fas.append(to_uint8(fa[:n]) if as_uint8 else fa[:n])
    if as_uint8:
        return np.concatenate(cfs), np.concatenate(fas)
    return torch.cat(cfs), torch.cat(fas)


def warm_up(model: PairModel, resolution: int, model_batch: int, mixed_precision: str) -> float:
    """One tiny sampling call at the real shape, so a compiled model compiles now; returns its seconds."""
    t0 = time.perf_counter()
    noise = pair_noise(model, resolution, 0, list(range(model_batch)))
    sample_pairs(model, noise, steps=2, mixed_precision=mixed_precision)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0
