"""Frozen base parts (UNet, VAE, noise schedule, fixed-prompt embeddings) from a folder, hub id or preset.

The text encoders only ever see one fixed empty prompt, so they are run once here and dropped:
what the model keeps is the embedding tensor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from cffa_ray.config import FAMILY, check_prediction_type
from cffa_ray.models.presets import PRESET_SEED, PRESETS, SD_SCHEDULER, TINY_CLIP, preset_source


@dataclass
class BaseParts:
    unet: torch.nn.Module                       # UNet2DConditionModel, random or pretrained, frozen
    vae: torch.nn.Module                        # AutoencoderKL, frozen
    scheduler_config: dict                      # the base's training noise schedule
    prompt_embeds: torch.Tensor                 # [1, L, D] fixed-prompt embedding
    pooled_prompt_embeds: torch.Tensor | None   # [1, D2] (SDXL only)


def _text_ids(config: dict) -> torch.Tensor:
    """Token ids of the empty prompt, padded as CLIP tokenizers do: [BOS, EOS, PAD...]."""
    n = config["max_position_embeddings"]
    return torch.tensor([[config["bos_token_id"], config["eos_token_id"]] + [config["pad_token_id"]] * (n - 2)])


def _encode_prompt(encoders: list, ids: list[torch.Tensor], family: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.no_grad():
        if family == "sd15":
            return encoders[0](ids[0])[0], None
        hidden, pooled = [], None
        for encoder, token_ids in zip(encoders, ids):
            out = encoder(token_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the projected pooled output of the last (bigG) encoder
        return torch.cat(hidden, dim=-1), pooled


def _seeded(build, component: int):
    """Build one preset component from its own seed, leaving the caller's RNG (LoRA init) alone.

    Each component has a seed of its own, so one can be built without the others (the latent
    cache builds only the VAE) and still get the same weights.
    """
    with torch.random.fork_rng():
        torch.manual_seed(PRESET_SEED + component)
        return build()


def _preset_vae(preset: str):
    return _seeded(lambda: AutoencoderKL(**PRESETS[preset]["vae"]), 1)


def _from_preset(preset: str) -> BaseParts:
    spec = PRESETS[preset]
    unet = _seeded(lambda: UNet2DConditionModel(**spec["unet"]), 0)
    encoders = []
    for i, cfg in enumerate(spec["text_encoders"]):
        cls = CLIPTextModelWithProjection if (spec["family"] == "sdxl" and i == 1) else CLIPTextModel
        encoders.append(_seeded(lambda: cls(CLIPTextConfig(**cfg)).eval(), 2 + i))
    ids = [_text_ids(cfg) for cfg in spec["text_encoders"]]
    embeds, pooled = _encode_prompt(encoders, ids, spec["family"])
    return BaseParts(unet, _preset_vae(preset), dict(SD_SCHEDULER), embeds, pooled)


def _from_pretrained(base_model: str, family: str) -> BaseParts:
    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae")
    scheduler_config = dict(DDPMScheduler.load_config(base_model, subfolder="scheduler"))
    names = [("text_encoder", "tokenizer", CLIPTextModel)]
    if family == "sdxl":
        names.append(("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection))
    encoders, ids = [], []
    for enc_dir, tok_dir, cls in names:
        tokenizer = AutoTokenizer.from_pretrained(base_model, subfolder=tok_dir)
        # fp32 whatever the folder stores (transformers keeps a stored fp16): the fixed prompt's embeddings
        encoders.append(cls.from_pretrained(base_model, subfolder=enc_dir, dtype=torch.float32).eval())
        ids.append(tokenizer("", padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids)
    embeds, pooled = _encode_prompt(encoders, ids, family)
    return BaseParts(unet, vae, scheduler_config, embeds, pooled)


def load_vae(base_model: str, preset: str | None):
    """Only the frozen VAE of a base (the latent cache needs nothing else)."""

    base_model, preset = preset_source(base_model, preset)
    vae = _preset_vae(preset) if preset else AutoencoderKL.from_pretrained(base_model, subfolder="vae")
    return vae.requires_grad_(False).eval()


def load_base(model: str, base_model: str, preset: str | None) -> BaseParts:
    """Frozen base parts for `model` (dual_unet -> SD1.5 family, joint_sdxl -> SDXL family)."""
    base_model, preset = preset_source(base_model, preset)
    parts = _from_preset(preset) if preset else _from_pretrained(base_model, FAMILY[model])
    check_prediction_type(parts.scheduler_config, base_model)
    for module in (parts.unet, parts.vae):
        module.requires_grad_(False)
    parts.vae.eval()
    return parts


def tiny_tokenizer(folder, max_length: int = TINY_CLIP["max_position_embeddings"]):
    """A real CLIPTokenizer for the tiny text encoders (a handful of tokens, made offline; saved like a
    hub tokenizer by save_pretrained). `folder` holds its vocabulary files only while it is built."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[ch], vocab[ch + "</w>"] = 3 + 2 * i, 4 + 2 * i
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").unlink()
    return tok
