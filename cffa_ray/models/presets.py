"""Model configs for the built-in presets: real architectures or tiny ones, seeded random weights,
and `tiny-retina` / `tiny-retina-joint`, the presets with trained weights (diffusers folders shipped in
the package), one per design.

Presets exist because weights cannot always be downloaded (tests, demos, benchmarks): the same
code path as a real base model runs, only the weights are seeded random numbers. Building a preset
twice with the same seed gives the same weights, which is how generation rebuilds the base that a
LoRA was trained on. Random weights can never make an image that looks like anything, so
`tiny-retina`'s VAE and UNet were pre-trained on synthetic retinas (scripts/pretrain_tiny_retina.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import hf_hub_download

SD_SCHEDULER = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1, "clip_sample": False,
    "set_alpha_to_one": False, "timestep_spacing": "leading",
}

# --- SD1.5 family (dual_unet)

SD15_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

TINY_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
# Four blocks so the latent is 1/8 of the image, as in SD: a 64 px tiny run has 8x8 latents.
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=8, scaling_factor=0.18215,
)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, vocab_size=1000, hidden_act="quick_gelu", projection_dim=32,
                 bos_token_id=0, eos_token_id=2, pad_token_id=2)

# tiny-retina: pre-trained on synthetic CF and FA (scripts/pretrain_tiny_retina.py), loaded from the package
# folder below. Three VAE blocks, so the latent is 1/4 of the image: 64 px -> 4x16x16, enough cells for
# the vessels (the tiny VAE's 8x8 cannot hold them).
TINY_RETINA_SIZE = 64
TINY_RETINA_FOLDER = "models/weights/tiny-retina"  # relative to the cffa_ray package
TINY_RETINA_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8, scaling_factor=1.0,
)
TINY_RETINA_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)

# --- SDXL family (joint_sdxl)

SDXL_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_VAE = {**SD_VAE, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=0)

TINY_SDXL_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
)
TINY_CLIP_G = {**TINY_CLIP, "hidden_act": "gelu"}

# tiny-retina-joint: the joint design's base on the toy world (scripts/pretrain_tiny_retina_joint.py): the
# tiny-retina VAE, the tiny SDXL text encoders, and an SDXL-layout UNet of tiny-retina's size pre-trained on
# joint CF|FA images (64 x 128 px -> 4x16x32 latents) whose halves come from different eyes, so that it
# knows both modalities and their places but not which FA belongs to which CF (as the dual base does not).
TINY_RETINA_JOINT_FOLDER = "models/weights/tiny-retina-joint"
TINY_RETINA_JOINT_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 1), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
)

PRESETS = {
    "tiny": {"family": "sd15", "unet": TINY_UNET, "vae": TINY_VAE, "text_encoders": [TINY_CLIP]},
    "sd15-random": {"family": "sd15", "unet": SD15_UNET, "vae": SD_VAE, "text_encoders": [CLIP_L]},
    # pre-trained weights: a diffusers folder inside the package, loaded like any --base_model folder
    "tiny-retina": {"family": "sd15", "folder": TINY_RETINA_FOLDER},
    "tiny-sdxl": {"family": "sdxl", "unet": TINY_SDXL_UNET,
                  "vae": {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True},
                  "text_encoders": [TINY_CLIP, TINY_CLIP_G]},
    "sdxl-random": {"family": "sdxl", "unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoders": [CLIP_L, CLIP_G]},
    "tiny-retina-joint": {"family": "sdxl", "folder": TINY_RETINA_JOINT_FOLDER},
}
PRESET_SEED = 1234


def preset_source(base_model: str, preset: str | None) -> tuple[str, str | None]:
    """(base_model, preset) to load from: a preset with trained weights is the package folder holding them."""
    folder = PRESETS[preset].get("folder") if preset else None
    if folder:
        return str(Path(__file__).resolve().parents[1] / folder), None
    return base_model, preset


def vae_config(base_model: str, preset: str | None) -> dict:
    """The VAE's config (latent channels, blocks) without its weights, nor diffusers: the generation driver
    needs only this (a folder's vae/config.json, or the hub's, as diffusers' load_config reads it)."""

    base_model, preset = preset_source(base_model, preset)
    if preset:
        return dict(PRESETS[preset]["vae"])
    local = Path(base_model) / "vae" / "config.json"
    path = local if local.is_file() else hf_hub_download(base_model, "config.json", subfolder="vae")
    return json.loads(Path(path).read_text())
