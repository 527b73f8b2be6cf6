"""The latent cache and the training passes: the same losses as the pixel path, and a dataset the
workers can prefetch from."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from cffa_ray.config import ModelConfig
from cffa_ray.models.build import build_model
from cffa_ray.train.config import TrainConfig
from cffa_ray.train.datasets import repeats_for, shuffled_epochs


def pixel_batch(n=2, resolution=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(0, 256, (n, 3, resolution, resolution), generator=g, dtype=torch.uint8)
            for k in ("cf", "fa")}


@pytest.mark.parametrize("model_name, preset", [("dual_unet", "tiny"), ("joint_sdxl", "tiny-sdxl")])
def test_cached_moments_give_the_pixel_paths_loss_on_the_same_noise(model_name, preset):
    torch.manual_seed(0)
    model = build_model(ModelConfig(model=model_name, preset=preset, resolution=32))
    batch = pixel_batch()
    with torch.no_grad():
        moments = type(model).cache_moments(model.vae, batch["cf"], batch["fa"])
        assert set(moments) == set(model.CACHE_COLUMNS)
        pixel = model(batch, generator=torch.Generator().manual_seed(5))
        cached32 = model(moments, generator=torch.Generator().manual_seed(5))
        cached16 = model({k: v.half() for k, v in moments.items()}, generator=torch.Generator().manual_seed(5))
    for key in pixel:
        # float32 moments: the very same computation
        torch.testing.assert_close(cached32[key], pixel[key], rtol=1e-6, atol=1e-7)
        # float16 as cached: the same up to the moments' rounding
        torch.testing.assert_close(cached16[key], pixel[key], rtol=2e-2, atol=1e-3)


def test_uint8_pixels_mean_what_normalised_floats_mean():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", resolution=32))
    batch = pixel_batch()
    as_float = {k: v.float() / 127.5 - 1 for k, v in batch.items()}
    with torch.no_grad():
        a = model(batch, generator=torch.Generator().manual_seed(1))
        b = model(as_float, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a["loss"], b["loss"])


def test_repeats_for_amortises_passes_within_a_byte_budget():
    assert repeats_for(14, 1000) == 147               # 14 pairs -> >= 2048 rows a pass
    assert repeats_for(5000, 1000) == 1               # large sets pass once
    assert repeats_for(14, 1.5 * 2**20) == 24         # 512 px uint8 pixels: 512 MiB / (14 x 1.5 MiB)
    assert repeats_for(1000, 2**30) == 1              # never below one epoch


def test_shuffled_epochs_are_permutations_of_the_whole_set():
    table = pa.table({"x": np.arange(10)})
    epochs = list(shuffled_epochs(table, copies=4, seed=0))
    assert len(epochs) == 4
    orders = [e["x"].to_pylist() for e in epochs]
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4  # each epoch its own order


@pytest.mark.slow
def test_training_datasets_cache_latents_and_prefetch(tmp_path):
    """Through Ray Data: decode -> VAE actors -> shuffled epochs, iterated with prefetching on."""
    import ray

    from cffa_ray.data import assign_split, discover_pairs
    from cffa_ray.synth import write_synthetic_pairs
    from cffa_ray.train.datasets import training_datasets

    write_synthetic_pairs(tmp_path / "p", 6, 32)
    records = assign_split(discover_pairs(str(tmp_path / "p")), 0.2, 0)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    cfg = TrainConfig(data=str(tmp_path / "p"), preset="tiny", resolution=32, batch_size=2)
    ray.init(num_cpus=3, include_dashboard=False)
    try:
        train_ds, val_ds, shuffle_buffer = training_datasets(cfg, train, val)
        assert shuffle_buffer == 0 and val_ds.count() == len(val) == 1
        seen = {}
        for batch in train_ds.iter_torch_batches(batch_size=2, prefetch_batches=4, drop_last=True):
            assert set(batch) == {"cf_moments", "fa_moments"}
            assert batch["cf_moments"].dtype == torch.float16 and batch["cf_moments"].shape == (2, 8, 4, 4)
            for row in batch["cf_moments"]:
                key = row.numpy().tobytes()
                seen[key] = seen.get(key, 0) + 1
        copies = repeats_for(len(train), 1)  # tiny rows: the row-count rule decides
        assert len(seen) == len(train) and set(seen.values()) == {copies}  # every pair, every epoch
    finally:
        ray.shutdown()
