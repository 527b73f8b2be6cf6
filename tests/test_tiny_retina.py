"""The `tiny-retina` preset: trained weights shipped in the package as a diffusers folder."""
from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from cffa_ray.models.base import load_base, load_vae
from cffa_ray.models.presets import preset_source, vae_config
from tests.helpers import REPO, colourfulness

FOLDER = Path(preset_source("", "tiny-retina")[0])


def test_preset_is_a_diffusers_folder_of_safetensors_that_ships_with_the_package():
    assert FOLDER == REPO / "cffa_ray" / "models" / "weights" / "tiny-retina"
    for part in ("unet", "vae"):
        assert (FOLDER / part / "config.json").is_file()
        assert (FOLDER / part / "diffusion_pytorch_model.safetensors").is_file()
    assert (FOLDER / "text_encoder" / "model.safetensors").is_file()
    assert (FOLDER / "model_index.json").is_file() and (FOLDER / "scheduler").is_dir()
    files = [p for p in FOLDER.rglob("*") if p.is_file()]
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in files)  # no pickles
    assert sum(p.stat().st_size for p in files) < 8 * 2**20
    # every file is package data: a wheel or a non-editable install carries the folder
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cffa_ray"]
    for path in files:
        rel = path.relative_to(REPO / "cffa_ray").as_posix()
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in patterns), f"{rel} is not package data"


def test_preset_loads_the_shipped_weights_in_fp32():
    from safetensors.torch import load_file

    parts = load_base("dual_unet", "", "tiny-retina")
    assert vae_config("", "tiny-retina")["block_out_channels"] == [16, 32, 64]
    for module, part in ((parts.unet, "unet"), (parts.vae, "vae")):
        stored = load_file(FOLDER / part / "diffusion_pytorch_model.safetensors")
        state = module.state_dict()
        assert set(stored) == set(state), part
        assert all(v.dtype == torch.float16 for v in stored.values())  # shipped in fp16 (half the MB)
        for key, value in stored.items():  # loaded for training in fp32, the very same numbers
            assert state[key].dtype == torch.float32 and torch.equal(state[key], value.float()), key
    assert parts.prompt_embeds.dtype == torch.float32 and parts.prompt_embeds.shape == (1, 77, 32)


def _psnr(vae, images: torch.Tensor) -> float:
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    mse = ((recon - images) ** 2).mean().item()
    return 10 * np.log10(4.0 / mse)  # the images span [-1, 1]


def test_retina_vae_reconstructs_synthetic_cf_and_fa_far_better_than_the_random_tiny_vae():
    from cffa_ray.synth import make_pair

    pairs = [make_pair(np.random.default_rng([7, k]), 64) for k in range(4)]  # not in the pretraining set
    cf = torch.from_numpy(np.stack([np.asarray(c) for c, _ in pairs])).permute(0, 3, 1, 2)
    fa = torch.from_numpy(np.stack([np.repeat(np.asarray(f)[..., None], 3, -1) for _, f in pairs])).permute(0, 3, 1, 2)
    retina, tiny = load_vae("", "tiny-retina"), load_vae("", "tiny")
    for images in (cf, fa):
        x = images.float() / 127.5 - 1
        ours, random = _psnr(retina, x), _psnr(tiny, x)
        assert ours > 22 and ours > random + 12, (ours, random)


@pytest.mark.slow  # trains 40 steps and samples 32 pairs: minutes on 2 cores
def test_a_few_dozen_lora_steps_on_the_retina_base_make_the_cf_unet_draw_fundi_and_the_fa_unet_angiograms():
    """The base makes both modalities from the empty prompt; the demo's recipe (40 steps, lr 3e-3,
    4 pairs a step) must teach each UNet's LoRA its own. Before training some CF samples are grey."""
    from cffa_ray.demo import DEMO_LR, DEMO_STEPS
    from cffa_ray.models.build import build_model
    from cffa_ray.sampling import pair_noise
    from cffa_ray.synth import make_pair
    from cffa_ray.train.config import TrainConfig

    cfg = TrainConfig(preset="tiny-retina", resolution=64, data="unused", lr=DEMO_LR)
    torch.manual_seed(0)
    model = build_model(cfg, **cfg.loss_settings())
    noise = pair_noise(model, 64, seed=42, pair_ids=range(8))

    def colours():
        cf, fa = sample(model, noise)
        return colourfulness(cf), colourfulness(fa)

    cf_before, _ = colours()
    assert (cf_before < 0.2).any(), cf_before  # the base alone: some "CF" samples are angiograms
    pairs = [make_pair(np.random.default_rng([0, k]), 64) for k in range(16)]
    cf = torch.from_numpy(np.stack([np.asarray(c) for c, _ in pairs])).permute(0, 3, 1, 2)
    fa = torch.from_numpy(np.stack([np.repeat(np.asarray(f)[..., None], 3, -1) for _, f in pairs])).permute(0, 3, 1, 2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=DEMO_LR)
    g = torch.Generator().manual_seed(0)
    for _ in range(DEMO_STEPS):
        rows = torch.randint(0, len(pairs), (4,), generator=g)
        model({"cf": cf[rows], "fa": fa[rows]}, generator=g)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    cf_after, fa_after = colours()
    assert (cf_after > 0.3).all() and (fa_after.abs() < 0.1).all(), (cf_after, fa_after)

    # from one z0 the two vessel trees avoid each other (below the floor of mismatched pairs); with the
    # FA UNet starting from -z0 they overlap
    same, same_floor = _alignment(*sample(model, noise))
    negated, negated_floor = _alignment(*sample(model, noise, fa_noise="negated"))
    assert same < same_floor - 0.05 and negated > negated_floor + 0.1, (same, same_floor, negated, negated_floor)


def sample(model, noise, **kwargs):
    from cffa_ray.sampling import sample_pairs

    model.eval()
    with torch.no_grad():
        cf, fa = sample_pairs(model, noise, steps=20, **kwargs)
    model.train()
    return cf, fa


def _alignment(cf: torch.Tensor, fa: torch.Tensor) -> tuple[float, float]:
    """Mean vessel soft Dice of the pairs and of mismatched pairs (cffa evaluate's measure)."""
    from cffa_ray.evaluate.vessels import alignments_with_floor
    from cffa_ray.images import to_uint8

    registered, mismatched = alignments_with_floor(list(to_uint8(cf)), [f[..., 0] for f in to_uint8(fa)])
    return float(np.nanmean(registered)), float(np.nanmean(mismatched))
