"""--model_batch auto: the largest fixed sampling batch that fits one GPU, from a measured per-pair cost.

Peak memory of a sampling call grows linearly with the batch: a fixed part (weights, CUDA context,
workspace, the one-image VAE decode with slicing) plus a per-pair part (UNet activations). Two
measured calls, at batch 1 and batch 2, give both parts; `choose_model_batch` is the pure arithmetic.
"""
from __future__ import annotations

from cffa_ray.io import local_copy

GIB = 2**30
CPU_MODEL_BATCH = 8  # on CPU memory is not the limit; 8 amortises per-call costs well
MAX_AUTO_MODEL_BATCH = 16  # larger batches barely raise GPU throughput (B=16 vs 32: 25.0% vs 26.6% of peak)
HEADROOM = 0.80  # of the GPU's total memory: room for the allocator's fragmentation and compiled kernels


def choose_model_batch(total_bytes: int, fixed_bytes: int, per_pair_bytes: int,
                       headroom: float = HEADROOM, cap: int = MAX_AUTO_MODEL_BATCH) -> int:
    """The largest batch b <= cap with fixed + b * per_pair <= headroom * total; at least 1."""
    budget = headroom * total_bytes - fixed_bytes
    fits = int(budget // max(per_pair_bytes, 1)) if budget > 0 else 0
    return max(1, min(cap, fits))


def measure_sampling_memory(model, resolution: int, mixed_precision: str) -> tuple[int, int]:
    """(fixed bytes, bytes per pair) of one sampling call on this CUDA device, from batches of 1 and 2.

    One denoising step and the decode: peak memory does not grow with the number of steps.
    """
    import torch

    from cffa_ray.sampling import pair_noise, sample_pairs  # in the GPU task's process (see calibrate)

    peaks = []
    for batch in (1, 2):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        sample_pairs(model, pair_noise(model, resolution, 0, list(range(batch))), steps=1,
                     mixed_precision=mixed_precision)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    per_pair = max(peaks[1] - peaks[0], 1)
    return peaks[0] - per_pair, per_pair


def calibrate(checkpoint_dir: str, mixed_precision: str) -> dict:
    """Runs on one GPU (a Ray task): load the checkpoint as an actor would, measure, choose."""
    # imported here, in the task's process: the generation driver, which names this function, loads neither
    # torch (1.4 s) nor diffusers and peft (~8 s)
    import torch

    from cffa_ray.models.build import load_for_generation
    from cffa_ray.models.inference import prepare_for_sampling

    model, record = load_for_generation(local_copy(checkpoint_dir))
    prepare_for_sampling(model, "cuda", mixed_precision)
    fixed, per_pair = measure_sampling_memory(model, record["resolution"], mixed_precision)
    total = torch.cuda.get_device_properties(0).total_memory
    return {"model_batch": choose_model_batch(total, fixed, per_pair), "gpu": torch.cuda.get_device_name(0),
            "total_gib": total / GIB, "fixed_gib": fixed / GIB, "per_pair_gib": per_pair / GIB}
