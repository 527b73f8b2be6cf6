"""The one definition of every job's settings.

Each dataclass field is a CLI flag (same name, `--field_name`), a key in the dict that Ray
workers receive, and a key in the JSON records written next to checkpoints. `help` lives in the
field metadata so the CLI, the README and the workers never drift apart. Validation happens once,
in `validate()`, and raises `ConfigError` with a message that names the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

MODELS = ("dual_unet", "joint_sdxl")
PRESETS = {"dual_unet": ("tiny", "tiny-retina", "sd15-random"), "joint_sdxl": ("tiny-sdxl", "sdxl-random")}
DEFAULT_BASE_MODEL = {
    "dual_unet": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "joint_sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
MIXED_PRECISION = ("no", "fp16", "bf16")
ZERO_STAGES = (0, 1, 2, 3)
SCHEDULERS = ("ddim", "dpm++")
GENERATION_MODES = ("noise", "from_data")
FA_NOISES = ("same", "negated")
PNG_LAYOUTS = ("sharded", "seed")
PNG_LAYOUT_ALIASES = {"numbered": "seed"}  # the name before the issue spelt out `seed`
LOSS_WEIGHTINGS = ("alpha_bar", "none")
LORA_TARGET_CHOICES = ("to_q", "to_k", "to_v", "to_out.0")


class ConfigError(ValueError):
    """A bad flag value; the message names the flag and how to fix it."""


class RunStopped(RuntimeError):
    """A run ended early on an error that every retry would meet again; the message says why and what to do."""


class Interrupted(RuntimeError):
    """The user stopped a run (Ctrl-C); the message says how to go on from where it stopped."""


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


def join_path(base: str, *parts: str) -> str:
    """Join local paths and URIs (s3://bucket/x) alike."""
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def storage_default(name: str) -> str:
    """`name` under $CFFA_STORAGE (a shared or cloud prefix, set on cluster nodes), else a local folder."""
    root = os.environ.get("CFFA_STORAGE")
    return join_path(root, name) if root else name


def flag(default: Any, help: str, **extra: Any) -> Any:
    """A field that is also a CLI flag. `extra`: aliases, choices, required (shown as such in --help;
    `validate` enforces it), default_text (the default in words, where the value alone says too little)."""
    return field(default=default, metadata={"help": help, **extra})


STRICT_HELP = ("stop with an error instead of a warning for pairs whose CF and FA differ in size or shape, "
               "non-square images, images much smaller than --resolution, greyscale CF or colour FA images, "
               "and (training) a dataset too small to hold out validation pairs")


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
        "64 px) has a VAE and UNet pre-trained on synthetic retinas, shipped with the package",
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


@dataclass
class TrainConfig(ModelConfig):
    """`cffa train` / `jobs/train.py`."""

    data: str | None = flag(
        None,
        "pairs: a folder with cf/ and fa/ subfolders (same file stems pair up), "
        "or a manifest .csv/.parquet with columns cf_path, fa_path [, pair_id, split]; "
        "local paths or s3:// / gs:// URIs",
        required=True,
    )
    output_dir: str = flag(storage_default("runs"), "parent folder of run folders: local, or s3:// / gs://",
                           default_text="runs, or $CFFA_STORAGE/runs when CFFA_STORAGE is set")
    name: str = flag("cffa", "run name; the run folder is <output_dir>/<name>; rerunning resumes it",
                     aliases=("-n",))
    max_steps: int = flag(15000, "optimizer steps to train for")
    batch_size: int = flag(1, "pairs per worker per micro-step")
    gradient_accumulation_steps: int = flag(1, "micro-steps per optimizer step")
    lr: float = flag(1e-4, "AdamW learning rate of the LoRA weights")
    seed: int = flag(0, "seed for noise, timesteps, LoRA init and the train/validation split")
    hf_lambda: float = flag(0.5, "weight of the high-frequency loss on predicted x0")
    struct_lambda: float | None = flag(
        None, "weight of the Sobel structure loss between CF and FA (for joint_sdxl, > 0 compares the "
              "two halves of the joint latent)", default_text="0.3 for dual_unet, 0 for joint_sdxl")
    offset_noise_strength: float = flag(0.1, "offset noise strength (per-channel constant added to the noise)")
    loss_weighting: str = flag(
        "alpha_bar", "per-sample weight of the HF and structure terms on the predicted clean latent: alpha_bar "
                     "(fade them out at large t, where the prediction is mostly amplified noise; chosen by "
                     "measurement, BENCHMARKS.md#quality) | none (weight 1, the research design's literal form)",
        choices=LOSS_WEIGHTINGS)
    num_workers: int = flag(1, "Ray Train workers (one per GPU with --use_gpu)")
    use_gpu: bool = flag(False, "one GPU per worker, NCCL; otherwise CPU workers, gloo")
    cpus_per_worker: float = flag(1.0, "CPUs reserved per training worker")
    cache_latents: bool = flag(True, "encode every pair with the frozen VAE once (GPU actors with --use_gpu) and "
                                     "train from the cached posterior moments; --no-cache_latents encodes every step")
    accelerator_type: str | None = flag(None, "only GPUs of this Ray accelerator type, e.g. A10G or L40S",
                                        default_text="any")
    zero_stage: int = flag(2, "DeepSpeed ZeRO stage: 0 | 1 | 2 | 3")
    mixed_precision: str = flag("no", "no | fp16 | bf16 (DeepSpeed mixed precision)", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = flag(False, "recompute UNet activations in backward (less memory)")
    val_fraction: float = flag(0.1, "fraction of pairs held out for validation when the manifest has no split "
                                    "(rounded; at least 1 of 2 or more pairs: 0.1 of 16 pairs is 2, of 100 is 10)")
    val_every: int = flag(500, "steps between validation losses (and best_checkpoint updates)")
    sample_every: int = flag(500, "steps between step_XXXXXX_random_pairs/ folders")
    num_sample_pairs: int = flag(10, "pairs generated in each step_XXXXXX_random_pairs/")
    sample_steps: int = flag(50, "denoising steps for those sample pairs")
    checkpoint_every: int | None = flag(
        None, "steps between resumable checkpoints and latest_checkpoints/", default_text="--val_every")
    keep_latest: int = flag(3, "latest_checkpoints/ kept")
    max_failures: int = flag(3, "worker-group restarts from the last checkpoint before giving up")
    log_every: int = flag(10, "steps between lines in training_log.txt and on the console")
    strict: bool = flag(False, STRICT_HELP)

    def __post_init__(self) -> None:
        if self.struct_lambda is None:
            self.struct_lambda = 0.3 if self.model == "dual_unet" else 0.0

    def validate(self) -> None:
        self.validate_model()
        if not self.data:
            raise ConfigError("--data is missing; give a pairs folder (cf/, fa/) or a manifest .csv/.parquet")
        if not self.name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name) or ".." in self.name:
            raise ConfigError(
                f"--name {self.name!r} must be a plain folder name (letters, digits, . _ -), "
                "it may not contain '/' or '..' or escape --output_dir"
            )
        for flag_name in ("max_steps", "batch_size", "gradient_accumulation_steps", "num_workers",
                          "val_every", "sample_every", "keep_latest", "log_every",
                          "sample_steps"):
            if getattr(self, flag_name) <= 0:
                raise ConfigError(f"--{flag_name} {getattr(self, flag_name)} must be > 0")
        check_sampling_steps("sample_steps", self.sample_steps)
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ConfigError(f"--checkpoint_every {self.checkpoint_every} must be > 0")
        if self.num_sample_pairs < 0 or self.max_failures < 0:
            raise ConfigError("--num_sample_pairs and --max_failures must be >= 0")
        for flag_name in ("hf_lambda", "struct_lambda", "offset_noise_strength"):
            if getattr(self, flag_name) < 0:
                raise ConfigError(f"--{flag_name} {getattr(self, flag_name)} must be >= 0")
        if self.zero_stage not in ZERO_STAGES:
            raise ConfigError(f"--zero_stage {self.zero_stage} is unknown; choose 0, 1, 2 or 3")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"--mixed_precision {self.mixed_precision!r}; choose no, fp16 or bf16")
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise ConfigError("--mixed_precision fp16 needs --use_gpu; on CPU use bf16 or no")
        if self.mixed_precision == "fp16" and self.zero_stage == 0:
            raise ConfigError("--mixed_precision fp16 with --zero_stage 0: DeepSpeed keeps those fp32 master "
                              "weights out of reach of the LoRA export; use --zero_stage 1 or more, or bf16")
        if self.mixed_precision == "fp16" and self.model == "joint_sdxl":
            raise ConfigError("--mixed_precision fp16 with --model joint_sdxl: the SDXL VAE overflows in fp16; "
                              "use bf16")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val_fraction {self.val_fraction} must be in [0, 1)")
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr} must be > 0")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"--cpus_per_worker {self.cpus_per_worker} must be > 0")

    def loss_settings(self) -> dict:
        """The keyword arguments a design takes for its losses (PairModel.LOSS_DEFAULTS' keys)."""
        return {"hf_lambda": self.hf_lambda, "struct_lambda": self.struct_lambda,
                "offset_noise_strength": self.offset_noise_strength, "loss_weighting": self.loss_weighting}

    def resume_record(self) -> dict:
        """What a rerun must keep to resume this run: the model, and how DeepSpeed sharded its state."""
        return {**self.model_record(), "num_workers": self.num_workers, "zero_stage": self.zero_stage,
                "mixed_precision": self.mixed_precision}

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.val_every

    @property
    def run_dir(self) -> str:
        return join_path(self.output_dir, self.name)


