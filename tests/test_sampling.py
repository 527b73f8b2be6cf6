"""Sampling: shared z0, per-pair seeds, fixed-shape batching, from_data noise, both schedulers."""
import pytest
import torch

from cffa_ray import diffusion as D
from cffa_ray.config import ModelConfig
from cffa_ray.models.build import build_model
from cffa_ray.sampling import denoise_step, make_scheduler, pair_noise, sample_in_fixed_batches, sample_pairs
from cffa_ray.seeds import pair_seed
from tests.helpers import randomise_lora


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="tiny", resolution=32, unet_lora_rank=4), share_base=False)
    return randomise_lora(m, 0.2, seed=None).eval()  # the adapters have an effect, as after training


def test_pair_seed_depends_on_seed_and_pair_only(model):
    assert pair_seed(42, 7) == pair_seed(42, 7)
    assert len({pair_seed(42, k) for k in range(1000)}) == 1000
    assert pair_seed(42, 7) != pair_seed(43, 7)
    a = pair_noise(model, 32, 42, [3, 7, 9])
    b = pair_noise(model, 32, 42, [7])
    assert torch.equal(a[1], b[0])


def test_both_modalities_start_from_the_same_z0(model):
    z0 = pair_noise(model, 32, 1, [0, 1])
    state = model.noise_to_state(z0)
    assert torch.equal(state[:, 0], state[:, 1])
    negated = model.noise_to_state(z0, "negated")  # --fa_noise negated: the FA UNet starts from -z0
    assert torch.equal(negated[:, 0], z0) and torch.equal(negated[:, 1], -z0)


def test_fixed_batches_make_a_pair_independent_of_its_neighbours(model):
    noise = pair_noise(model, 32, 42, list(range(7)))
    cf_all, fa_all = sample_in_fixed_batches(model, noise, 4, steps=3)
    # pair 5 alone (padded), and pair 5 among others at another position
    cf_one, fa_one = sample_in_fixed_batches(model, noise[5:6], 4, steps=3)
    cf_mix, fa_mix = sample_in_fixed_batches(model, noise[[2, 5, 6]], 4, steps=3)
    assert torch.equal(cf_one[0], cf_all[5]) and torch.equal(fa_one[0], fa_all[5])
    assert torch.equal(cf_mix[1], cf_all[5]) and torch.equal(fa_mix[1], fa_all[5])
    assert cf_all.shape == (7, 3, 32, 32) and not torch.equal(cf_all[0], cf_all[1])
    assert not torch.equal(cf_all, fa_all)  # two UNets, two LoRAs: different images from one z0


def test_from_data_noises_both_modalities_with_the_same_noise(model, monkeypatch):
    g = torch.Generator().manual_seed(0)
    cf, fa = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    clean = model.encode_pair(cf, fa, sample=False)
    first = {}
    original = model.predict_noise

    def spy(state, t):
        first.setdefault("state", state.clone())
        first.setdefault("t", t)
        return original(state, t)

    monkeypatch.setattr(model, "predict_noise", spy)
    z0 = pair_noise(model, 32, 5, [0, 1])
    out_cf, _ = sample_pairs(model, z0, steps=10, init_images=(cf, fa), strength=0.6)
    a = model.alphas_cumprod[int(first["t"])]
    added = (first["state"] - a.sqrt() * clean) / (1 - a).sqrt()  # the noise each latent received
    torch.testing.assert_close(added[:, 0], added[:, 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(added[:, 0], z0, atol=1e-4, rtol=1e-4)
    assert int(first["t"]) < 700  # strength 0.6 of 10 steps starts part-way, not at pure noise
    # strength 1.0 starts from pure noise: the real pair does not matter any more... nearly
    full, _ = sample_pairs(model, z0, steps=10, init_images=(cf, fa), strength=1.0)
    pure, _ = sample_pairs(model, z0, steps=10)
    assert (full - pure).abs().mean() < (out_cf - pure).abs().mean()


def test_dpm_solver_runs_and_differs_from_ddim(model):
    z0 = pair_noise(model, 32, 0, [0])
    ddim, _ = sample_pairs(model, z0, steps=5, scheduler="ddim")
    dpm, _ = sample_pairs(model, z0, steps=5, scheduler="dpm++")
    assert torch.isfinite(dpm).all() and not torch.equal(ddim, dpm)


@torch.no_grad()
def test_struct_guidance_zero_is_the_unguided_sampler_bit_for_bit(model):
    """--struct_guidance 0 (the default) walks exactly the walk there was before the flag."""
    z0 = pair_noise(model, 32, 4, [0, 1])
    sched = make_scheduler("ddim", model.scheduler_config)
    sched.set_timesteps(4)
    state = model.noise_to_state(z0, "negated") * sched.init_noise_sigma
    for t in sched.timesteps:  # the loop as it was: eps, then the scheduler's step
        eps = model.predict_noise(sched.scale_model_input(state, t), t)
        state = sched.step(eps.float(), int(t), state).prev_sample
    ref_cf, ref_fa = model.decode(state)
    cf, fa = sample_pairs(model, z0, steps=4, fa_noise="negated", struct_guidance=0.0)
    assert torch.equal(cf, ref_cf) and torch.equal(fa, ref_fa)


@torch.no_grad()
def test_struct_guidance_aligns_the_latents_and_a_pair_stays_a_function_of_seed_and_id(model):
    noise = pair_noise(model, 32, 42, list(range(5)))
    states = {}
    for scale in (0.0, 2.0):  # the final latents, from the same walk sample_pairs takes
        sched = make_scheduler("ddim", model.scheduler_config)
        sched.set_timesteps(6)
        state = model.noise_to_state(noise)
        for t in sched.timesteps:
            state = denoise_step(model, sched, state, t, int(t), struct_guidance=scale)
        states[scale] = D.structure_disagreement(state[:, 0], state[:, 1])
    assert (states[2.0] < states[0.0]).all(), states
    guided = dict(steps=3, struct_guidance=2.0)
    cf_all, fa_all = sample_in_fixed_batches(model, noise, 4, **guided)
    cf_one, fa_one = sample_in_fixed_batches(model, noise[3:4], 4, **guided)
    assert torch.equal(cf_one[0], cf_all[3]) and torch.equal(fa_one[0], fa_all[3])
    cf_plain, _ = sample_in_fixed_batches(model, noise[3:4], 4, steps=3)
    assert not torch.equal(cf_plain[0], cf_one[0])
    dpm, _ = sample_pairs(model, noise[:1], steps=3, scheduler="dpm++", struct_guidance=2.0)
    assert torch.isfinite(dpm).all()


@torch.no_grad()
def test_vessel_guidance_keeps_a_pair_a_function_of_seed_and_id(model):
    noise = pair_noise(model, 32, 42, list(range(3)))
    on_vessels = dict(steps=3, struct_guidance=2.0, struct_guidance_target="vessels")
    cf_all, fa_all = sample_in_fixed_batches(model, noise, 2, **on_vessels)
    cf_one, fa_one = sample_in_fixed_batches(model, noise[2:3], 2, **on_vessels)
    assert torch.equal(cf_one[0], cf_all[2]) and torch.equal(fa_one[0], fa_all[2])
    cf_edges, _ = sample_in_fixed_batches(model, noise[2:3], 2, steps=3, struct_guidance=2.0)
    assert not torch.equal(cf_edges[0], cf_one[0])  # the target decides the nudge
