"""Pre-train the `tiny-retina` preset: a small VAE and base UNet that know what synthetic retinas look like.

The `tiny` preset's random VAE can never show anything, so nothing trained on it can be looked at.
This script trains, on CPU, on synthetic CF and FA images (unpaired: CF from even-numbered synthetic
pairs, FA from odd ones, both modalities mixed in every batch):

  1. the VAE (AutoencoderKL, 64 px -> 4x16x16 latents): L1 + Sobel-gradient L1 reconstruction and a
     small KL term; its scaling_factor is then set to 1 / std of the latents, as SD's was;
  2. the base UNet on both modalities' latents: epsilon MSE on the SD noise schedule with offset noise,
     EMA weights kept. Half the samples get the fixed empty prompt, the one the product uses, so the
     base makes fundus photographs *and* angiograms from it, as SD1.5 makes any image; the other half
     get the prompt "cf" or "fa", which puts a modality switch inside the cross-attention that the
     dual UNet's LoRA (on to_q, to_k, to_v) can reach in a few dozen steps.

and writes a diffusers StableDiffusionPipeline folder (fp16 safetensors; the `tiny` preset's text
encoder, a tiny offline CLIP tokenizer) to cffa_ray/models/weights/tiny-retina/, which `--preset
tiny-retina` loads (or `--base_model <that folder>`). Everything is seeded: a rerun on the same torch
build and thread count writes the same weights.

The committed weights (2026-12-08) were made in four stages, each reading the one before, on a
2-core CPU (3,754 s in all, partly shared with other jobs):

    python scripts/pretrain_tiny_retina.py --out /tmp/rt/nv --vae_latent_noise 0.5 --unet_steps 0      # VAE: 505 s
    python scripts/pretrain_tiny_retina.py --out /tmp/rt/nvu --vae_from /tmp/rt/nv                     # UNet: 1068 s
    python scripts/pretrain_tiny_retina.py --out /tmp/rt/nvu8 --vae_from /tmp/rt/nvu --unet_from /tmp/rt/nvu
    python scripts/pretrain_tiny_retina.py --out /tmp/rt/nvu12 --vae_from /tmp/rt/nvu8 --unet_from /tmp/rt/nvu8  # 12k

(the fourth folder's vae/ and unet/ were then copied into the package folder; without --out the last command
writes there itself)

The VAE learns to decode a latent perturbed by up to half its std into the clean image, so it draws the
sampler's near-miss latents as trees, not meshes; the UNet then trains 3 x 4,000 steps on its latents
(each stage a fresh cosine schedule and EMA from the last one's weights). That base draws vessel trees
out of a disc, and its trained pairs score SWD near the real-vs-real noise (BENCHMARKS.md, "The toy
base, rebuilt"). `tiny-retina-joint` is trained on the same VAE (scripts/pretrain_tiny_retina_joint.py).

    python scripts/pretrain_tiny_retina.py                       # the first two stages in one go (no latent noise)
    python scripts/pretrain_tiny_retina.py --out /tmp/tr --preview /tmp/tr.png --vae_steps 200 --unet_steps 200

The shipped pretraining.json lists the four commands with what each did ("stages"), the last one's
arguments, and the VAE's and the UNet's totals (merged by hand from the four records).

--preview writes real images, their VAE reconstructions and base samples (empty prompt), one row each.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cffa_ray.models.base import tiny_tokenizer  # noqa: E402
from cffa_ray.models.presets import (  # noqa: E402
    PRESET_SEED,
    SD_SCHEDULER,
    TINY_CLIP,
    TINY_RETINA_FOLDER,
    TINY_RETINA_SIZE,
    TINY_RETINA_UNET,
    TINY_RETINA_VAE,
)
from scripts.pretraining import flips, log, save_pipeline, set_cosine_lr, synthetic_images, train_unet  # noqa: E402


def sobel(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
    kernels = torch.stack([k, k.T])[:, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels, groups=x.shape[1])


def reconstruction(recon: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, Sobel-gradient L1) of a reconstruction against its image."""
    return (recon - x).abs().mean(), (sobel(recon) - sobel(x)).abs().mean()


