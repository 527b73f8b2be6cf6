"""cffa_ray/vessel_agreement.py: the differentiable vessel Dice agrees with evaluate's judge on real
synthetic pairs, and one guided step through the tiny-retina VAE decoder raises it."""
import numpy as np
import pytest
import torch
from PIL import Image

from cffa_ray.evaluate.vessels import alignments_with_floor
from cffa_ray.synth import write_synthetic_pairs
from cffa_ray.vessel_agreement import derivative_kernels, ridge_map, vessel_dice, vessel_guidance


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """24 synthetic pairs at 64 px: (cf, fa) uint8 lists and as tensors in [-1, 1]."""
    folder = tmp_path_factory.mktemp("pairs")
    write_synthetic_pairs(folder, 24, 64, seed=5)
    cfs, fas = ([np.asarray(Image.open(p).convert("RGB")) for p in sorted((folder / m).glob("*.png"))]
                for m in ("cf", "fa"))
    as_tensor = lambda xs: torch.tensor(np.stack(xs)).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
    return cfs, fas, as_tensor(cfs), as_tensor(fas)


def test_second_derivative_kernels_measure_a_parabola():
    y, x = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")
    image = (0.5 * 3 * (x - 10) ** 2 + 2 * (x - 10) * (y - 10) - 0.5 * (y - 10) ** 2)[None, None]
    k = derivative_kernels(1.5)
    h = torch.nn.functional.conv2d(image, k)[0, :, 3, 3] / 1.5 ** 2  # centre, away from the borders
    assert torch.allclose(h, torch.tensor([3.0, -1.0, 2.0]), rtol=0.05)  # xx, yy, xy (sampled kernels: 3% low)


def test_ridge_maps_see_dark_and_bright_lines_apart():
    image = torch.zeros(1, 1, 32, 32)
    image[..., 10, :] = 1.0   # a bright horizontal line
    image[..., :, 22] = -1.0  # a dark vertical one
    bright, dark = ridge_map(image, (1.0,), dark=False)[0, 0], ridge_map(image, (1.0,), dark=True)[0, 0]
    assert bright[10, 5] > 10 * bright[5, 22] and dark[5, 22] > 10 * dark[10, 5]


def test_registered_pairs_agree_more_than_mismatched_ones_as_the_judge_says(pairs):
    cfs, fas, cf, fa = pairs
    registered, mismatched = vessel_dice(cf, fa), vessel_dice(cf, fa.roll(1, 0))
    assert registered.mean() > 2 * mismatched.mean(), (registered.mean(), mismatched.mean())
    judged, _ = alignments_with_floor(cfs, fas)
    assert np.corrcoef(registered.numpy(), np.array(judged))[0, 1] > 0.4  # 0.62 when measured


def test_a_guided_step_makes_the_decoded_pair_agree_more(pairs):
    from cffa_ray.models.base import load_base
    from cffa_ray.models.vae import decode_latents, encode_images

    vae = load_base("dual_unet", "", "tiny-retina").vae.eval()
    _, _, cf, fa = pairs
    with torch.no_grad():
        x0_cf = encode_images(vae, cf[:6], None, False)
        x0_fa = encode_images(vae, fa.roll(1, 0)[:6], None, False)  # unrelated trees: room to agree
    ab = torch.tensor(0.5)
    g = torch.Generator().manual_seed(0)
    eps_cf, eps_fa = torch.randn(x0_cf.shape, generator=g), torch.randn(x0_fa.shape, generator=g)
    x_t = [ab.sqrt() * x0 + (1 - ab).sqrt() * e for x0, e in ((x0_cf, eps_cf), (x0_fa, eps_fa))]
    decode = lambda z: decode_latents(vae, z)  # noqa: E731

    def agreement(e_cf, e_fa):
        x0 = [(x - (1 - ab).sqrt() * e) / ab.sqrt() for x, e in zip(x_t, (e_cf, e_fa))]
        with torch.no_grad():
            return vessel_dice(decode(x0[0]), decode(x0[1]))

    assert vessel_guidance(*x_t, eps_cf, eps_fa, ab, 0.0, decode) == (eps_cf, eps_fa)
    before = agreement(eps_cf, eps_fa)
    after = agreement(*vessel_guidance(*x_t, eps_cf, eps_fa, ab, 0.05, decode))
    assert (after > before).all(), (before, after)
