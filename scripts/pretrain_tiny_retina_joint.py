"""Pre-train the `tiny-retina-joint` preset: the joint_sdxl design's base on the toy world.

The joint design runs one SDXL UNet on the joint image cat([CF, FA], width). Its toy base reuses
`tiny-retina`'s VAE (read from the package folder) and the `tiny-sdxl` text encoders, and trains an
SDXL-layout UNet of tiny-retina's size (cffa_ray.models.presets.TINY_RETINA_JOINT_UNET), on CPU, on
joint images of the synthetic set whose two halves come from *different* eyes (CF of pair 2k beside
FA of pair 2k+1, re-paired on each flip), all with the product's fixed empty prompt and SDXL's size
conditioning for 64 x 128. The UNet starts from tiny-retina's UNet (`--init`, see `from_dual_base`),
so both toy bases share what the dual one learnt of the images. So the base draws a fundus photograph
on the left and an angiogram on the right, as the dual design's base draws either, and neither base
knows which FA belongs to which CF: that is what the LoRA fine-tune of either design must learn,
which makes the two designs comparable.

Writes a diffusers StableDiffusionXLPipeline folder (fp16 safetensors) to
cffa_ray/models/weights/tiny-retina-joint/, which `--model joint_sdxl --preset tiny-retina-joint`
loads (or `--base_model <that folder>`). Seeded: a rerun on the same torch build and thread count
writes the same weights.

    python scripts/pretrain_tiny_retina_joint.py --preview /tmp/trj.png          # the shipped weights
    python scripts/pretrain_tiny_retina_joint.py --out /tmp/trj --unet_steps 100   # a quick look

The shipped pretraining.json records the arguments, the loss and the seconds (2-core CPU: see
BENCHMARKS.md, "The tiny-retina-joint base").
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cffa_ray.models.base import _encode_prompt, _seeded, _text_ids, tiny_tokenizer  # noqa: E402
from cffa_ray.models.joint_sdxl import joint, sdxl_time_ids  # noqa: E402
from cffa_ray.models.presets import (  # noqa: E402
    PRESET_SEED,
    SD_SCHEDULER,
    TINY_CLIP,
    TINY_CLIP_G,
    TINY_RETINA_FOLDER,
    TINY_RETINA_JOINT_FOLDER,
    TINY_RETINA_JOINT_UNET,
    TINY_RETINA_SIZE,
)
from scripts.pretraining import save_pipeline, synthetic_images, train_unet  # noqa: E402

FLIPS = ((), (-1,), (-2,), (-1, -2))  # the synthetic fundus is symmetric under both flips


@torch.no_grad()
def joint_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """VAE posterior moments of unpaired joint images [4N, 8, S/4, S/2]: for each flip k, CF n beside FA n+k
    (mod N) of the alternating CF/FA `images`, both halves flipped alike, encoded whole (the VAE sees across
    the seam, as the joint design's latent cache and sampler do)."""
    cf, fa = images[0::2], images[1::2]
    out = []
    for k, dims in enumerate(FLIPS):
        pairs = joint(cf.flip(dims) if dims else cf, (fa.flip(dims) if dims else fa).roll(k, 0))
        out += [vae.encode(chunk).latent_dist.parameters for chunk in pairs.split(128)]
    return torch.cat(out)


@torch.no_grad()
def from_dual_base(unet, dual_unet) -> dict[str, int]:
    """Start the joint UNet from the dual design's base UNet, tensor by tensor.

    Equal shapes are copied; the 1x1 conv projections become the linear ones of SDXL's layout; the
    cross-attention keys and values, which read 64 prompt channels here and 32 there, take the old
    weights for the first 32 and zeros for the rest; SDXL's added (text, size) embedding starts as a
    no-op (its output layer zeroed, its input layer seeded random).

    Returns:
        how many tensors took each route.
    """
    source, counts = dual_unet.state_dict(), dict.fromkeys(("copied", "conv_to_linear", "widened", "zeroed",
                                                                  "random"), 0)
    for key, value in unet.state_dict().items():
        old = source.get(key)
        if old is not None and old.shape == value.shape:
            value.copy_(old)
            route = "copied"
        elif old is not None and old.dim() == 4 and old.shape[:2] == value.shape:
            value.copy_(old[:, :, 0, 0])
            route = "conv_to_linear"
        elif old is not None and old.shape[0] == value.shape[0] and old.shape[1] < value.shape[1]:
            value.zero_()[:, :old.shape[1]] = old
            route = "widened"
        elif key.startswith("add_embedding.linear_2."):
            value.zero_()
            route = "zeroed"
        elif key.startswith("add_embedding."):  # its input layer keeps its seeded random weights
            route = "random"
        else:
            raise ValueError(f"{key}: no counterpart in the dual base ({None if old is None else tuple(old.shape)})")
        counts[route] += 1
    return counts


def text_encoders():
    """The tiny-sdxl preset's two text encoders (seeded as load_base seeds them), rounded through fp16 as the
    folder stores them, and the empty prompt's (hidden states [1, 77, 64], pooled [1, 32]) from them."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kinds = ((CLIPTextModel, TINY_CLIP), (CLIPTextModelWithProjection, TINY_CLIP_G))
    encoders = [_seeded(lambda: cls(CLIPTextConfig(**cfg)).eval().half().float(), 2 + i)
                for i, (cls, cfg) in enumerate(kinds)]
    embeds, pooled = _encode_prompt(encoders, [_text_ids(TINY_CLIP), _text_ids(TINY_CLIP_G)], "sdxl")
    return encoders, embeds, pooled


def empty_prompt(embeds: torch.Tensor, pooled: torch.Tensor, size: int):
    """train_unet's condition: every sample gets the fixed empty prompt and SDXL's size ids of the joint image."""
    time_ids = sdxl_time_ids(size, 2 * size)

    def condition(rows: torch.Tensor, g: torch.Generator) -> dict:
        b = len(rows)
        return {"encoder_hidden_states": embeds.expand(b, -1, -1),
                "added_cond_kwargs": {"text_embeds": pooled.expand(b, -1), "time_ids": time_ids.expand(b, -1)}}
    return condition


def save_folder(out: Path, vae, unet, encoders, record: dict) -> None:
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = [tiny_tokenizer(Path(tmp) / name) for name in ("tok", "tok2")]
    vae, unet, te1, te2 = (copy.deepcopy(m).half() for m in (vae, unet, *encoders))  # fp16: half the MB
    save_pipeline(out, StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        unet=unet, scheduler=DDPMScheduler.from_config(SD_SCHEDULER)), record)


@torch.no_grad()
def preview(path: Path, vae, unet, condition, images: torch.Tensor, n: int = 6) -> None:
    """Top: real unpaired joint images; bottom: base UNet samples (DDIM, 30 steps), one per column."""
    from diffusers import DDIMScheduler
    from PIL import Image

    from cffa_ray.models.vae import decode_latents

    real = joint(images[0:2 * n:2], images[1:2 * n:2])
    sched = DDIMScheduler.from_config(SD_SCHEDULER)
    sched.set_timesteps(30)
    side = images.shape[-1] // 4
    z = torch.randn((n, 4, side, 2 * side), generator=torch.Generator().manual_seed(0))
    kwargs = condition(torch.zeros(n), None)
    for t in sched.timesteps:
        z = sched.step(unet(z, t, **kwargs).sample, t, z).prev_sample
    samples = decode_latents(vae, z)
    rows = [torch.cat(list(r), dim=-2) for r in (real, samples)]  # each a column of n joint images
    grid = ((torch.cat(rows, dim=-1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "cffa_ray" / TINY_RETINA_JOINT_FOLDER))
    p.add_argument("--vae_from", default=str(REPO / "cffa_ray" / TINY_RETINA_FOLDER),
                   help="the pre-trained VAE to reuse (default: the shipped tiny-retina's)")
    p.add_argument("--init", choices=("tiny-retina", "random"), default="tiny-retina",
                   help="start the UNet from the dual base's UNet (--vae_from's folder) or from seeded random weights")
    p.add_argument("--images", type=int, default=1024, help="synthetic images per modality")
    p.add_argument("--unet_steps", type=int, default=1200)
    p.add_argument("--unet_batch", type=int, default=24)
    p.add_argument("--unet_lr", type=float, default=5e-4)
    p.add_argument("--offset_noise", type=float, default=0.1)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--preview", default=None, help="write a PNG: real (left) and sampled (right) joint images")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").float().eval().requires_grad_(False)
    images = synthetic_images(args.images, TINY_RETINA_SIZE)
    moments = joint_moments(vae, images)
    print(f"[data] {len(moments)} unpaired joint CF|FA images at {TINY_RETINA_SIZE}x{2 * TINY_RETINA_SIZE}px "
          f"in {time.time() - t0:.0f}s", flush=True)
    encoders, embeds, pooled = text_encoders()
    condition = empty_prompt(embeds, pooled, TINY_RETINA_SIZE)
    torch.manual_seed(PRESET_SEED)
    unet = UNet2DConditionModel(**TINY_RETINA_JOINT_UNET)
    init = from_dual_base(unet, UNet2DConditionModel.from_pretrained(args.vae_from, subfolder="unet").float()) \
        if args.init == "tiny-retina" else None
    print(f"[init] {args.init}: {init}", flush=True)
    unet, unet_record = train_unet(unet, moments, vae.config.scaling_factor, condition, args.unet_steps,
                                   args.unet_batch, args.unet_lr, args.offset_noise, args.ema_decay)
    args_record = {**vars(args), "out": Path(args.out).name, "vae_from": Path(args.vae_from).name,
                   "preview": args.preview and Path(args.preview).name, "init_tensors": init}
    record = {"script": "scripts/pretrain_tiny_retina_joint.py", "args": args_record,
              "unet": unet_record, "scaling_factor": vae.config.scaling_factor, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "seconds": round(time.time() - t0)}
    save_folder(Path(args.out), vae, unet, encoders, record)
    if args.preview:
        preview(Path(args.preview), vae, unet, condition, images)
    print(f"[done] {args.out} in {time.time() - t0:.0f}s: {json.dumps(record)}", flush=True)


if __name__ == "__main__":
    main()
