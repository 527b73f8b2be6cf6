"""What the `tiny-retina` base UNet draws on its own, against real synthetic angiograms: trees or not?

The aligned-pairs issue asks first what the base makes before any LoRA: the dual design's FA UNet
starts from it, so vessels the base cannot draw the LoRA will hardly learn in a few hundred steps.
This samples the base alone (the "fa" prompt the pretraining gave it, and the empty prompt the
product uses) with DDIM, and scores the FA vessel maps with `cffa evaluate`'s topology measures
(evaluate/topology.py) against real synthetic FA of the same size (another draw of them is the
baseline: the measures' own noise), and, with
--generated, against the FA of a `cffa generate` output folder. With --latent_noise, also the real FA
through the base's VAE with that much noise on the latents: whether its decoder draws a latent a little
off the encoder's outputs (as every sampler's are) as a tree or as a mesh. Writes a grid (rows: real,
base "fa", base "", round trips, generated) with --grid.

    python bench/base_samples.py --n 32 --grid docs/images/base_fa.png \
        --generated /work/tmp_q600/generated/struct0_alpha_bar_seed0_negated
    python bench/base_samples.py --n 32 --latent_noise 0.3 0.5 --grid /tmp/round_trips.png
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cffa_ray  # noqa: E402
from cffa_ray.evaluate import topology, vessels  # noqa: E402
from cffa_ray.models.presets import SD_SCHEDULER, TINY_RETINA_FOLDER  # noqa: E402
from cffa_ray.synth import write_synthetic_pairs  # noqa: E402

SIZE = 64


def base_fa(folder: Path, prompt: str, n: int, steps: int, seed: int) -> np.ndarray:
    """uint8 [n, SIZE, SIZE] grey images the base in `folder` samples from `prompt` (DDIM, no LoRA)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        context = encoder(ids)[0].expand(n, -1, -1)
        sched = DDIMScheduler.from_config(SD_SCHEDULER)
        sched.set_timesteps(steps)
        side = SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
        z = torch.randn((n, vae.config.latent_channels, side, side), generator=torch.Generator().manual_seed(seed))
        for t in sched.timesteps:
            z = sched.step(unet(z, t, encoder_hidden_states=context).sample, t, z).prev_sample
        return grey(vae.decode(z / vae.config.scaling_factor).sample)


def grey(rgb: torch.Tensor) -> np.ndarray:
    """uint8 [n, H, W]: decoded images in [-1, 1], channels averaged."""
    return ((rgb.clamp(-1, 1) + 1) * 127.5).mean(dim=1).round().byte().numpy()


def round_trips(folder: Path, fas: np.ndarray, sigmas: list[float], seed: int) -> dict[float, np.ndarray]:
    """The base's VAE on real FA: encode (posterior mode), add sigma * N(0, 1) in units of the latents' std
    over both modalities (1 / scaling_factor, the unit pretraining's perturb uses, there per batch), decode.
    How the decoder draws a latent a little off the encoder's outputs, as every sampler's are."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    x = torch.from_numpy(fas).float().div(127.5).sub(1)[:, None].expand(-1, 3, -1, -1)
    out = {}
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        for sigma in sigmas:
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
            rgb = vae.decode(z + sigma / vae.config.scaling_factor * noise).sample
            out[sigma] = grey(rgb)
    return out


def read_fa(paths: list[str], n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("L").resize((SIZE, SIZE))) for p in sorted(paths)[:n]])


def topologies(fas: np.ndarray) -> list[dict]:
    """evaluate's topology measures of each FA, inside its own fundus (the rim as evaluate erodes it)."""
    out = []
    for fa in fas:
        mask = vessels.fundus_mask(fa, vessels.rim_for(SIZE))
        out.append(topology.image_topology(vessels.fa_vessels(fa, mask), mask))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32, help="images per set")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="a pretraining output folder (default: the shipped tiny-retina)")
    p.add_argument("--generated", default=None, help="a cffa generate output folder: its FA as one more set")
    p.add_argument("--latent_noise", type=float, nargs="*", default=[],
                   help="also the VAE round trip of the real FA with this much latent noise (in latent stds), "
                        "e.g. 0 0.3: does the decoder draw a near-miss latent as a tree?")
    p.add_argument("--grid", default=None, help="write a PNG grid here (8 per row)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    t0 = time.time()
    base = Path(args.base) if args.base else Path(cffa_ray.__file__).parent / TINY_RETINA_FOLDER
    work = Path(f"/tmp/cffa-base-samples-{args.seed}")
    for draw in (1, 2):  # the reference set, and another draw of it: the measures' own noise
        write_synthetic_pairs(work / str(draw), args.n, SIZE, seed=args.seed + draw)
    reference = read_fa(glob.glob(f"{work}/1/fa/*.png"), args.n)
    sets = {"real synthetic FA, another draw": read_fa(glob.glob(f"{work}/2/fa/*.png"), args.n),
            'base alone, prompt "fa"': base_fa(base, "fa", args.n, args.steps, args.seed),
            'base alone, empty prompt': base_fa(base, "", args.n, args.steps, args.seed)}
    # of the first row's images, so the grid shows what the decoder made of them
    for sigma, fas in round_trips(base, sets["real synthetic FA, another draw"], args.latent_noise, args.seed).items():
        sets[f"real FA, VAE round trip, noise {sigma:g}"] = fas
    if args.generated:
        sets["generated (LoRA-trained dual_unet)"] = read_fa(glob.glob(f"{args.generated}/png/*/*/fa.png"), args.n)
    real = topologies(reference)
    rows = {}
    for name, fas in sets.items():
        summary = topology.summarise(topologies(fas), real)
        rows[name] = {m: {"mean": summary[m]["generated"]["mean"], "d": summary[m]["d"]} for m in topology.MEASURES}
    print(f"\nFA topology at {SIZE} px, {args.n} images per set, d against the real set ({time.time() - t0:.0f}s)")
    print(f"{'set':40s}" + "".join(f"{m:>22s}" for m in topology.MEASURES))
    for name, row in rows.items():
        print(f"{name:40s}" + "".join(f"{row[m]['mean']:12.3f} (d {row[m]['d']:+5.2f})" for m in topology.MEASURES))
    if args.grid:
        grid = np.concatenate([np.concatenate(list(fas[:8]), axis=1) for fas in sets.values()], axis=0)
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.grid)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
