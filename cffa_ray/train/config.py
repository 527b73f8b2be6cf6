"""`cffa train` settings: one dataclass field per flag (see cffa_ray/config.py)."""
from __future__ import annotations

from dataclasses import dataclass

from cffa_ray.config import (
    DESIGN_LOSS_DEFAULTS,
    LOSS_DEFAULTS,
    LOSS_WEIGHTINGS,
    MIXED_PRECISION,
    RESOURCES_HELP,
    STRICT_HELP,
    ZERO_STAGES,
    ModelConfig,
    check_folder_name,
    check_positive,
    check_sampling_steps,
    parse_resources,
)
from cffa_ray.errors import ConfigError
from cffa_ray.flags import flag
from cffa_ray.paths import join_path, storage_default


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
    hf_lambda: float = flag(LOSS_DEFAULTS["hf_lambda"], "weight of the high-frequency loss on predicted x0")
    struct_lambda: float | None = flag(
        None, "weight of the Sobel structure loss between CF and FA (for joint_sdxl, > 0 compares the "
              "two halves of the joint latent)",
        default_text=", ".join(f"{d['struct_lambda']:g} for {m}" for m, d in DESIGN_LOSS_DEFAULTS.items()))
    offset_noise_strength: float = flag(LOSS_DEFAULTS["offset_noise_strength"],
                                        "offset noise strength (per-channel constant added to the noise)")
    loss_weighting: str = flag(
        LOSS_DEFAULTS["loss_weighting"],
        "per-sample weight of the HF and structure terms on the predicted clean latent: alpha_bar (fade them out "
        "at large t, where the prediction is mostly amplified noise; chosen by measurement, BENCHMARKS.md#quality) "
        "| none (weight 1, the research design's literal form)", choices=LOSS_WEIGHTINGS)
    num_workers: int = flag(1, "Ray Train workers (one per GPU with --use_gpu)")
    use_gpu: bool = flag(False, "one GPU per worker, NCCL; otherwise CPU workers, gloo")
    cpus_per_worker: float = flag(1.0, "CPUs reserved per training worker")
    cache_latents: bool = flag(True, "encode every pair with the frozen VAE once (GPU actors with --use_gpu) and "
                                     "train from the cached posterior moments; --no-cache_latents encodes every step")
    accelerator_type: str | None = flag(None, "only GPUs of this Ray accelerator type, e.g. A10G or L40S",
                                        default_text="any")
    worker_resources: str | None = flag(
        None, RESOURCES_HELP.format(who="each training worker (and latent-cache actor)", them="them"),
        default_text="none")
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
        for key, value in DESIGN_LOSS_DEFAULTS.get(self.model, LOSS_DEFAULTS).items():
            if getattr(self, key) is None:  # the design's default (the one source: config.LOSS_DEFAULTS)
                setattr(self, key, value)

    def validate(self) -> None:
        self.validate_model()
        if not self.data:
            raise ConfigError("--data is missing; give a pairs folder (cf/, fa/) or a manifest .csv/.parquet")
        check_folder_name("name", self.name)
        check_positive(self, "max_steps", "batch_size", "gradient_accumulation_steps", "num_workers", "val_every",
                       "sample_every", "keep_latest", "log_every", "sample_steps", "lr", "cpus_per_worker")
        check_positive(self, "num_sample_pairs", "max_failures", "hf_lambda", "struct_lambda",
                       "offset_noise_strength", allow_zero=True)
        check_sampling_steps("sample_steps", self.sample_steps)
        if self.checkpoint_every is not None:
            check_positive(self, "checkpoint_every")
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
        parse_resources("worker_resources", self.worker_resources)

    def loss_settings(self) -> dict:
        """The keyword arguments a design takes for its losses (config.LOSS_DEFAULTS' keys)."""
        return {key: getattr(self, key) for key in LOSS_DEFAULTS}

    def resume_record(self) -> dict:
        """What a rerun must keep to resume this run: the model, and how DeepSpeed sharded its state."""
        return {**self.model_record(), "num_workers": self.num_workers, "zero_stage": self.zero_stage,
                "mixed_precision": self.mixed_precision}

    @property
    def custom_resources(self) -> dict[str, float]:
        """--worker_resources as {resource: amount} (validated by `validate`)."""
        return parse_resources("worker_resources", self.worker_resources)

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.val_every

    @property
    def run_dir(self) -> str:
        return join_path(self.output_dir, self.name)
