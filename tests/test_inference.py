"""The sampling form of a model (merged LoRA, compute-dtype weights, fused QKV, sliced VAE decode)
and --model_batch auto's arithmetic, on CPU with the tiny presets."""
import pytest
import torch

from cffa_ray.config import ModelConfig
from cffa_ray.generate.memory import choose_model_batch
from cffa_ray.models.build import build_model
from cffa_ray.models.inference import prepare_for_sampling
from cffa_ray.sampling import pair_noise, sample_pairs
from tests.helpers import randomise_lora

GIB = 2**30


def trained_like(model_name="dual_unet", preset="tiny"):
    """A model with non-zero LoRA weights (a fresh adapter is the identity), separate base weights."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(model=model_name, preset=preset, resolution=32), share_base=False).eval()
    return randomise_lora(model, 0.05, seed=None)


def sample(model, steps=3):
    noise = pair_noise(model, 32, 7, [0, 1])
    return sample_pairs(model, noise, steps=steps)


def test_merged_fused_model_samples_what_the_peft_model_samples():
    model = trained_like()
    before = sample(model)
    prepare_for_sampling(model, "cpu", "no")
    assert not any("lora" in name for name, _ in model.named_parameters())  # peft's wrappers are gone
    assert all(type(u).__name__ == "UNet2DConditionModel" for u in model.unets())
    after = sample(model)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_bf16_weights_are_held_in_bf16_and_sample_close_to_fp32():
    reference = sample(prepare_for_sampling(trained_like(), "cpu", "no"))
    model = prepare_for_sampling(trained_like(), "cpu", "bf16")
    norm = (torch.nn.GroupNorm, torch.nn.LayerNorm)  # norms keep fp32 parameters, held once
    for u in model.unets():
        for m in u.modules():
            own = {p.dtype for p in m.parameters(recurse=False)}
            assert own <= ({torch.float32} if isinstance(m, norm) else {torch.bfloat16}), type(m).__name__
    assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}
    cf, fa = sample(model)
    assert cf.dtype == torch.float32 and torch.isfinite(cf).all()
    for a, b in zip(reference, (cf, fa)):
        assert (a - b).abs().mean() < 0.05  # bf16 rounding, not a different image


def test_sdxl_vae_stays_fp32_under_fp16_but_follows_bf16():
    model = prepare_for_sampling(trained_like("joint_sdxl", "tiny-sdxl"), "cpu", "fp16")
    assert next(model.unets()[0].parameters()).dtype == torch.float16
    assert next(model.vae.parameters()).dtype == torch.float32  # its config says force_upcast
    model = prepare_for_sampling(trained_like("joint_sdxl", "tiny-sdxl"), "cpu", "bf16")
    assert next(model.vae.parameters()).dtype == torch.bfloat16


def test_vae_decodes_one_image_at_a_time():
    model = prepare_for_sampling(trained_like(), "cpu", "no")
    assert model.vae.use_slicing
    latents = torch.randn(3, 2, 4, 4, 4)  # a dual state: 3 pairs x 2 modalities
    together = model.decode(latents)
    alone = [model.decode(latents[i:i + 1]) for i in range(3)]
    for m in range(2):  # slicing: the batch's images are exactly the images decoded alone
        assert torch.equal(together[m], torch.cat([a[m] for a in alone]))


def test_compiled_unets_trace_and_sample_the_same():
    """torch.compile's graph capture (dynamo) of both UNets; the eager backend skips the slow codegen."""
    reference = sample(prepare_for_sampling(trained_like(), "cpu", "no"))
    compiled = prepare_for_sampling(trained_like(), "cpu", "no", compile=True, compile_backend="eager")
    assert all(hasattr(u, "_orig_mod") for u in compiled.unets())
    for a, b in zip(reference, sample(compiled)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("total, fixed, per_pair, expected", [
    (24 * GIB, 4 * GIB, 1 * GIB, 15),     # 0.8 * 24 - 4 = 15.2 GiB for pairs
    (80 * GIB, 4 * GIB, 1 * GIB, 16),     # capped: larger batches barely help
    (24 * GIB, 20 * GIB, 1 * GIB, 1),     # nothing left: still 1 (and an OOM names --model_batch)
    (24 * GIB, 2 * GIB, 3 * GIB, 5),
])
def test_choose_model_batch(total, fixed, per_pair, expected):
    assert choose_model_batch(total, fixed, per_pair) == expected


def test_choose_model_batch_fits_the_budget():
    for per_pair in (0.3, 0.7, 1.1, 2.9):
        b = choose_model_batch(24 * GIB, 3 * GIB, int(per_pair * GIB))
        assert 3 * GIB + b * per_pair * GIB <= 0.8 * 24 * GIB
        assert b == 16 or 3 * GIB + (b + 1) * per_pair * GIB > 0.8 * 24 * GIB  # and is the largest that fits