def perturb(z: torch.Tensor, max_sigma: float | torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """z + sigma * N(0, 1), sigma uniform in [0, max_sigma] per image, in units of the batch's latent std
    (`max_sigma` a float, or one per image [B]). The noise scales with the latents, so an encoder trained
    through it cannot drown it by scaling its latents up."""
    if not torch.is_tensor(max_sigma) and not max_sigma:
        return z
    sigma = torch.as_tensor(max_sigma, dtype=z.dtype).reshape(-1, 1, 1, 1) * torch.rand(
        (len(z), 1, 1, 1), generator=g, dtype=z.dtype)
    sigma = sigma * z.detach().std()
    return z + sigma * torch.randn(z.shape, generator=g, dtype=z.dtype)


def train_vae(images: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float, grad_weight: float,
              latent_noise: float = 0.0):
    from diffusers import AutoencoderKL

    torch.manual_seed(PRESET_SEED + 1)
    vae = AutoencoderKL(**TINY_RETINA_VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    t0, history = time.time(), []
    for step in range(steps):
        set_cosine_lr(opt, step, steps, lr)
        x = flips(images[torch.randint(0, len(images), (batch,), generator=g)], g)
        posterior = vae.encode(x).latent_dist
        l1, grad = reconstruction(vae.decode(perturb(posterior.sample(g), latent_noise, g)).sample, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = l1 + grad_weight * grad + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((l1.item(), grad.item(), kl.item()))
        if (step + 1) % 100 == 0 or step == 0:
            l1_m, grad_m, kl_m = np.mean(history[-100:], axis=0)
            log("vae", step + 1, steps, t0, l1=l1_m, sobel=grad_m, kl=kl_m)
    vae.eval().requires_grad_(False)
    return vae, {"steps": steps, "latent_noise": latent_noise, "l1": float(np.mean([h[0] for h in history[-100:]])),
                 "sobel": float(np.mean([h[1] for h in history[-100:]])), "seconds": round(time.time() - t0)}


def train_decoder(vae, images: torch.Tensor, steps: int, batch: int, lr: float, max_sigma: float,
                  grad_weight: float, fa_only: bool = False):
    """Fine-tune the VAE's decoder (the encoder, and so the latent space, stay as they are) to decode
    perturbed latents into clean images (perturb: sigma up to `max_sigma` latent stds), against the clean
    image (L1 + Sobel L1). The KL-1e-4 VAE's posterior std is 0.5% of the latents' spread, so its decoder
    never saw a latent off the encoder's outputs, and it draws the small errors every sampler leaves as a
    mesh of vessels (BENCHMARKS.md, "The decoder draws a near-miss latent as a mesh"); this decoder
    learns to draw them as the trees they are near. fa_only: perturb the angiograms' latents only (a
    decoder fine-tuned on perturbed CF latents too drew less realistic photographs)."""
    vae.requires_grad_(False)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for q in trained:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    t0, history = time.time(), []
    for step in range(steps):
        set_cosine_lr(opt, step, steps, lr)
        rows = torch.randint(0, len(images), (batch,), generator=g)
        x = flips(images[rows], g)
        with torch.no_grad():  # (fa_only: CF images, the even rows, are decoded unperturbed)
            z = perturb(vae.encode(x).latent_dist.sample(g), max_sigma * (rows % 2) if fa_only else max_sigma, g)
        l1, grad = reconstruction(vae.decode(z).sample, x)
        loss = l1 + grad_weight * grad
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((l1.item(), grad.item()))
        if (step + 1) % 100 == 0 or step == 0:
            l1_m, grad_m = np.mean(history[-100:], axis=0)
            log("decoder", step + 1, steps, t0, l1=l1_m, sobel=grad_m)
    vae.eval().requires_grad_(False)
    l1_m, grad_m = np.mean(history[-100:], axis=0)
    return vae, {"steps": steps, "batch": batch, "noise": max_sigma, "fa_only": fa_only, "l1": float(l1_m),
                 "sobel": float(grad_m), "seconds": round(time.time() - t0)}


@torch.no_grad()
def encode_all(vae, images: torch.Tensor) -> torch.Tensor:
    """Posterior moments of every image (and of its three flips, which the UNet should see too)."""
    out = []
    for x in (images, images.flip(-1), images.flip(-2), images.flip(-1, -2)):
        out += [vae.encode(chunk).latent_dist.parameters for chunk in x.split(256)]
    return torch.cat(out)


PROMPTS = ("", "cf", "fa")  # the product's fixed empty prompt, then one per modality (see train_unet)


def prompt_embeddings(tokenizer):
    """The `tiny` preset's text encoder and its embeddings [3, L, D] of PROMPTS, tokenised as load_base does."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from cffa_ray.models.base import _seeded

    encoder = _seeded(lambda: CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).eval(), 2)
    ids = tokenizer(list(PROMPTS), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder, encoder(ids)[0]


def modality_prompts(contexts: torch.Tensor, p_uncond: float):
    """train_unet's condition for the tiny-retina base. moments: CF and FA alternating (row % 2: 0 CF,
    1 FA). Each sample gets the empty prompt with probability p_uncond, else its modality's prompt: with
    the empty prompt, the one the product uses, the base makes both modalities; the prompts give it a
    modality switch that LoRA can reach."""
    def condition(rows: torch.Tensor, g: torch.Generator) -> dict:
        prompt = torch.where(torch.rand(len(rows), generator=g) < p_uncond, 0, 1 + rows % 2)
        return {"encoder_hidden_states": contexts[prompt]}
    return condition


def base_unet(init: str | None, channels: tuple[int, ...] | None = None):
    """The preset's UNet (or one with other `channels` per level: an experiment, not loadable as the preset)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(PRESET_SEED)
    unet = UNet2DConditionModel(**{**TINY_RETINA_UNET, **({"block_out_channels": channels} if channels else {})})
    if init:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init, subfolder="unet").state_dict())
    return unet


