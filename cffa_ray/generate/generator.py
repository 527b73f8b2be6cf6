"""The Ray Data model actor: loads a checkpoint once, turns batches of noise into images.

Input batch (numpy):   pair_id int64 [B], seed int64 [B], noise float32 [B, *noise_shape]
                       (from_data) src_cf, src_fa uint8 [B, 3, R, R]
Output batch:          the input's other columns, plus
                       cf, fa      uint8 [B, R, R, 3]
                       done_at     float64 [B]  wall clock when this call's pairs were finished
                       actor       object [B]   which actor made them (for per-actor steady-state rates)
                       gpu_peak    int64 [B]    peak GPU bytes this actor has used so far (0 on CPU)

Everything on the CPU side (noise, decoding real pairs, PNG encoding, parquet) happens in other
Ray Data stages; the call itself is GPU work plus one device-to-host copy of uint8 images, and
Ray batches the next call's inputs while this one runs (max_concurrent_calls_per_actor=2).
"""
from __future__ import annotations

import os
import socket
import time

import numpy as np

from cffa_ray.faults import maybe_fail
from cffa_ray.io import local_copy

OOM_HINT = "--model_batch"


class ModelBatchTooLarge(RuntimeError):
    """Sampling ran out of memory: the message names --model_batch and a value to try."""


class PairGenerator:
    def __init__(self, checkpoint_dir: str, cfg: dict):
        # imported in the methods, in the actor's process: the driver, which only names this class, loads
        # neither torch (1.4 s of its start-up on 2 cores) nor diffusers and peft (~8 s)
        import torch

        from cffa_ray.models.build import load_for_generation
        from cffa_ray.models.inference import prepare_for_sampling
        from cffa_ray.sampling import sample_in_fixed_batches, warm_up

        self.sample = sample_in_fixed_batches
        torch.set_grad_enabled(False)
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg["use_gpu"] else "cpu")
        model, record = load_for_generation(local_copy(checkpoint_dir))
        self.model = prepare_for_sampling(model, self.device, cfg["mixed_precision"], cfg["compile"])
        self.resolution = record["resolution"]
        self.actor = f"{os.getpid()}@{socket.gethostname()}"
        self.calls = 0
        if cfg["compile"]:
            seconds = warm_up(self.model, self.resolution, cfg["model_batch"], cfg["mixed_precision"])
            print(f"[cffa] UNets compiled in {seconds:.0f}s (once per actor)", flush=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from cffa_ray.batches import as_tensor

        cfg = self.cfg
        self.calls += 1
        maybe_fail("generate_batch", self.calls)
        sources = None
        if cfg["mode"] == "from_data":
            sources = (as_tensor(batch["src_cf"]), as_tensor(batch["src_fa"]))
        try:
            cf, fa = self.sample(
                self.model, as_tensor(batch["noise"]), cfg["model_batch"], init_images=sources,
                steps=cfg["steps"], scheduler=cfg["scheduler"], strength=cfg["strength"],
                mixed_precision=cfg["mixed_precision"], fa_noise=cfg["fa_noise"],
                struct_guidance=cfg["struct_guidance"], struct_guidance_target=cfg["struct_guidance_target"],
                as_uint8=True)
        except RuntimeError as e:  # torch.OutOfMemoryError on CUDA; a plain RuntimeError from the CPU allocator
            if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
                raise ModelBatchTooLarge(self._oom_message()) from None
            raise
        n = len(batch["pair_id"])
        out = {k: v for k, v in batch.items() if k not in ("noise", "src_cf", "src_fa")}
        out["cf"], out["fa"] = cf, fa
        out["done_at"] = np.full(n, time.time())
        out["actor"] = np.full(n, self.actor, dtype=object)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        out["gpu_peak"] = np.full(n, peak, dtype=np.int64)
        return out

    def _oom_message(self) -> str:
        import torch

        mb = self.cfg["model_batch"]
        where = "the CPU"
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            where = f"a {torch.cuda.get_device_name(self.device)} ({total:.0f} GiB)"
        return (f"out of memory sampling {mb} pairs at once on {where}: "
                f"rerun with {OOM_HINT} {max(1, mb // 2)} (or auto) into a new --output_dir")
