"""The dual-UNet model: LoRA only is trained, the base is shared and frozen, modalities are decoupled,
checkpoints load with peft, and a base model can be a diffusers folder."""
import pytest
import torch
from peft import PeftModel

from cffa_ray.checks import check_base_model
from cffa_ray.config import ModelConfig
from cffa_ray.errors import ConfigError
from cffa_ray.models.base import load_base
from cffa_ray.models.build import build_model
from tests.helpers import randomise_lora


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", resolution=64, unet_lora_rank=4, unet_lora_alpha=4))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"cf": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "fa": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1}


def test_only_lora_is_trainable_and_the_base_is_shared(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(n.startswith("unet_cf.") for n in trainable) and any(n.startswith("unet_fa.") for n in trainable)
    assert not any(p.requires_grad for p in model.vae.parameters())
    base_cf = model.unet_cf.base_model.model.conv_in.weight
    assert base_cf is model.unet_fa.base_model.model.conv_in.weight  # one copy of the frozen base
    lora_cf = model.unet_cf.base_model.model.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.lora_A
    lora_fa = model.unet_fa.base_model.model.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.lora_A
    assert lora_cf["default"].weight is not lora_fa["default"].weight  # but two adapters


def test_training_step_is_decoupled_and_reaches_both_adapters(model):
    seen = {}

    def spy(name):
        def hook(module, args, kwargs):
            seen[name] = (args[0].clone(), args[1].clone())
        return hook

    # both modalities go through the shared base in one batched call (models/paired.py): cf rows, then fa
    handles = [model.unet_pair.register_forward_pre_hook(spy("pair"), with_kwargs=True)]
    torch.manual_seed(1)
    model.zero_grad()
    same = _batch()
    same["fa"] = same["cf"].clone()  # identical images: any difference below comes from noise and t
    out = model(same)
    for h in handles:
        h.remove()
    seen["cf"], seen["fa"] = zip(*(x.chunk(2) for x in seen.pop("pair")))
    # independent timesteps and noise per modality
    assert not torch.equal(seen["cf"][1], seen["fa"][1])
    assert not torch.allclose(seen["cf"][0], seen["fa"][0])
    assert {"loss", "loss_cf", "loss_fa", "struct"} <= out.keys() and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads_cf = [p.grad for n, p in model.named_parameters() if p.requires_grad and n.startswith("unet_cf.")]
    grads_fa = [p.grad for n, p in model.named_parameters() if p.requires_grad and n.startswith("unet_fa.")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads_cf)
    assert any(g is not None and g.abs().sum() > 0 for g in grads_fa)


def test_fixed_generator_gives_a_reproducible_validation_loss(model):
    a = model(_batch(3), generator=torch.Generator().manual_seed(5))["loss"]
    b = model(_batch(3), generator=torch.Generator().manual_seed(5))["loss"]
    assert a.item() == b.item()


def test_saved_lora_loads_with_peft_and_changes_the_unet(model, tmp_path):
    randomise_lora(model.unet_cf, 0.5, seed=None)
    model.unet_cf.save_pretrained(tmp_path / "unet_cf_lora")
    assert (tmp_path / "unet_cf_lora/adapter_config.json").is_file()
    assert (tmp_path / "unet_cf_lora/adapter_model.safetensors").is_file()
    parts = load_base("dual_unet", "", "tiny")  # a fresh base with the same seeded weights
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    ctx = parts.prompt_embeds
    before = parts.unet(x, t, encoder_hidden_states=ctx).sample
    loaded = PeftModel.from_pretrained(parts.unet, tmp_path / "unet_cf_lora")
    after = loaded(x, t, encoder_hidden_states=ctx).sample
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, model.unet_cf(x, t, encoder_hidden_states=ctx).sample)


def test_preset_is_reproducible():
    a, b = load_base("dual_unet", "", "tiny"), load_base("dual_unet", "", "tiny")
    torch.testing.assert_close(a.unet.conv_in.weight, b.unet.conv_in.weight)
    torch.testing.assert_close(a.prompt_embeds, b.prompt_embeds)


def test_base_model_from_a_diffusers_folder(sd15_folder):
    check_base_model(str(sd15_folder), "dual_unet")
    parts = load_base("dual_unet", str(sd15_folder), None)
    assert parts.prompt_embeds.shape == (1, 77, 32)
    assert parts.scheduler_config["beta_schedule"] == "scaled_linear"
    m = build_model(ModelConfig(base_model=str(sd15_folder), resolution=64, unet_lora_rank=4))
    assert torch.isfinite(m(_batch())["loss"])