@dataclass
class GenerateConfig:
    """`cffa generate` / `jobs/generate.py`."""

    checkpoint_dir: str | None = flag(None, "a checkpoint folder written by training, e.g. <run>/best_checkpoint; "
                                            "or give -n RUN for <runs_root>/RUN/best_checkpoint", required=True)
    name: str | None = flag(None, "instead of --checkpoint_dir: the training run <runs_root>/<name>, whose "
                                  "best_checkpoint is used; outputs go to <runs_root>_preds/<name>/<savedir>/",
                            aliases=("-n",))
    runs_root: str = flag(storage_default("runs"), "with -n: the folder holding run folders (cffa train's --output_dir)",
                          default_text="runs, or $CFFA_STORAGE/runs when CFFA_STORAGE is set")
    savedir: str = flag("samples", "with -n: the output folder's name under <runs_root>_preds/<name>/")
    model: str | None = flag(None, "refuse a checkpoint of another design: dual_unet | joint_sdxl",
                             default_text="whatever design the checkpoint holds")
    num_samples: int = flag(10, "pairs to make in total (pair ids 0 .. N-1); --amount is another name for it",
                            aliases=("--amount",))
    output_dir: str = flag(storage_default("generated"),
                           "where parquet/, the PNG folders and summary.json go: local, or s3:// / gs://",
                           default_text="generated, or $CFFA_STORAGE/generated when CFFA_STORAGE is set; "
                                        "with -n, <runs_root>_preds/<name>/<savedir>")
    png_layout: str = flag(AUTO, "sharded: png/shard_SSSS/pair_PPPPPP/ (for many pairs) | seed (or numbered): 1/, "
                                 "2/, ... in the output folder | auto: seed with -n, else sharded",
                           choices=(AUTO, *PNG_LAYOUTS, *PNG_LAYOUT_ALIASES))
    steps: int = flag(50, "denoising steps")
    seed: int = flag(42, "base seed; pair k's noise depends only on (seed, k)")
    scheduler: str = flag("ddim", "ddim (DDIM, good at 50 steps) | dpm++ (DPM-Solver++, good at 20-25 steps)",
                          choices=SCHEDULERS)
    mode: str = flag("noise", "noise: from pure noise | from_data: image-to-image from real pairs", choices=GENERATION_MODES)
    data: str | None = flag(None, "real pairs for --mode from_data (folder or manifest, as for training)")
    strength: float = flag(0.6, "from_data: how far the real pair is noised, in (0, 1]")
    fa_noise: str = flag(
        "same", "dual_unet: the FA UNet's start noise. same: the CF UNet's z0, as the research design does | "
                "negated: -z0, which made the two vessel trees overlap where same makes them avoid each other "
                "(measured on tiny-retina, BENCHMARKS.md#quality; check it on your model with cffa evaluate)",
        choices=FA_NOISES)
    batch_size: int = flag(32, "pairs per actor call (one Ray Data batch); split into --model_batch calls")
    model_batch: str | int = flag(
        AUTO, "pairs per UNet/VAE call, a fixed shape (the last call is padded), so pair k is byte-identical whatever "
              "--batch_size and --concurrency; auto: on GPU the largest that fits the GPU's memory, measured once "
              "and kept for the output folder, on CPU 8", parse=auto_or_int)
    rows_per_shard: int = flag(256, "pairs per parquet shard (and per commit: a killed job redoes at most this many per writer)")
    concurrency: str = flag(
        AUTO, "model actors (one GPU each with --use_gpu): N, a range MIN-MAX that Ray Data scales within as "
              "work queues up (and the cluster adds GPUs), or auto: with --use_gpu 1 up to every GPU the cluster "
              "has or can add, on CPU 1")
    compile: bool | None = flag(None, "torch.compile the UNets (compiled once per actor, its time printed); "
                                      "default: on with --use_gpu, off on CPU")
    use_gpu: bool = flag(False, "one GPU per model actor")
    mixed_precision: str = flag(
        AUTO, "the dtype the UNet weights are held and run in: no (fp32) | fp16 | bf16 | auto (bf16 with "
              "--use_gpu, no on CPU); the VAE follows, except that the SDXL VAE stays fp32 for fp16",
        choices=(AUTO, *MIXED_PRECISION))
    cpus_per_actor: float = flag(1.0, "CPUs reserved per model actor")
    accelerator_type: str | None = flag(None, "only GPUs of this Ray accelerator type, e.g. A10G or L40S",
                                        default_text="any")
    strict: bool = flag(False, STRICT_HELP)

    def __post_init__(self) -> None:
        """-n resolves to the run's best_checkpoint and the runs' _preds folder (the layout of seed B)."""
        if self.name and not self.checkpoint_dir:
            self.checkpoint_dir = join_path(self.runs_root, self.name, "best_checkpoint")
            if self.output_dir == GenerateConfig.__dataclass_fields__["output_dir"].default:
                self.output_dir = join_path(self.runs_root.rstrip("/") + "_preds", self.name, self.savedir)
        if self.png_layout == AUTO:
            self.png_layout = "seed" if self.name else "sharded"
        self.png_layout = PNG_LAYOUT_ALIASES.get(self.png_layout, self.png_layout)

    def validate(self) -> None:
        check_finite(self)
        if not self.checkpoint_dir:
            raise ConfigError("--checkpoint_dir is missing; give a checkpoint folder written by `cffa train` "
                              "(or -n RUN_NAME for <runs_root>/RUN_NAME/best_checkpoint)")
        for flag_name in ("name", "savedir"):
            value = getattr(self, flag_name)
            if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
                raise ConfigError(f"--{flag_name} {value!r} must be a plain folder name (letters, digits, . _ -)")
        if self.png_layout not in PNG_LAYOUTS:
            raise ConfigError(f"--png_layout {self.png_layout!r}; choose sharded or seed")
        if self.fa_noise not in FA_NOISES:
            raise ConfigError(f"--fa_noise {self.fa_noise!r}; choose same or negated")
        parse_concurrency(self.concurrency)
        if self.model_batch != AUTO and (not isinstance(self.model_batch, int) or self.model_batch <= 0):
            raise ConfigError(f"--model_batch {self.model_batch!r} must be a positive number or auto")
        for flag_name in ("num_samples", "steps", "batch_size", "rows_per_shard"):
            if getattr(self, flag_name) <= 0:
                raise ConfigError(f"--{flag_name} {getattr(self, flag_name)} must be > 0")
        check_sampling_steps("steps", self.steps)
        if self.model is not None and self.model not in MODELS:
            raise ConfigError(f"--model {self.model!r} is unknown; choose one of {', '.join(MODELS)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.mode not in GENERATION_MODES:
            raise ConfigError(f"--mode {self.mode!r}; choose noise or from_data")
        if self.mode == "from_data" and not self.data:
            raise ConfigError("--mode from_data needs --data (a pairs folder or manifest)")
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"--strength {self.strength} must be in (0, 1]")
        if self.mixed_precision not in (AUTO, *MIXED_PRECISION):
            raise ConfigError(f"--mixed_precision {self.mixed_precision!r}; choose auto, no, fp16 or bf16")
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise ConfigError("--mixed_precision fp16 needs --use_gpu; on CPU use bf16 or no")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"--cpus_per_actor {self.cpus_per_actor} must be > 0")


