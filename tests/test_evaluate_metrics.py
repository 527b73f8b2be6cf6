"""The evaluation's math on CPU, without Ray: vessel alignment, SWD, FID/KID, SSIM/PSNR."""
import importlib.util

import numpy as np
import pytest

from cffa_ray.evaluate import metrics
from cffa_ray.evaluate.vessels import alignments_with_floor, pair_alignment
from cffa_ray.synth import make_pair


def synthetic_pairs(n, size, seed=0):
    """Registered pairs as the evaluation reads them: CF uint8 [R, R, 3], FA uint8 [R, R]."""
    pairs = [make_pair(np.random.default_rng([seed, k]), size) for k in range(n)]
    return [np.asarray(cf) for cf, _ in pairs], [np.asarray(fa) for _, fa in pairs]


@pytest.fixture(scope="module")
def pairs96():
    return synthetic_pairs(6, 96)


def test_registered_pairs_score_above_shifted_and_mismatched(pairs96):
    cfs, fas = pairs96
    registered, mismatched = alignments_with_floor(cfs, fas)
    shifted = [pair_alignment(cf, np.roll(fa, 3, axis=1)) for cf, fa in zip(cfs, fas)]
    registered, mismatched, shifted = map(np.array, (registered, mismatched, shifted))
    assert registered.min() > 0.45, registered
    # every pair loses alignment when its FA moves by 3 px, and by a wide margin on average
    assert (registered - shifted).min() > 0.15, (registered, shifted)
    assert registered.mean() > 2 * shifted.mean()
    assert registered.mean() > 3 * mismatched.mean(), (registered, mismatched)
    assert np.isfinite(mismatched).all()


@pytest.mark.parametrize("blur", [1.0, 3.0])
def test_alignment_ignores_the_fundus_border(blur):
    """A CF and an FA of the same eye disc without vessels share only their (blurred) border, a ridge-like
    edge in both: with the rim eroded they do not read as aligned."""
    from scipy import ndimage as ndi

    yy, xx = np.mgrid[0:96, 0:96] / 96
    disc = ndi.gaussian_filter((np.hypot(xx - 0.5, yy - 0.5) < 0.47).astype(float), blur)
    cf = np.stack([200 * disc, 90 * disc, 30 * disc], axis=-1).astype(np.uint8)
    fa = (60 * disc).astype(np.uint8)
    score = pair_alignment(cf, fa)
    assert np.isnan(score) or score < 0.02, score


def test_a_single_pair_has_no_floor_and_a_blank_pair_no_score():
    cfs, fas = synthetic_pairs(1, 64)
    registered, mismatched = alignments_with_floor(cfs, fas)
    assert np.isfinite(registered[0]) and np.isnan(mismatched[0])
    assert np.isnan(pair_alignment(np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)))


def test_laplacian_pyramid_reconstructs_the_image():
    image = np.random.default_rng(0).uniform(0, 255, (64, 64, 3)).astype(np.float32)
    levels = metrics.laplacian_pyramid(image, len(metrics.pyramid_sizes(64)))
    assert [lv.shape[0] for lv in levels] == [64, 32, 16] == metrics.pyramid_sizes(64)
    recon = levels[-1]
    for band in reversed(levels[:-1]):
        up = np.zeros_like(band)
        up[::2, ::2] = recon
        recon = band + metrics._blur(up, gain=2.0)
    np.testing.assert_allclose(recon, image, atol=1e-3)


def test_wasserstein_1d_is_exact_for_equal_sizes_and_close_otherwise():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(0)
    a, b, c = rng.normal(0, 1, (400, 2)), rng.normal(0.7, 1, (400, 2)), rng.normal(0.7, 1, (1000, 2))
    w = metrics.wasserstein_1d(a, b)
    assert w == pytest.approx([wasserstein_distance(a[:, j], b[:, j]) for j in range(2)], rel=1e-9)
    w = metrics.wasserstein_1d(a, c)
    assert w == pytest.approx([wasserstein_distance(a[:, j], c[:, j]) for j in range(2)], abs=0.02)


