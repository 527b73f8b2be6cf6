"""Build a design: base parts (folder, hub id or preset) + LoRA adapters, for training or from a checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

from cffa_ray.config import ModelConfig
from cffa_ray.models.base import load_base
from cffa_ray.models.designs import design
from cffa_ray.models.dual_unet import DualUNet
from cffa_ray.models.interface import PairModel
from cffa_ray.models.joint_sdxl import JointSDXL
from cffa_ray.run_layout import MODEL_RECORD


def design_class(name: str) -> type[PairModel]:
    """The PairModel subclass of design `name` (also for class-level hooks such as `cache_moments`);
    what a driver needs without the model is in cffa_ray.models.designs."""
    return {"dual_unet": DualUNet, "joint_sdxl": JointSDXL}[design(name).name]


def build_model(cfg: ModelConfig, *, share_base: bool = True, **loss) -> PairModel:
    """Base parts (folder, hub id or preset) + fresh LoRA adapters; `loss`: TrainConfig.loss_settings()."""
    parts = load_base(cfg.model, cfg.base_model_or_default, cfg.preset)
    return design_class(cfg.model)(parts, cfg.unet_lora_rank, cfg.unet_lora_alpha, resolution=cfg.resolution,
                                   lora_targets=cfg.lora_target_list, share_base=share_base, **loss)


def load_for_generation(checkpoint_dir: str | Path) -> tuple[PairModel, dict]:
    """Rebuild the base a checkpoint was trained on and load its LoRA adapters.

    The UNets get separate base weights here, so each LoRA can be merged into its own copy
    (`models.inference.prepare_for_sampling`).
    """
    record = json.loads((Path(checkpoint_dir) / MODEL_RECORD).read_text())
    if "lora_targets" not in record:  # checkpoints from before --lora_targets: peft's own record says
        adapter = json.loads((Path(checkpoint_dir) / design(record["model"]).adapters[0]
                              / "adapter_config.json").read_text())
        record["lora_targets"] = ",".join(sorted(adapter["target_modules"]))
    cfg = ModelConfig(**{k: record[k] for k in ModelConfig.__dataclass_fields__})
    model = build_model(cfg, share_base=False)
    for folder, peft_model in model.adapters().items():
        peft_model.load_adapter(str(Path(checkpoint_dir) / folder), adapter_name="default", is_trainable=False)
    return model, record