@dataclass
class EvaluateConfig:
    """`cffa evaluate` / `jobs/evaluate.py`."""

    generated: str | None = flag(None, "the pairs to judge: a `cffa generate` output folder (its parquet/) "
                                       "or a folder of pairs (cf/, fa/)", required=True)
    real: str | None = flag(None, "real pairs: a folder with cf/ and fa/ or a manifest .csv/.parquet, as --data "
                                  "of training (the ceiling, the floor and the realism reference)", required=True)
    output: str | None = flag(None, "folder for evaluation.json, evaluation.md and pairs.csv", required=True)
    resolution: int | None = flag(None, "compare at this image side in pixels", default_text="the generated pairs'")
    batch_size: int = flag(16, "pairs per Ray Data task")
    seed: int = flag(0, "seed of the SWD neighbourhoods and directions and of the KID subsets")
    inception_weights: str | None = flag(
        None, "local InceptionV3 FID weights (pt_inception-2015-12-05-6726825d.pth) to add FID and KID; "
              "needs the [fid] extra")
    concurrency: int = flag(1, "Inception actors (with --inception_weights; one GPU each with --use_gpu)")
    use_gpu: bool = flag(False, "run the Inception network on a GPU per actor")

    def validate(self) -> None:
        for flag_name, what in (("generated", "a `cffa generate` output folder or a pairs folder (cf/, fa/)"),
                                ("real", "a real pairs folder (cf/, fa/) or a manifest .csv/.parquet"),
                                ("output", "a folder for evaluation.json and evaluation.md")):
            if not getattr(self, flag_name):
                raise ConfigError(f"--{flag_name} is missing; give {what}")
        for flag_name in ("batch_size", "concurrency"):
            if getattr(self, flag_name) <= 0:
                raise ConfigError(f"--{flag_name} {getattr(self, flag_name)} must be > 0")
        if self.resolution is not None and self.resolution < 16:
            raise ConfigError(f"--resolution {self.resolution} must be >= 16 (the coarsest SWD level)")