def save_folder(out: Path, vae, unet, text_encoder, tokenizer, record: dict) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    # stored in fp16: half the MB
    vae, unet, text_encoder = (copy.deepcopy(m).half() for m in (vae, unet, text_encoder))
    save_pipeline(out, StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler.from_config(SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False), record)


@torch.no_grad()
def preview(path: Path, vae, unet, context, scaling_factor: float, images: torch.Tensor, n: int = 8) -> None:
    """Top: real images; middle: their VAE reconstructions; bottom: base UNet samples (DDIM, 30 steps)."""
    from diffusers import DDIMScheduler
    from PIL import Image

    x = images[:n]
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    sched = DDIMScheduler.from_config(SD_SCHEDULER)
    sched.set_timesteps(30)
    from cffa_ray.models.designs import vae_scale

    side = x.shape[-1] // vae_scale(vae.config)
    z = torch.randn((n, vae.config.latent_channels, side, side), generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        z = sched.step(unet(z, t, encoder_hidden_states=context.expand(n, -1, -1)).sample, t, z).prev_sample
    samples = vae.decode(z / scaling_factor).sample
    rows = [torch.cat(list(r), dim=-1) for r in (x, recon, samples)]
    grid = ((torch.cat(rows, dim=-2).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "cffa_ray" / TINY_RETINA_FOLDER))
    p.add_argument("--images", type=int, default=2048, help="synthetic images per modality")
    p.add_argument("--vae_steps", type=int, default=2000)
    p.add_argument("--vae_batch", type=int, default=8)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--kl_weight", type=float, default=1e-4, help="on the KL per latent element")
    p.add_argument("--grad_weight", type=float, default=0.5, help="Sobel-gradient L1 (keeps vessels sharp)")
    p.add_argument("--vae_latent_noise", type=float, default=0.0,
                   help="train the VAE to decode perturbed latents (perturb), largest sigma in latent stds")
    p.add_argument("--decoder_steps", type=int, default=0,
                   help="then fine-tune the VAE's decoder on perturbed latents (train_decoder) for this many steps")
    p.add_argument("--decoder_noise", type=float, default=0.5, help="largest perturbation, in latent stds")
    p.add_argument("--decoder_batch", type=int, default=16)
    p.add_argument("--decoder_fa_only", action="store_true", help="perturb only the angiograms' latents")
    p.add_argument("--decoder_lr", type=float, default=2e-4)
    p.add_argument("--unet_steps", type=int, default=4000)
    p.add_argument("--unet_batch", type=int, default=32)
    p.add_argument("--unet_lr", type=float, default=5e-4)
    p.add_argument("--offset_noise", type=float, default=0.1)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--min_snr_gamma", type=float, default=None,
                   help="weight the UNet's loss by Min-SNR-gamma, e.g. 5 (default: unweighted, as the shipped base)")
    p.add_argument("--p_uncond", type=float, default=0.5, help="share of UNet samples with the empty prompt")
    p.add_argument("--unet_from", default=None, help="start the UNet from an earlier output folder")
    p.add_argument("--unet_channels", default=None,
                   help="UNet channels per level, e.g. 64,128,128 (default: the preset's 32,64,64); for measuring "
                        "what capacity buys (bench/base_samples.py --base), not loadable as the tiny-retina preset")
    p.add_argument("--vae_from", default=None, help="reuse the VAE of an earlier output folder (skips stage 1)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--preview", default=None, help="write a PNG: real / reconstructed / sampled rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    images = synthetic_images(args.images, TINY_RETINA_SIZE)
    print(f"[data] {len(images)} synthetic images ({args.images} CF + {args.images} FA, unpaired) at "
          f"{TINY_RETINA_SIZE}px in {time.time() - t0:.0f}s", flush=True)
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", torch_dtype=torch.float32)
        vae.eval().requires_grad_(False)
        vae_record = json.loads((Path(args.vae_from) / "pretraining.json").read_text())["vae"]
    else:
        vae, vae_record = train_vae(images, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight,
                                    args.grad_weight, args.vae_latent_noise)
    if args.decoder_steps:
        vae, vae_record["decoder"] = train_decoder(vae, images, args.decoder_steps, args.decoder_batch,
                                                   args.decoder_lr, args.decoder_noise, args.grad_weight,
                                                   args.decoder_fa_only)
    moments = encode_all(vae, images)
    latents = moments[:, :4]
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(scaling_factor, 5))
    print(f"[vae] latents mean {latents.mean():.3f} std {latents.std():.3f} -> scaling_factor {scaling_factor:.5f}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp))
    text_encoder, contexts = prompt_embeddings(tokenizer)
    channels = tuple(int(c) for c in args.unet_channels.split(",")) if args.unet_channels else None
    unet, unet_record = train_unet(base_unet(args.unet_from, channels), moments, vae.config.scaling_factor,
                                   modality_prompts(contexts, args.p_uncond), args.unet_steps, args.unet_batch,
                                   args.unet_lr, args.offset_noise, args.ema_decay,
                                   min_snr_gamma=args.min_snr_gamma)
    record = {"script": "scripts/pretrain_tiny_retina.py", "args": vars(args), "vae": vae_record, "unet": unet_record,
              "scaling_factor": vae.config.scaling_factor, "torch": torch.__version__,
              "seconds": round(time.time() - t0)}
    save_folder(Path(args.out), vae, unet, text_encoder, tokenizer, record)
    if args.preview:
        preview(Path(args.preview), vae, unet, contexts[0], vae.config.scaling_factor, images)
    print(f"[done] {args.out} in {time.time() - t0:.0f}s: {json.dumps(record)}", flush=True)


if __name__ == "__main__":
    main()
