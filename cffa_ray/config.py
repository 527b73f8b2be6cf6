"""The settings shared by the jobs: the model (ModelConfig, recorded in every checkpoint), the choices
of every flag, the loss defaults, and the checks the jobs' configs share.

Each job's own settings are a dataclass beside the job (train/config.py, generate/config.py,
evaluate/config.py), built the same way: each dataclass field is a CLI flag (same name,
`--field_name`), a key in the dict that Ray workers receive, and a key in the JSON records written
next to checkpoints. `help` lives in the field metadata so the CLI, the README and the workers
never drift apart. Validation happens once, in `validate()`, and raises `ConfigError` with a
message that names the flag.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, fields
from typing import Any

from cffa_ray.errors import ConfigError
from cffa_ray.flags import flag

MODELS = ("dual_unet", "joint_sdxl")
PRESETS = {"dual_unet": ("tiny", "tiny-retina", "sd15-random"),
           "joint_sdxl": ("tiny-sdxl", "tiny-retina-joint", "sdxl-random")}
DEFAULT_BASE_MODEL = {
    "dual_unet": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "joint_sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
# The base model family of each design, and what a diffusers folder of that family must hold.
FAMILY = {"dual_unet": "sd15", "joint_sdxl": "sdxl"}
BASE_FOLDER_PARTS = {
    "sd15": ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer", "scheduler"),
    "sdxl": ("unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
             "tokenizer", "tokenizer_2", "scheduler"),
}
MIXED_PRECISION = ("no", "fp16", "bf16")
ZERO_STAGES = (0, 1, 2, 3)
SCHEDULERS = ("ddim", "dpm++")
GENERATION_MODES = ("noise", "from_data")
FA_NOISES = ("same", "negated")
GUIDANCE_TARGETS = ("latent_edges", "vessels")  # what --struct_guidance makes agree (vessel_agreement.py)
PNG_LAYOUTS = ("sharded", "seed")
PNG_LAYOUT_ALIASES = {"numbered": "seed"}  # the name before the issue spelt out `seed`
LOSS_WEIGHTINGS = ("alpha_bar", "none")
# The loss settings (TrainConfig's flags of these names) and their defaults: the one source of both.
# loss_weighting alpha_bar was chosen by measurement (BENCHMARKS.md#quality); seed B had no structure term.
LOSS_DEFAULTS = {"hf_lambda": 0.5, "struct_lambda": 0.3, "offset_noise_strength": 0.1, "loss_weighting": "alpha_bar"}
DESIGN_LOSS_DEFAULTS = {"dual_unet": LOSS_DEFAULTS, "joint_sdxl": {**LOSS_DEFAULTS, "struct_lambda": 0.0}}
LORA_TARGET_CHOICES = ("to_q", "to_k", "to_v", "to_out.0")


TRAIN_TIMESTEPS = 1000  # the SD1.5 / SDXL noise schedule: a sampler can take at most this many steps


def check_sampling_steps(flag_name: str, steps: int) -> None:
    if not 0 < steps <= TRAIN_TIMESTEPS:
        raise ConfigError(f"--{flag_name} {steps} must be in 1..{TRAIN_TIMESTEPS} (the noise schedule's length)")


AUTO = "auto"


def auto_or_int(text: str) -> str | int:
    """argparse type of --model_batch: a positive integer or `auto`."""
    return AUTO if str(text).strip().lower() == AUTO else int(text)


def parse_concurrency(value: str | int) -> tuple[int, int | None] | str:
    """--concurrency: `auto`, `N` (a fixed pool) or `MIN-MAX` (an autoscaling pool) -> "auto" | (min, max)."""
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    try:
        low, dash, high = text.partition("-")
        bounds = (int(low), int(high) if dash else int(low))
    except ValueError:
        raise ConfigError(f"--concurrency {value!r}: give a number of model actors (4), a range (1-8) or auto")
    if bounds[0] <= 0 or bounds[1] < bounds[0]:
        raise ConfigError(f"--concurrency {value!r}: need 1 <= MIN <= MAX, e.g. 1-8")
    return bounds


RESOURCE_FLAGS = {"CPU": "--cpus_per_worker / --cpus_per_actor", "GPU": "--use_gpu"}
RESOURCES_HELP = ("custom Ray resources {who} asks for, as JSON: '{{\"gpu_24gb\": 1}}' places {them} on the nodes "
                  "of cluster.yaml's gpu_24gb type, whose `resources` offer it (on an autoscaling cluster such nodes "
                  "are started on demand)")


def parse_resources(flag_name: str, text: str | None) -> dict[str, float]:
    """--worker_resources: a JSON object of custom Ray resources -> {name: amount}.

    Args:
        flag_name: the flag, named in errors.
        text: the flag's value (None: no custom resources).
    Returns:
        {resource name: amount}; CPU and GPU have flags of their own, amounts follow Ray's rule (a
        fraction up to 1, whole numbers above).
    Raises:
        ConfigError: not a JSON object of custom resources with such amounts.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"--{flag_name} {text!r}: give a JSON object of custom Ray resources, e.g. "
                          "'{\"gpu_24gb\": 1}'")
    for name, amount in value.items():
        if name in RESOURCE_FLAGS or name in ("memory", "object_store_memory") or ":" in name:
            fix = f"use {RESOURCE_FLAGS[name]}" if name in RESOURCE_FLAGS else "give custom resources only"
            raise ConfigError(f"--{flag_name}: {name} is not a custom resource of a node type; {fix}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) \
                or amount <= 0 or (amount > 1 and amount != int(amount)):
            raise ConfigError(f"--{flag_name}: {name} {amount!r} must be a fraction up to 1 or a whole number "
                              "(Ray's rule for resource amounts)")
    return {str(k): float(v) for k, v in value.items()}


STRICT_HELP = ("stop with an error instead of a warning for pairs whose CF and FA differ in size or shape, "
               "non-square images, images much smaller than --resolution, greyscale CF or colour FA images, "
               "and (training) a dataset too small to hold out validation pairs")


def check_positive(cfg: Any, *names: str, allow_zero: bool = False) -> None:
    """Each named setting is > 0 (>= 0 with `allow_zero`), or a ConfigError naming the flag."""
    for name in names:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"--{name} {value} must be {'>=' if allow_zero else '>'} 0")


