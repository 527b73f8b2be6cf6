"""The diffusion math of both designs, as pure tensor functions (no Ray, no DeepSpeed, no models).

Shapes: latents are float tensors [B, C, H, W]; timesteps are int64 [B]; `alphas_cumprod` is the
scheduler's float tensor [T] (alpha_bar_t). Everything here runs on CPU in unit tests.

Decisions on the points SPEC.md leaves open (also in README "Design decisions"):

* **Structure loss compares gradient magnitude, not signed gradients.** CF vessels are dark on a
  bright fundus, FA vessels bright on dark, so signed Sobel responses have opposite signs along
  the same vessel wall. We take the Sobel magnitude summed over latent channels (the VAE spreads an
  edge over different channels for a colour and a grey image), and normalise each map by its mean
  so the loss compares *where* edges are, not how strong each modality's contrast is.
* **pred_x0 guard** (`--loss_weighting alpha_bar`): pred_x0 = (x_t - sqrt(1 - a) eps_hat) / sqrt(a)
  amplifies the noise error by sqrt((1 - a) / a), which is ~14x at t = T. The HF and structure terms
  can therefore be weighted per sample by alpha_bar_t (for the structure term: the smaller alpha_bar
  of the two modalities), so they fade out where pred_x0 is mostly noise and count fully near t = 0.
  `--loss_weighting none` is the seeds' literal form: every sample weighs 1. No clamping: clamping
  zeroes gradients exactly where the prediction is worst.
* **HF filter**: x minus its Gaussian blur (5x5, sigma 1) in latent space, compared with L1. The
  latent grid is 1/8 of the image, so a 5x5 kernel keeps the vessel-scale band; pixel space would
  need a VAE decode per step, which costs more than the UNet step itself.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from cffa_ray.config import LOSS_WEIGHTINGS

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
SOBEL_Y = SOBEL_X.t().contiguous()


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against `like`."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def offset_noise(shape: tuple[int, ...], strength: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise plus a per-(sample, channel) constant of std `strength` (offset noise)."""
    eps = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if strength > 0:
        offset = torch.randn(shape[:2], generator=generator, device=device, dtype=dtype)
        eps = eps + strength * offset.reshape(*shape[:2], *([1] * (len(shape) - 2)))
    return eps


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _per_sample(alphas_cumprod.to(like.device)[t], like)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): sqrt(a) x0 + sqrt(1 - a) eps."""
    a = alpha_bar(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def predict_x0(x_t: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Invert add_noise with the predicted noise."""
    a = alpha_bar(alphas_cumprod, t, x_t)
    return (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()


def _depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    k = kernel.to(device=x.device, dtype=x.dtype).expand(c, 1, *kernel.shape)
    pad = kernel.shape[-1] // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), k, groups=c)


def gaussian_kernel(size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def high_pass(x: torch.Tensor) -> torch.Tensor:
    """x minus its 5x5 Gaussian blur, per channel: the texture/vessel band of a latent."""
    return x - _depthwise(x, gaussian_kernel())


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel Sobel responses (d/dx along width, d/dy along height)."""
    return _depthwise(x, SOBEL_X), _depthwise(x, SOBEL_Y)


def edge_map(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Sign-free structure map [B, 1, H, W]: Sobel magnitude over all channels, mean-normalised."""
    gx, gy = sobel(x)
    mag = (gx.pow(2) + gy.pow(2)).sum(dim=1, keepdim=True).add(eps).sqrt()
    return mag / mag.mean(dim=(1, 2, 3), keepdim=True).add(eps)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def hf_loss(pred_x0: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L1 between high-pass maps, weighted per sample by `weight` [B] (alpha_bar_t)."""
    per = per_sample_mean((high_pass(pred_x0) - high_pass(x0)).abs())
    return (weight * per).mean()


def structure_disagreement(x0_cf: torch.Tensor, x0_fa: torch.Tensor) -> torch.Tensor:
    """Per pair, the mean L1 between the sign-free edge maps of two clean latents: the structure term of
    training (`structure_loss`) and of sampling-time guidance (`structure_guidance`).

    Args:
        x0_cf, x0_fa: clean (or predicted clean) latents [B, C, H, W].
    Returns:
        [B]: 0 where both latents have their edges in the same places.
    """
    return per_sample_mean((edge_map(x0_cf) - edge_map(x0_fa)).abs())


def structure_loss(pred_x0_cf: torch.Tensor, pred_x0_fa: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L1 between the sign-free edge maps of the two predicted clean latents, weighted per sample."""
    return (weight * structure_disagreement(pred_x0_cf, pred_x0_fa)).mean()


def guided_eps(x_t_cf: torch.Tensor, x_t_fa: torch.Tensor, eps_cf: torch.Tensor, eps_fa: torch.Tensor,
               ab: torch.Tensor, scale: float,
               pair_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-modal guidance of one sampling step: both eps predictions moved so that the step's clean
    latents agree more, as classifier guidance moves eps along a classifier's gradient.

    g = grad over x_t of  ab * pair_loss(x0_cf, x0_fa),  x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab),
    summed over pairs (a pair's gradient is its own), with eps held constant: no gradient through the
    UNets, only through the x0 formula and whatever `pair_loss` computes. Each modality then gets
    eps + scale * sqrt(1 - ab) * g, so a DDIM step's clean latent moves by -scale * (1 - ab) * grad over
    x0: fully at large t, fading to 0 at t = 0.

    Args:
        x_t_cf, x_t_fa: the noisy latents of the step [B, C, H, W].
        eps_cf, eps_fa: the UNets' eps predictions for them [B, C, H, W].
        ab: alpha_bar of the step's timestep, a scalar or [B] tensor.
        scale: the guidance strength S (>= 0; 0 returns the eps unchanged).
        pair_loss: (x0_cf, x0_fa) -> [B], the disagreement of each pair (lower = more alike).
    Returns:
        The guided (eps_cf, eps_fa), float32.
    """
    if scale == 0:
        return eps_cf, eps_fa
    with torch.enable_grad(), torch.autocast(x_t_cf.device.type, enabled=False):
        x_t = [x.detach().float().requires_grad_(True) for x in (x_t_cf, x_t_fa)]
        eps = [e.detach().float() for e in (eps_cf, eps_fa)]
        a = ab.float().to(x_t[0].device).reshape(-1, *([1] * (x_t[0].ndim - 1)))
        x0 = [(x - (1 - a).sqrt() * e) / a.sqrt() for x, e in zip(x_t, eps)]
        grads = torch.autograd.grad((a.flatten() * pair_loss(*x0)).sum(), x_t)
    return tuple(e + scale * (1 - a).sqrt() * g for e, g in zip(eps, grads))


def structure_guidance(x_t_cf: torch.Tensor, x_t_fa: torch.Tensor, eps_cf: torch.Tensor, eps_fa: torch.Tensor,
                       ab: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """guided_eps towards the training structure term (`--struct_guidance_target latent_edges`): per pair,
    structure_disagreement summed over the latent's cells (so a cell's gradient does not shrink with the
    latent's size), with the term's alpha_bar weight. The gradient then costs a few 3x3 convolutions, not
    a backward pass through both UNets. Args and Returns as guided_eps."""

    def summed_over_cells(x0_cf: torch.Tensor, x0_fa: torch.Tensor) -> torch.Tensor:
        return x0_cf.shape[-2] * x0_cf.shape[-1] * structure_disagreement(x0_cf, x0_fa)

    return guided_eps(x_t_cf, x_t_fa, eps_cf, eps_fa, ab, scale, summed_over_cells)


def modality_loss(eps_hat: torch.Tensor, eps: torch.Tensor, pred_x0: torch.Tensor, x0: torch.Tensor,
                  weight: torch.Tensor, hf_lambda: float) -> dict[str, torch.Tensor]:
    """L_m = MSE(eps_hat, eps) + hf_lambda * HF(pred_x0, x0); `weight` [B] weighs HF per sample."""
    mse = F.mse_loss(eps_hat.float(), eps.float())
    hf = hf_loss(pred_x0.float(), x0.float(), weight.float())
    return {"loss": mse + hf_lambda * hf, "mse": mse, "hf": hf}


def dual_loss(cf: dict[str, torch.Tensor], fa: dict[str, torch.Tensor], hf_lambda: float,
              struct_lambda: float) -> dict[str, torch.Tensor]:
    """L_total = L_cf + L_fa + struct_lambda * L_struct.

    `cf` and `fa` each hold eps_hat, eps, x_t (unused), x0, pred_x0 and the pred_x0 terms' weight `w` [B].
    """
    l_cf = modality_loss(cf["eps_hat"], cf["eps"], cf["pred_x0"], cf["x0"], cf["w"], hf_lambda)
    l_fa = modality_loss(fa["eps_hat"], fa["eps"], fa["pred_x0"], fa["x0"], fa["w"], hf_lambda)
    w = torch.minimum(cf["w"], fa["w"]).float()
    l_struct = structure_loss(cf["pred_x0"].float(), fa["pred_x0"].float(), w)
    total = l_cf["loss"] + l_fa["loss"] + struct_lambda * l_struct
    return {
        "loss": total, "loss_cf": l_cf["loss"], "loss_fa": l_fa["loss"], "struct": l_struct,
        "mse_cf": l_cf["mse"], "mse_fa": l_fa["mse"], "hf_cf": l_cf["hf"], "hf_fa": l_fa["hf"],
    }


def timestep_grid(count: int, num_train_timesteps: int) -> list[int]:
    """`count` timesteps spread evenly over the schedule, centred in their bins (validation)."""
    return [int((i + 0.5) * num_train_timesteps / count) for i in range(count)]


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device)


def x0_term_weight(ab: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weight [B] of the terms on pred_x0 (HF, structure): alpha_bar_t, or 1 (the seeds')."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting {weighting!r}; choose one of {LOSS_WEIGHTINGS}")
    return ab if weighting == "alpha_bar" else torch.ones_like(ab)


def noised_view(x0: torch.Tensor, alphas_cumprod: torch.Tensor, offset_strength: float,
                generator: torch.Generator | None = None, weighting: str = "alpha_bar",
                t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Fresh noise and timesteps (or the given ones, [B] int64) for one modality: {x0, eps, t, x_t, ab, w}
    (w: x0_term_weight)."""
    eps = offset_noise(tuple(x0.shape), offset_strength, generator, x0.device, x0.dtype)
    if t is None:
        t = sample_timesteps(x0.shape[0], alphas_cumprod.shape[0], generator, x0.device)
    ab = alphas_cumprod.to(x0.device)[t].float()
    return {"x0": x0, "eps": eps, "t": t, "x_t": add_noise(x0, eps, t, alphas_cumprod), "ab": ab,
            "w": x0_term_weight(ab, weighting)}
