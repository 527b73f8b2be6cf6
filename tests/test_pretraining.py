"""scripts/pretraining.py's pure parts: the loss weighting the toy bases can be trained with."""
import torch

from cffa_ray.models.presets import SD_SCHEDULER
from cffa_ray.models.vae import noise_schedule
from scripts.pretraining import min_snr_weight


def test_min_snr_weight_keeps_the_noisy_steps_and_lowers_the_clean_ones():
    a = noise_schedule(SD_SCHEDULER)  # alpha_bar, falling from ~1 (clean) to ~0 (noise)
    snr = a / (1 - a)
    w = min_snr_weight(a, 5.0)
    noisy, clean = snr <= 5.0, snr > 5.0
    assert noisy.any() and clean.any()
    assert torch.equal(w[noisy], torch.ones(int(noisy.sum())))
    assert torch.allclose(w[clean], 5.0 / snr[clean])
    assert w[0] < 0.01 and bool((w[1:] >= w[:-1]).all())  # the cleanest step weighs least; weights never fall
    assert torch.equal(min_snr_weight(a, None), torch.ones_like(a))  # unweighted, as the shipped bases


def test_perturb_leaves_the_rows_it_is_told_to_and_scales_with_the_latents():
    from scripts.pretrain_tiny_retina import perturb

    z = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert perturb(z, 0.0, torch.Generator().manual_seed(1)) is z  # no noise: no random draw at all
    fa_only = 0.25 * (torch.arange(8) % 2)  # as train_decoder's fa_only: CF rows (even) get sigma 0
    out = perturb(z, fa_only, torch.Generator().manual_seed(1))
    assert torch.equal(out[0::2], z[0::2]) and not torch.equal(out[1::2], z[1::2])
    # the noise is in units of the latents' std: ten times larger latents, ten times the perturbation
    big = perturb(10 * z, 0.25, torch.Generator().manual_seed(1)) - 10 * z
    small = perturb(z, 0.25, torch.Generator().manual_seed(1)) - z
    assert torch.allclose(big, 10 * small, rtol=1e-4, atol=1e-5) and small.abs().max() > 0
