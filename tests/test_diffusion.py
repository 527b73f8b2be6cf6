"""The diffusion math: each test would catch a wrong sign, a swapped axis or a dropped term."""
import math

import pytest
import torch
import torch.nn.functional as F

from cffa_ray import diffusion as D


@pytest.fixture
def schedule():
    from diffusers import DDPMScheduler

    from cffa_ray.models.presets import SD_SCHEDULER

    return DDPMScheduler.from_config(SD_SCHEDULER).alphas_cumprod.float()


def test_predict_x0_inverts_add_noise(schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = D.add_noise(x0, eps, t, schedule)
    torch.testing.assert_close(D.predict_x0(x_t, eps, t, schedule), x0, atol=1e-4, rtol=1e-4)
    # x_t mixes signal and noise with the scheduler's own weights
    a = schedule[500]
    torch.testing.assert_close(x_t[2], a.sqrt() * x0[2] + (1 - a).sqrt() * eps[2])


def test_offset_noise_adds_a_per_channel_constant():
    g = torch.Generator().manual_seed(1)
    plain = D.offset_noise((2000, 4, 16, 16), 0.0, torch.Generator().manual_seed(1))
    offset = D.offset_noise((2000, 4, 16, 16), 0.5, g)
    # The spatial mean of each (sample, channel) has std ~ sqrt(0.5^2 + 1/256) with offset, 1/16 without.
    std_plain = plain.mean(dim=(2, 3)).std().item()
    std_offset = offset.mean(dim=(2, 3)).std().item()
    assert std_plain == pytest.approx(1 / 16, rel=0.1)
    assert std_offset == pytest.approx(math.sqrt(0.25 + 1 / 256), rel=0.1)
    # the offset is constant over space: the noise minus its spatial mean is plain Gaussian
    assert (offset - offset.mean(dim=(2, 3), keepdim=True)).std().item() == pytest.approx(1.0, rel=0.05)


def test_sobel_axes():
    x = torch.zeros(1, 1, 8, 8)
    x[..., :, 4:] = 1.0  # an edge across the width (a vertical line)
    gx, gy = D.sobel(x)
    assert gx.abs().sum() > 0 and gy.abs().sum() == 0
    gx_t, gy_t = D.sobel(x.transpose(-1, -2))
    assert gy_t.abs().sum() > 0 and gx_t.abs().sum() == 0
    assert gx[0, 0, 4, 4] > 0  # dark -> bright along +x gives a positive response


def test_edge_map_ignores_sign_and_contrast():
    g = torch.Generator().manual_seed(2)
    cf = torch.randn(2, 4, 16, 16, generator=g)
    fa = -3.0 * cf  # inverted contrast, stronger: same structure
    torch.testing.assert_close(D.edge_map(cf), D.edge_map(fa), atol=1e-4, rtol=1e-4)
    w = torch.ones(2)
    assert D.structure_loss(cf, fa, w).item() == pytest.approx(0.0, abs=1e-4)
    # different structure does cost something
    other = torch.randn(2, 4, 16, 16, generator=g)
    assert D.structure_loss(cf, other, w).item() > 0.1


def test_structure_loss_sees_misalignment():
    x = torch.zeros(1, 4, 16, 16)
    x[..., 8:, :] = 1.0  # horizontal edge
    shifted = torch.roll(x, shifts=3, dims=-2)
    assert D.structure_loss(x, shifted, torch.ones(1)) > 0.2
    assert D.structure_loss(x, -x, torch.ones(1)) == pytest.approx(0.0, abs=1e-4)


def test_structure_guidance_pulls_the_clean_latents_together_per_pair(schedule):
    """--struct_guidance: the guided eps make a DDIM step's clean latents agree more, pair by pair."""
    g = torch.Generator().manual_seed(3)
    x_cf, x_fa, e_cf, e_fa = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(4))
    ab = schedule[600]
    assert D.structure_guidance(x_cf, x_fa, e_cf, e_fa, ab, 0.0) == (e_cf, e_fa)  # 0: the very same tensors
    g_cf, g_fa = D.structure_guidance(x_cf, x_fa, e_cf, e_fa, ab, 0.5)
    t = torch.full((3,), 600)

    def disagreement(eps_cf, eps_fa):
        x0 = [D.predict_x0(x, e, t, schedule) for x, e in ((x_cf, eps_cf), (x_fa, eps_fa))]
        return D.structure_disagreement(*x0)

    before, after = disagreement(e_cf, e_fa), disagreement(g_cf, g_fa)
    assert (after < before - 0.005).all(), (before, after)  # one step of 0.5: about 4% less
    assert not torch.equal(g_cf, e_cf) and not torch.equal(g_fa, e_fa)  # both modalities are nudged
    # a pair's nudge is its own: the same alone as in a batch (a batch mean would shrink it by 1/B)
    one_cf, one_fa = D.structure_guidance(x_cf[1:2], x_fa[1:2], e_cf[1:2], e_fa[1:2], ab, 0.5)
    torch.testing.assert_close(one_cf[0], g_cf[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one_fa[0], g_fa[1], atol=1e-6, rtol=1e-5)
    # the push on the clean latent fades with the noise: near t = 0 the step is almost unguided
    late_cf, _ = D.structure_guidance(x_cf, x_fa, e_cf, e_fa, schedule[5], 0.5)
    x0_shift = lambda e, a: ((e - e_cf) * (1 - a).sqrt() / a.sqrt()).abs().mean()  # noqa: E731
    assert x0_shift(late_cf, schedule[5]) < 0.05 * x0_shift(g_cf, ab)


def test_high_pass_removes_flat_keeps_texture():
    flat = torch.full((1, 4, 16, 16), 3.0)
    assert D.high_pass(flat).abs().max() < 1e-5
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    tex = checker.float().expand(1, 4, 16, 16)
    assert D.high_pass(tex).abs().mean() > 0.3


def test_hf_loss_weighting_fades_noisy_timesteps():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    pred = x0 + torch.randn(2, 4, 8, 8, generator=g)
    full = D.hf_loss(pred, x0, torch.ones(2))
    assert D.hf_loss(x0, x0, torch.ones(2)).item() == pytest.approx(0.0, abs=1e-6)
    assert D.hf_loss(pred, x0, torch.full((2,), 0.5)).item() == pytest.approx(0.5 * full.item(), rel=1e-5)


def _view(seed, schedule):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    v = D.noised_view(x0, schedule, 0.1, g)
    v["eps_hat"] = v["eps"] + 0.3 * torch.randn(2, 4, 8, 8, generator=g)
    v["pred_x0"] = D.predict_x0(v["x_t"], v["eps_hat"], v["t"], schedule)
    return v


def test_dual_loss_is_the_sum_of_its_terms(schedule):
    cf, fa = _view(4, schedule), _view(5, schedule)
    out = D.dual_loss(cf, fa, hf_lambda=0.5, struct_lambda=0.3)
    # recompute every term independently of dual_loss
    mse_cf, mse_fa = F.mse_loss(cf["eps_hat"], cf["eps"]), F.mse_loss(fa["eps_hat"], fa["eps"])
    hf_cf = D.hf_loss(cf["pred_x0"], cf["x0"], cf["ab"])
    hf_fa = D.hf_loss(fa["pred_x0"], fa["x0"], fa["ab"])
    struct = D.structure_loss(cf["pred_x0"], fa["pred_x0"], torch.minimum(cf["ab"], fa["ab"]))
    expected = mse_cf + 0.5 * hf_cf + mse_fa + 0.5 * hf_fa + 0.3 * struct
    torch.testing.assert_close(out["loss"], expected)
    assert out["struct"] > 0 and out["hf_cf"] > 0 and out["hf_fa"] > 0
    # each lambda moves the total by exactly its term
    no_struct = D.dual_loss(cf, fa, hf_lambda=0.5, struct_lambda=0.0)["loss"]
    torch.testing.assert_close(out["loss"] - no_struct, 0.3 * struct)
    no_hf = D.dual_loss(cf, fa, hf_lambda=0.0, struct_lambda=0.3)["loss"]
    torch.testing.assert_close(out["loss"] - no_hf, 0.5 * (hf_cf + hf_fa))


def test_noised_view_draws_fresh_noise_and_timesteps(schedule):
    g = torch.Generator().manual_seed(6)
    x0 = torch.zeros(64, 4, 8, 8)
    a, b = D.noised_view(x0, schedule, 0.1, g), D.noised_view(x0, schedule, 0.1, g)
    assert not torch.equal(a["t"], b["t"])
    assert not torch.equal(a["eps"], b["eps"])
    assert a["t"].min() >= 0 and a["t"].max() < len(schedule)
    torch.testing.assert_close(a["ab"], schedule[a["t"]])


def test_loss_weighting_none_is_the_seeds_unweighted_form(schedule):
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(16, 4, 8, 8, generator=g)
    weighted = D.noised_view(x0, schedule, 0.1, torch.Generator().manual_seed(1))
    plain = D.noised_view(x0, schedule, 0.1, torch.Generator().manual_seed(1), weighting="none")
    torch.testing.assert_close(weighted["w"], weighted["ab"])
    assert torch.equal(plain["w"], torch.ones(16)) and torch.equal(plain["t"], weighted["t"])  # same draws
    cf, fa = _view(4, schedule), _view(5, schedule)
    for v in (cf, fa):
        v["w"] = torch.ones(2)
    out = D.dual_loss(cf, fa, hf_lambda=0.5, struct_lambda=0.3)
    struct = D.structure_loss(cf["pred_x0"], fa["pred_x0"], torch.ones(2))
    hf = D.hf_loss(cf["pred_x0"], cf["x0"], torch.ones(2))
    torch.testing.assert_close(out["struct"], struct)
    torch.testing.assert_close(out["hf_cf"], hf)
    with pytest.raises(ValueError, match="loss weighting"):
        D.x0_term_weight(torch.ones(2), "sometimes")


def test_timestep_grid_spans_the_schedule_and_fixes_t(schedule):
    grid = D.timestep_grid(8, 1000)
    assert grid == [62, 187, 312, 437, 562, 687, 812, 937]
    x0 = torch.zeros(3, 4, 8, 8)
    v = D.noised_view(x0, schedule, 0.1, torch.Generator().manual_seed(0), t=torch.full((3,), 437))
    assert v["t"].tolist() == [437] * 3
    torch.testing.assert_close(v["ab"], schedule[[437] * 3])