def _descriptors(images, per_image, seed):
    rng = np.random.default_rng(seed)
    return np.concatenate([metrics.swd_descriptors(im, per_image, rng) for im in images], axis=1)


def test_swd_identical_vs_same_kind_vs_different():
    cfs, _ = synthetic_pairs(8, 64, seed=0)
    other_cfs, _ = synthetic_pairs(8, 64, seed=1)
    noise = [np.random.default_rng(k).integers(0, 256, (64, 64, 3), dtype=np.uint8) for k in range(8)]
    ref = _descriptors(cfs, 64, seed=0)
    assert ref.shape == (3, 8 * 64, 7 * 7 * 3)
    same = metrics.swd_per_level(ref, ref, 3, seed=0)
    kin = metrics.swd_per_level(ref, _descriptors(other_cfs, 64, seed=1), 3, seed=0)
    far = metrics.swd_per_level(ref, _descriptors(noise, 64, seed=2), 3, seed=0)
    assert max(same) == pytest.approx(0.0, abs=1e-9)
    assert np.mean(kin) < 0.5 * np.mean(far), (kin, far)
    assert all(k < f for k, f in zip(kin, far))


def test_swd_of_grey_images_and_descriptor_budget():
    _, fas = synthetic_pairs(2, 32)
    desc = _descriptors(fas, 16, seed=0)
    assert desc.shape == (2, 32, 49)  # 32 px: levels 32 and 16; one channel
    assert metrics.descriptors_per_image(16) == 128
    assert metrics.descriptors_per_image(10_000) == 16
    assert metrics.descriptors_per_image(1000) == 33


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="needs torch-fidelity (the [fid] extra)")
def test_fid_and_kid():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (600, 8))
    b = rng.normal(0, 1, (600, 8))
    shifted = b + 2.0
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, mean moved by 2 in each of 8 dims: FID = |dmu|^2 = 32 (plus sampling noise)
    assert metrics.frechet_distance(a, shifted) == pytest.approx(32.0, rel=0.1)
    assert metrics.frechet_distance(a, b) < 1.0
    kid_same, _ = metrics.kernel_inception_distance(a, b, seed=0, subsets=20, subset_size=200)
    kid_far, kid_std = metrics.kernel_inception_distance(a, shifted, seed=0, subsets=20, subset_size=200)
    assert abs(kid_same) < 0.05 < kid_far and kid_std >= 0
    assert np.isnan(metrics.kernel_inception_distance(a[:1], b, seed=0)[0])


def test_ssim_psnr_on_identical_and_noisy_pairs():
    cfs, fas = synthetic_pairs(1, 64)
    cf, fa = cfs[0], fas[0]
    assert metrics.ssim(cf, cf) == pytest.approx(1.0)
    assert metrics.ssim(fa, fa) == pytest.approx(1.0)
    assert metrics.psnr(cf, cf) == metrics.PSNR_CAP_DB
    noisy = np.clip(fa.astype(int) + np.random.default_rng(0).integers(-20, 21, fa.shape), 0, 255).astype(np.uint8)
    assert metrics.ssim(fa, noisy) < 0.9
    assert 20 < metrics.psnr(fa, noisy) < 30  # uniform noise of +-20 grey levels: about 24.6 dB


def test_summaries():
    assert metrics.mean_std([1.0, 3.0, float("nan")]) == {"mean": 2.0, "std": 1.0, "n": 2}
    assert metrics.mean_std([]) == {"mean": None, "std": None, "n": 0}
    assert metrics.normalised_alignment(0.3, 0.5, 0.1) == pytest.approx(0.5)
    assert metrics.normalised_alignment(0.3, 0.1, 0.1) is None
    assert metrics.normalised_alignment(None, 0.5, 0.1) is None