def test_base_model_folder_errors(tmp_path, sd15_folder):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd15_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ConfigError, match="not a diffusers SD15 folder.*vae/config.json"):
        check_base_model(str(broken), "dual_unet")
    with pytest.raises(ConfigError, match="not a diffusers SDXL folder.*text_encoder_2"):
        check_base_model(str(sd15_folder), "joint_sdxl")
    with pytest.raises(ConfigError, match="neither an existing folder nor a hub id"):
        check_base_model(str(tmp_path / "missing" / "model"), "dual_unet")



def test_hub_base_model_in_the_local_cache_needs_no_network(tmp_path, monkeypatch):
    """A hub id whose snapshot is in the Hugging Face cache passes (no hub endpoint is reachable here)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    repo = tmp_path / "models--org--sd15"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("0" * 40)
    for name in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"):
        (repo / "snapshots" / ("0" * 40) / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / ("0" * 40) / name).write_text("{}")
    check_base_model("org/sd15", "dual_unet")
    with pytest.raises(ConfigError, match="org/other: the Hugging Face hub cannot be reached"):
        check_base_model("org/other", "dual_unet")


def test_gradient_checkpointing_keeps_loss_and_gradients():
    def loss_and_grads(checkpointing):
        torch.manual_seed(0)
        m = build_model(ModelConfig(preset="tiny", resolution=64, unet_lora_rank=4))
        randomise_lora(m, 0.1, seed=None)
        if checkpointing:
            m.enable_gradient_checkpointing()
            assert m.unet_cf.base_model.model.is_gradient_checkpointing
            assert m.unet_fa.base_model.model.is_gradient_checkpointing
        m.train()
        out = m(_batch(4), generator=torch.Generator().manual_seed(9))
        out["loss"].backward()
        return out["loss"], [p.grad.clone() for p in m.parameters() if p.requires_grad]

    loss, grads = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    torch.testing.assert_close(loss_ckpt, loss)
    assert sum(g.abs().sum() for g in grads_ckpt) > 0
    for a, b in zip(grads, grads_ckpt):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("targets, expected", [("to_q,to_k,to_v", 2_390_016), ("to_q,to_k,to_v,to_out.0", 3_188_736)])
def test_lora_parameters_per_sd15_unet_match_the_seed(targets, expected):
    """The seed's count: LoRA r16 on q, k, v of the real SD1.5 UNet (built on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    from cffa_ray.models.lora import with_lora
    from cffa_ray.models.presets import SD15_UNET

    with torch.device("meta"):
        unet = with_lora(UNet2DConditionModel(**SD15_UNET), 16, 16, tuple(targets.split(",")))
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == expected


def test_lora_targets_default_and_validation():
    cfg = ModelConfig(preset="tiny")
    assert cfg.lora_target_list == ("to_q", "to_k", "to_v")
    model = build_model(cfg)
    names = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert names == {"to_q", "to_k", "to_v"}
    with pytest.raises(ConfigError, match="--lora_targets 'to_x'"):
        ModelConfig(preset="tiny", lora_targets="to_x").validate_model()


@pytest.mark.parametrize("name, preset", [("dual_unet", "tiny"), ("joint_sdxl", "tiny-sdxl")])
def test_the_drivers_design_facts_are_the_models_own(name, preset, sd15_folder):
    """What a job's driver reads without building a model (designs.py) is what the model uses."""
    from cffa_ray.models.designs import adapter_folders, design, noise_shape_for
    from cffa_ray.models.presets import vae_config

    model = build_model(ModelConfig(model=name, preset=preset, resolution=64, unet_lora_rank=4))
    facts = design(name)
    assert (model.ADAPTERS, model.UNETS, model.CACHE_COLUMNS) == (facts.adapters, facts.unets, facts.cache_columns)
    assert tuple(model.adapters()) == adapter_folders(name)
    assert noise_shape_for(name, vae_config("unused", preset), 64) == model.noise_shape(64)
    read, loaded = vae_config(str(sd15_folder), None), load_base("dual_unet", str(sd15_folder), None).vae.config
    assert public_keys(read) == public_keys(loaded)
    with pytest.raises(ConfigError, match="--model 'dual' is unknown; choose dual_unet or joint_sdxl"):
        design("dual")


def public_keys(config) -> dict:
    """A diffusers config without its bookkeeping entries (`_class_name`, `_diffusers_version`, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}
