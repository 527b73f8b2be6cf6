"""A trained model made ready to sample fast and in little memory (generation actors, benchmarks).

What changes against the training form, and why:

* each LoRA is merged into its UNet and peft's wrappers are dropped: no adapter matmuls per call;
* the frozen weights are held in the compute dtype (bf16 / fp16) and sampled without autocast: half
  the weight memory and no casts on every call; norm layers keep fp32 parameters and run in fp32
  (their input cast up, their result down), as CUDA autocast would run them;
* the dual design's two LoRAs become per-half weights of one UNet (DualUNet.merge_lora): both
  modalities in one batched call, one copy of the base weights;
* q, k, v projections are fused into one matmul (diffusers' `fuse_qkv_projections`) where no
  per-half weights hold them, and the unfused ones it keeps are dropped; SDPA kept;
* the VAE decodes one image at a time (diffusers' slicing), so decode memory does not grow with
  --model_batch; the SDXL VAE stays fp32 when the compute dtype is fp16 (it overflows there), bf16
  has fp32's range and is safe;
* optionally the UNets are compiled with torch.compile (fixed shapes: one graph per actor).
"""
from __future__ import annotations

import torch

from cffa_ray.models.interface import PairModel
from cffa_ray.models.paired import PairedMergedLinear

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cast(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Move and cast floating-point weights (diffusers' own `.to(dtype)` warns about fp32-only modules,
    which neither the UNet nor the VAE has)."""
    module.to(device)
    {torch.float32: module.float, torch.float16: module.half, torch.bfloat16: module.bfloat16}[dtype]()


def vae_dtype(vae, compute: torch.dtype) -> torch.dtype:
    """fp32 where the VAE is known to overflow in fp16 (its config says force_upcast: the SDXL VAE)."""
    if compute == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return compute


NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def fp32_norm_params(unet: torch.nn.Module) -> dict[torch.nn.Module, dict[str, torch.Tensor]]:
    """{norm layer: its parameters in fp32}, taken before the UNet is cast to a lower precision."""
    return {m: {k: p.detach().float().clone() for k, p in m.named_parameters(recurse=False)}
            for m in unet.modules() if isinstance(m, NORMS)}


def _input_to_fp32(module, args):
    return (args[0].float(), *args[1:])


def run_norms_in_fp32(norms: dict[torch.nn.Module, dict[str, torch.Tensor]], dtype: torch.dtype) -> None:
    """Give each norm layer back its fp32 parameters, once, and run it in fp32 (input cast up, result
    back to `dtype`): what CUDA autocast does for norms, without its per-call casts of weight and bias
    and without autocast's casts everywhere else (the weights already are in `dtype`)."""
    for module, params in norms.items():
        device = next(module.parameters()).device
        for name, value in params.items():
            setattr(module, name, torch.nn.Parameter(value.to(device), requires_grad=False))
        module.register_forward_pre_hook(_input_to_fp32)
        module.register_forward_hook(lambda m, args, out, dtype=dtype: out.to(dtype))


def drop_unfused_projections(unet: torch.nn.Module) -> int:
    """Delete the q/k/v projections that diffusers' `fuse_qkv_projections` keeps beside the fused ones
    (self-attention: to_q, to_k, to_v; cross-attention: to_k, to_v); SD1.5 holds 56M parameters fewer.

    Returns:
        the number of parameters dropped.
    """
    dropped = 0
    for module in unet.modules():
        if not getattr(module, "fused_projections", False):
            continue
        names = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
        for name in names:
            dropped += sum(p.numel() for p in getattr(module, name).parameters())
            delattr(module, name)
    return dropped


def prepare_for_sampling(model: PairModel, device: torch.device | str, mixed_precision: str = "no",
                         compile: bool = False, compile_backend: str = "inductor",
                         channels_last: bool = False) -> PairModel:
    """Merge, cast, fuse and (optionally) compile `model` in place for sampling on `device`; returns it.

    channels_last
    (the UNets' memory format) is for measuring: on an H100 it made eager SD1.5 slower (22.9% vs 25.0%).
    """
    dtype = DTYPES[mixed_precision]
    model.merge_lora()
    model.requires_grad_(False).eval()
    for unet in model.unets():
        norms = fp32_norm_params(unet) if dtype != torch.float32 else {}
        cast(unet, device, dtype)
        run_norms_in_fp32(norms, dtype)
        if not any(isinstance(m, PairedMergedLinear) for m in unet.modules()):  # fusing would mix the halves
            unet.fuse_qkv_projections()
            drop_unfused_projections(unet)
        if channels_last:
            unet.to(memory_format=torch.channels_last)
    cast(model.vae, device, vae_dtype(model.vae, dtype))
    model.vae.enable_slicing()
    model.to(device)  # buffers (prompt embeddings)
    if compile:
        for name in model.UNETS:
            setattr(model, name, torch.compile(getattr(model, name), backend=compile_backend, dynamic=False))
    return model
