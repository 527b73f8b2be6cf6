"""One batched forward of both modalities over the shared base (models/paired.py) computes what the two
UNets computed apart: the same losses and the same LoRA gradients, on the tiny preset."""
import pytest
import torch

from cffa_ray.config import ModelConfig
from cffa_ray.models.build import build_model
from tests.helpers import randomise_lora


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="tiny", resolution=64, unet_lora_rank=4, unet_lora_alpha=8))
    randomise_lora(m.unet_cf, 0.3, seed=1)
    randomise_lora(m.unet_fa, 0.3, seed=2)  # two different adapters, as after training
    return m


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"cf": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "fa": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1}


def _loss_and_grads(model, batched: bool):
    model.batched = batched
    model.zero_grad(set_to_none=True)
    out = model(_batch(), generator=torch.Generator().manual_seed(5))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.item() for k, v in out.items()}, grads


def test_batched_forward_equals_the_two_unets_apart(model):
    apart, grads_apart = _loss_and_grads(model, batched=False)
    together, grads_together = _loss_and_grads(model, batched=True)
    model.batched = True
    assert apart.keys() == together.keys()
    for k in apart:
        assert together[k] == pytest.approx(apart[k], abs=1e-5, rel=1e-5), k
    assert grads_apart.keys() == grads_together.keys() and len(grads_apart) > 0
    for name, g in grads_apart.items():
        torch.testing.assert_close(grads_together[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads_together.items() if n.startswith("unet_fa."))


def test_the_paired_view_holds_no_weight_of_its_own(model):
    shared = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n.startswith("unet_cf.")}
    assert all(id(p) in shared for p in model.unet_pair.parameters())
    assert not any("unet_pair" in n for n, p in model.named_parameters() if p.requires_grad)
