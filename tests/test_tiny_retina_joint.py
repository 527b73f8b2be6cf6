"""The `tiny-retina-joint` preset: the joint design's toy base, shipped in the package as an SDXL diffusers folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cffa_ray.config import ModelConfig
from cffa_ray.models.base import load_base
from cffa_ray.models.build import build_model
from cffa_ray.models.presets import TINY_RETINA_JOINT_UNET, preset_source, vae_config
from cffa_ray.sampling import pair_noise, sample_pairs
from tests.helpers import REPO, colourfulness

FOLDER = Path(preset_source("", "tiny-retina-joint")[0])
RETINA = Path(preset_source("", "tiny-retina")[0])


def test_preset_is_an_sdxl_folder_with_the_retina_vae_and_its_pretraining_record():
    assert FOLDER == REPO / "cffa_ray" / "models" / "weights" / "tiny-retina-joint"
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler"):
        assert (FOLDER / part).is_dir(), part
    files = [p for p in FOLDER.rglob("*") if p.is_file()]
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in files)  # no pickles
    assert sum(p.stat().st_size for p in files) < 8 * 2**20
    # the VAE is tiny-retina's, byte for byte: both designs see the same latents of the same images
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (FOLDER / vae).read_bytes() == (RETINA / vae).read_bytes()
    assert vae_config("", "tiny-retina-joint")["block_out_channels"] == [16, 32, 64]
    record = json.loads((FOLDER / "pretraining.json").read_text())
    assert record["script"] == "scripts/pretrain_tiny_retina_joint.py" and record["unet"]["steps"] > 0
    assert record["unet"]["seconds"] > 0 and record["unet"]["mse"] < 0.5


def test_preset_loads_as_the_joint_base_with_the_tiny_sdxl_prompt_embeddings():
    parts = load_base("joint_sdxl", "", "tiny-retina-joint")
    config = {k: parts.unet.config[k] for k in TINY_RETINA_JOINT_UNET}
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()} == TINY_RETINA_JOINT_UNET
    assert parts.prompt_embeds.shape == (1, 77, 64) and parts.pooled_prompt_embeds.shape == (1, 32)
    assert parts.unet.dtype == torch.float32



def test_the_base_alone_draws_a_fundus_photograph_left_and_an_angiogram_right():
    """Fresh LoRA adapters change nothing (B = 0), so these are the base's own joint images, split by the
    product's sampler: the left half of every pair is the more colourful (a CF is orange, an FA grey).
    The base is a short pretraining (BENCHMARKS.md): colour leaks into its FA halves (an orange tint,
    colourfulness 0.40-0.53 on the 2026-12-08 base, against 0.71-0.76 for its CF halves), which the LoRA
    fine-tune removes; so the bound is on the gap between the halves of each pair."""
    model = build_model(ModelConfig(model="joint_sdxl", preset="tiny-retina-joint", resolution=64),
                        share_base=False).eval()
    noise = pair_noise(model, 64, seed=3, pair_ids=range(6))
    with torch.no_grad():
        cf, fa = sample_pairs(model, noise, steps=20)
    assert cf.shape == fa.shape == (6, 3, 64, 64)
    cf_colour, fa_colour = colourfulness(cf), colourfulness(fa)
    assert (cf_colour > fa_colour + 0.15).all() and cf_colour.mean() > 0.35, (cf_colour, fa_colour)