def check_folder_name(flag_name: str, value: str) -> None:
    """A plain folder name: letters of any script, digits, . _ - (starting with a letter or digit; no '/',
    no '..'), or a ConfigError naming the flag. ('rün' and '実験1' are fine: paths are Unicode everywhere.)"""
    composed = unicodedata.normalize("NFC", value or "")  # a macOS-typed 'ü' is u + a combining mark
    if not composed or not re.fullmatch(r"[^\W_][\w.-]*", composed) or ".." in composed:
        raise ConfigError(f"--{flag_name} {value!r} must be a plain folder name (letters of any alphabet, digits, "
                          ". _ -, starting with a letter or digit), it may not contain '/' or '..' or escape its "
                          "parent folder")


def check_prediction_type(scheduler_config: dict, base_model: str) -> None:
    """The losses and samplers assume a noise-predicting (epsilon) UNet."""
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise ConfigError(f"--base_model {base_model}: prediction_type "
                          f"{scheduler_config['prediction_type']!r} is not supported; use an epsilon model")


def check_finite(cfg: Any) -> None:
    """argparse's float() accepts 'nan' and 'inf'; no float setting here means anything with them."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} {value} must be a finite number")


@dataclass
class ModelConfig:
    """What builds the model; recorded in every checkpoint so generation can rebuild it."""

    model: str = flag("dual_unet", f"model design: {' | '.join(MODELS)}", choices=MODELS)
    base_model: str | None = flag(
        None,
        "diffusers-format base model: a local folder or a Hugging Face hub id",
        default_text=f"{DEFAULT_BASE_MODEL['dual_unet']} for dual_unet, "
                     f"{DEFAULT_BASE_MODEL['joint_sdxl']} for joint_sdxl",
    )
    preset: str | None = flag(
        None,
        "a built-in base instead of --base_model (for trials and tests): tiny | sd15-random (dual_unet), "
        "tiny-sdxl | sdxl-random (joint_sdxl) are built with seeded random weights; tiny-retina (dual_unet, "
        "64 px) and tiny-retina-joint (joint_sdxl, 64 px) have a VAE and UNet pre-trained on synthetic "
        "retinas, shipped with the package",
        default_text="none: load --base_model",
    )
    resolution: int = flag(512, "side of the square CF and FA images, in pixels")
    unet_lora_rank: int = flag(16, "LoRA rank on the UNet attention projections")
    unet_lora_alpha: float = flag(16.0, "LoRA alpha (scale = alpha / rank)")
    lora_targets: str = flag("to_q,to_k,to_v", "attention projections that get LoRA, comma-separated, from "
                                                "to_q, to_k, to_v, to_out.0 (q,k,v: 2,390,016 parameters per "
                                                "SD1.5 UNet at rank 16; with to_out.0: 3,188,736)")

    def validate_model(self) -> None:
        check_finite(self)
        if self.model not in MODELS:
            raise ConfigError(f"--model {self.model!r} is unknown; choose one of {', '.join(MODELS)}")
        if self.preset is not None and self.preset not in PRESETS[self.model]:
            raise ConfigError(
                f"--preset {self.preset!r} does not fit --model {self.model}; "
                f"choose one of {', '.join(PRESETS[self.model])}"
            )
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"--resolution {self.resolution} must be a positive multiple of 8")
        if self.unet_lora_rank <= 0:
            raise ConfigError(f"--unet_lora_rank {self.unet_lora_rank} must be > 0")
        if self.unet_lora_alpha <= 0:
            raise ConfigError(f"--unet_lora_alpha {self.unet_lora_alpha} must be > 0")
        unknown = [t for t in self.lora_target_list if t not in LORA_TARGET_CHOICES]
        if unknown or not self.lora_target_list:
            raise ConfigError(f"--lora_targets {self.lora_targets!r}: choose some of {', '.join(LORA_TARGET_CHOICES)}, "
                              "comma-separated")

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def base_model_or_default(self) -> str:
        return self.base_model or DEFAULT_BASE_MODEL[self.model]

    def model_record(self) -> dict:
        """The subset of settings that rebuilds this model (written beside each checkpoint)."""
        return {f.name: getattr(self, f.name) for f in fields(ModelConfig)}