# ---------------------------------------------------------------- CLI from dataclasses

def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One argparse flag per dataclass field, typed from the annotation, help from metadata."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        kind = _base_type(hints[f.name])
        names = [f"--{f.name}", *f.metadata.get("aliases", ())]
        help_text = _help_with_default(f)
        if kind is bool:
            parser.add_argument(*names, action=_BooleanFlag, default=f.default, help=help_text)
            continue
        parser.add_argument(*names, type=f.metadata.get("parse", kind), default=f.default,
                            choices=f.metadata.get("choices"), help=help_text)


def _help_with_default(f: dataclasses.Field) -> str:
    """The help text with the default said once: '(required)', the default's words, or its value."""
    help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
    if f.metadata.get("required"):
        return f"{help_text} (required)"
    default = f.metadata.get("default_text")
    if default is None and f.default is not None:
        default = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
    return help_text if default is None else f"{help_text} (default: {default})"


class _BooleanFlag(argparse.BooleanOptionalAction):
    """--x / --no-x, without the '(default: ...)' that some Pythons append on their own (it is in the help)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        help_text = kwargs.get("help")
        super().__init__(*args, **kwargs)
        self.help = help_text


def _base_type(kind: Any) -> type:
    if kind in (int, float, str, bool):
        return kind
    args = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
    return args[0] if args else str


def from_namespace(cls: type, ns: argparse.Namespace, **overrides: Any):
    values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
    values.update(overrides)
    return cls(**values)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, values: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})
