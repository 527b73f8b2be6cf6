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
