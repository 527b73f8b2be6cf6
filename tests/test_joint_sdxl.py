"""The joint SDXL design: size conditioning, the exact CF|FA split, loss terms, both LoRA formats,
and an SDXL folder made with save_pretrained (the design through the real train and generate jobs, sent
with `ray job submit`: test_cluster_jobs.py)."""

import pytest
import torch

from cffa_ray.config import ModelConfig
from cffa_ray.models.base import load_base
from cffa_ray.models.build import build_model
from cffa_ray.models.joint_sdxl import DIFFUSERS_LORA_FILE, joint, sdxl_time_ids, split
from tests.helpers import randomise_lora, write_tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig(model="joint_sdxl", preset="tiny-sdxl", resolution=64, unet_lora_rank=4,
                                unet_lora_alpha=8), struct_lambda=0.5)
    return randomise_lora(m, 0.1, seed=None)


def test_time_ids_use_the_real_non_square_size(model):
    assert sdxl_time_ids(512, 1024).tolist() == [[512, 1024, 0, 0, 512, 1024]]
    assert model.time_ids.tolist() == [[64, 128, 0, 0, 64, 128]]
    assert model.noise_shape(64) == (4, 8, 16)  # latent R/8 x R/4


def test_joint_and_split_are_exact_inverses():
    cf, fa = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    j = joint(cf, fa)
    assert j.shape == (2, 3, 16, 32)
    left, right = split(j)
    assert torch.equal(left, cf) and torch.equal(right, fa)


def test_loss_terms_and_gradients(model):
    g = torch.Generator().manual_seed(1)
    batch = {"cf": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "fa": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1}
    model.zero_grad()
    out = model(batch, generator=torch.Generator().manual_seed(2))
    assert out["struct"] > 0
    torch.testing.assert_close(out["loss"], out["mse"] + model.hf_lambda * out["hf"] + 0.5 * out["struct"])
    out["loss"].backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)


def _sdxl_pipeline(parts, tokenizer):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from cffa_ray.models.presets import SD_SCHEDULER, TINY_CLIP, TINY_CLIP_G

    return StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_CLIP)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_G)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=parts.unet, scheduler=DDPMScheduler.from_config(SD_SCHEDULER))


def test_lora_in_diffusers_format_loads_into_an_sdxl_pipeline(model, tmp_path):
    model.save_extra(tmp_path)
    assert (tmp_path / DIFFUSERS_LORA_FILE).is_file()
    parts = load_base("joint_sdxl", "", "tiny-sdxl")
    pipe = _sdxl_pipeline(parts, write_tiny_tokenizer(tmp_path / "tok"))
    x, t = torch.randn(1, 4, 8, 16), torch.tensor([500])
    cond = {"text_embeds": parts.pooled_prompt_embeds, "time_ids": model.time_ids}
    before = pipe.unet(x, t, encoder_hidden_states=parts.prompt_embeds, added_cond_kwargs=cond).sample
    pipe.load_lora_weights(str(tmp_path))
    after = pipe.unet(x, t, encoder_hidden_states=parts.prompt_embeds, added_cond_kwargs=cond).sample
    ours = model.unet(x, t, encoder_hidden_states=parts.prompt_embeds, added_cond_kwargs=cond).sample
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, ours)  # same weights, same alpha/rank scale


def test_base_model_from_an_sdxl_folder(tmp_path):
    parts = load_base("joint_sdxl", "", "tiny-sdxl")
    pipe = _sdxl_pipeline(parts, write_tiny_tokenizer(tmp_path / "tok"))
    pipe.save_pretrained(tmp_path / "sdxl")
    from cffa_ray.checks import check_base_model

    check_base_model(str(tmp_path / "sdxl"), "joint_sdxl")
    loaded = load_base("joint_sdxl", str(tmp_path / "sdxl"), None)
    assert loaded.prompt_embeds.shape == (1, 77, 64) and loaded.pooled_prompt_embeds.shape == (1, 32)
    m = build_model(ModelConfig(model="joint_sdxl", base_model=str(tmp_path / "sdxl"), resolution=64,
                                unet_lora_rank=4))
    assert torch.isfinite(m({"cf": torch.zeros(1, 3, 64, 64), "fa": torch.zeros(1, 3, 64, 64)})["loss"])
