"""The lean sampler (one batched UNet with per-half merged LoRA, bf16 weights, fp32 norms, no autocast)
samples no further from an fp32 run of the same pairs than the previous bf16 path did (two merged UNets,
bf16 weights, under CUDA autocast, its casts made by bench/opcount_mode.CudaAutocastRules on CPU)."""
import pytest
import torch

from bench.opcount_mode import CudaAutocastRules
from cffa_ray.config import ModelConfig
from cffa_ray.models.build import build_model
from cffa_ray.models.inference import cast, drop_unfused_projections, prepare_for_sampling
from cffa_ray.models.interface import PairModel
from cffa_ray.sampling import pair_noise, sample_pairs
from tests.helpers import randomise_lora

# 8 pairs: with 2 the two paths' PSNR differ by the pairs drawn (on the 2026-12-08 tiny-retina: 52.0 dB lean
# against 52.5 previous with 2 pairs, 52.1 against 46.3 with 8)
STEPS, PAIRS = 20, 8


def trained_like():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny-retina", resolution=64), share_base=False).eval()
    randomise_lora(model.unet_cf, 0.02, seed=1)
    randomise_lora(model.unet_fa, 0.02, seed=2)
    return model


def previous_bf16_path():
    """prepare_for_sampling as it was: each LoRA merged into its own UNet, everything cast to bf16, q/k/v fused."""
    model = trained_like()
    PairModel.merge_lora(model)
    model.requires_grad_(False)
    for unet in model.unets():
        cast(unet, "cpu", torch.bfloat16)
        unet.fuse_qkv_projections()
        drop_unfused_projections(unet)
    cast(model.vae, "cpu", torch.bfloat16)
    return model


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * torch.log10(4.0 / ((a - b) ** 2).mean()).item()  # images in [-1, 1]: peak-to-peak 2


@pytest.mark.slow  # three sampling runs of 20 steps: ~1 min of CPU
def test_lean_bf16_sampler_is_as_close_to_fp32_as_the_previous_one():
    reference_model = prepare_for_sampling(trained_like(), "cpu", "no")
    noise = pair_noise(reference_model, 64, 0, list(range(PAIRS)))
    reference = torch.cat(sample_pairs(reference_model, noise, steps=STEPS))
    old_model = previous_bf16_path()
    with CudaAutocastRules(torch.bfloat16):  # the GPU path sampled under torch.autocast("cuda", bf16)
        old = torch.cat(sample_pairs(old_model, noise, steps=STEPS))
    lean_model = prepare_for_sampling(trained_like(), "cpu", "bf16")
    assert len(lean_model.unets()) == 1  # both modalities in one UNet call
    lean = torch.cat(sample_pairs(lean_model, noise, steps=STEPS, mixed_precision="bf16"))
    old_db, lean_db = psnr(old, reference), psnr(lean, reference)
    print(f"\nPSNR against fp32, tiny-retina, {PAIRS} pairs x {STEPS} DDIM steps: previous bf16 path "
          f"{old_db:.2f} dB, lean path {lean_db:.2f} dB")
    assert lean_db >= old_db
