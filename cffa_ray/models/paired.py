"""Both modalities through the shared frozen base in one batched forward, each half with its own LoRA.

The dual design trains two peft-wrapped UNets over one set of frozen base weights. Run apart, every
base op is dispatched twice per step (forward and backward); a GPU step is launch-bound, so that is
the larger half of its cost. Here a third view of the same base holds, in place of each LoRA-targeted
Linear, a `PairedLoRALinear`: rows [0, n) of its input take the CF adapter, rows [n, 2n) the FA one,
in two bmm calls over both halves at once. peft cannot do this in training (its mixed-adapter
batches refuse it), hence this small layer.

The adapters' weights stay the peft modules' own Parameters (nothing is copied, and peft's checkpoint
format, export and merging are untouched); this view only reads them. It holds them unregistered,
so the module tree and state dict name each LoRA weight once, under its peft model.
"""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER = "default"  # peft's name of the one adapter each UNet has


class PairedLoRALinear(nn.Module):
    """A frozen Linear plus two LoRA adapters, one per half of the batch.

    Args:
        base: the frozen Linear (shared with both peft UNets).
        halves: the peft LoRA layers wrapping that Linear in the first and the second UNet.
    """

    def __init__(self, base: nn.Linear, halves: tuple[LoraLayer, LoraLayer]):
        super().__init__()
        self.base = base
        for layer in halves:
            if not isinstance(layer.lora_dropout[ADAPTER], nn.Identity):
                raise ValueError("PairedLoRALinear supports LoRA without dropout only")
        scalings = {layer.scaling[ADAPTER] for layer in halves}
        if len(scalings) != 1:
            raise ValueError("both adapters must have the same LoRA scaling (rank and alpha)")
        self.scaling = scalings.pop()
        # (A, B) nn.Linear modules per half; a plain tuple, so nn.Module does not register them twice
        self.loras = tuple((layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]) for layer in halves)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        halves = x.reshape(2, -1, x.shape[-1])  # [2, n*L, in]: the first half's rows, then the second's
        a = torch.stack([A.weight for A, _ in self.loras]).transpose(1, 2)  # [2, in, r]
        b = torch.stack([B.weight for _, B in self.loras]).transpose(1, 2)  # [2, r, out]
        if a.dtype != x.dtype:  # fp32 adapters on a low-precision base without autocast: as peft does
            delta = torch.bmm(torch.bmm(halves.to(a.dtype), a), b) * self.scaling
            return y + delta.view(y.shape).to(y.dtype)
        # y + scaling * (x A) B, the add and the scaling fused into one baddbmm
        out = torch.baddbmm(y.reshape(2, -1, y.shape[-1]), torch.bmm(halves, a), b, alpha=self.scaling)
        return out.view(y.shape)


def lora_layers(peft_model: nn.Module) -> dict[str, LoraLayer]:
    """{name inside the wrapped UNet: peft LoRA layer} of a peft model."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix): m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def paired_view(base: nn.Module, first: nn.Module, second: nn.Module) -> nn.Module:
    """`base` (an unwrapped copy of the UNet sharing the frozen weights of both peft models) with every
    LoRA-targeted Linear replaced by a PairedLoRALinear over `first`'s and `second`'s adapters; returns it."""
    firsts, seconds = lora_layers(first), lora_layers(second)
    if set(firsts) != set(seconds):
        raise ValueError("both UNets must carry LoRA on the same modules")
    for name, layer in firsts.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = base.get_submodule(owner_name) if owner_name else base
        linear = getattr(owner, leaf)
        if linear.weight is not layer.base_layer.weight:
            raise ValueError(f"{name}: the paired view must share the peft models' frozen weights")
        setattr(owner, leaf, PairedLoRALinear(linear, (layer, seconds[name])))
    return base


def is_zero3_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned `module`'s parameters (it gathers them per module,
    so a layer that reads another module's weights, as PairedLoRALinear does, would see empty shards)."""
    return any(hasattr(p, "ds_status") for p in module.parameters())


class PairedMergedLinear(nn.Module):
    """A Linear with one merged weight per half of the batch (sampling: LoRA folded in, no adapter).

    Args:
        weight: [2, out, in], the first half's merged weight and the second's.
        bias: [out] or None (LoRA leaves the bias alone: both halves share it).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features = weight.shape[1]
        self.weight = nn.Parameter(weight.transpose(1, 2).contiguous(), requires_grad=False)  # [2, in, out]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = x.reshape(2, -1, x.shape[-1])
        y = torch.bmm(halves, self.weight) if self.bias is None else torch.baddbmm(self.bias, halves, self.weight)
        return y.view(*x.shape[:-1], self.out_features)


@torch.no_grad()
def paired_merged(first: nn.Module, second: nn.Module) -> nn.Module:
    """One plain UNet for sampling both halves in one call: `second`'s base with every LoRA-targeted Linear
    replaced by a PairedMergedLinear holding the base weight plus each peft model's LoRA, merged (in the
    weights' dtype, as peft's merge_and_unload does). The other layers carry no LoRA and are the same
    in both models, so they are held once. Consumes both peft models."""
    firsts, seconds = lora_layers(first), lora_layers(second)
    if set(firsts) != set(seconds):
        raise ValueError("both UNets must carry LoRA on the same modules")
    merged = {}
    for name, layer in seconds.items():
        base = layer.base_layer
        merged[name] = (torch.stack([firsts[name].base_layer.weight + firsts[name].get_delta_weight(ADAPTER),
                                     base.weight + layer.get_delta_weight(ADAPTER)]), base.bias)
    unet = second.unload()  # the base without LoRA layers
    for name, (weight, bias) in merged.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = unet.get_submodule(owner_name) if owner_name else unet
        setattr(owner, leaf, PairedMergedLinear(weight, bias))
    return unet
