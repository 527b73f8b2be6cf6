"""peft LoRA on the UNet attention projections, and the second UNet that shares the frozen base."""
from __future__ import annotations

import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model

# The query, key and value projections of every attention (self and cross), as the seed counts its
# parameters (2,390,016 per SD1.5 UNet at rank 16); to_out.0 is the usual fourth (3,188,736).
LORA_TARGETS = ("to_q", "to_k", "to_v")


def lora_config(rank: int, alpha: float, targets=LORA_TARGETS) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)


def with_lora(unet: torch.nn.Module, rank: int, alpha: float, targets=LORA_TARGETS) -> PeftModel:
    """The UNet wrapped with one trainable LoRA adapter; the base weights stay frozen.

    peft initialises B = 0, so a fresh adapter leaves the UNet's output unchanged.
    """
    return get_peft_model(unet, lora_config(rank, alpha, targets))


def share_frozen_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Make `dst` (a copy of `src`) use the very same Parameter objects, so the frozen base is held once.

    Call before attaching LoRA: each UNet then gets its own adapter on top of one set of base weights.
    """
    src_params = dict(src.named_parameters())
    for name, _ in list(dst.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = dst.get_submodule(owner_name) if owner_name else dst
        owner._parameters[leaf] = src_params[name]


def twin(unet: torch.nn.Module, share_base: bool) -> torch.nn.Module:
    """A second UNet with the same base weights, shared in memory when `share_base`."""
    other = copy.deepcopy(unet)
    if share_base:
        share_frozen_weights(unet, other)
    return other
