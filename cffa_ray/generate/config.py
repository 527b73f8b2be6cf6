"""`cffa generate` settings: one dataclass field per flag (see cffa_ray/config.py)."""
from __future__ import annotations

from dataclasses import dataclass

from cffa_ray.config import (
    AUTO,
    FA_NOISES,
    GENERATION_MODES,
    GUIDANCE_TARGETS,
    MIXED_PRECISION,
    MODELS,
    PNG_LAYOUT_ALIASES,
    PNG_LAYOUTS,
    RESOURCES_HELP,
    SCHEDULERS,
    STRICT_HELP,
    auto_or_int,
    check_finite,
    check_folder_name,
    check_positive,
    check_sampling_steps,
    parse_concurrency,
    parse_resources,
)
from cffa_ray.errors import ConfigError
from cffa_ray.flags import flag
from cffa_ray.paths import join_path, storage_default


@dataclass
class GenerateConfig:
    """`cffa generate` / `jobs/generate.py`."""

    checkpoint_dir: str | None = flag(None, "a checkpoint folder written by training, e.g. <run>/best_checkpoint; "
                                            "or give -n RUN for <runs_root>/RUN/best_checkpoint", required=True)
    name: str | None = flag(None, "instead of --checkpoint_dir: the training run <runs_root>/<name>, whose "
                                  "best_checkpoint is used; outputs go to <runs_root>_preds/<name>/<savedir>/",
                            aliases=("-n",))
    runs_root: str = flag(storage_default("runs"),
                          "with -n: the folder holding run folders (cffa train's --output_dir)",
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
    mode: str = flag("noise", "noise: from pure noise | from_data: image-to-image from real pairs",
                     choices=GENERATION_MODES)
    data: str | None = flag(None, "real pairs for --mode from_data (folder or manifest, as for training)")
    strength: float = flag(0.6, "from_data: how far the real pair is noised, in (0, 1]")
    fa_noise: str = flag(
        "same", "dual_unet: the FA UNet's start noise. same: the CF UNet's z0, as the research design does | "
                "negated: -z0, which made the two vessel trees overlap where same makes them avoid each other "
                "(measured on tiny-retina, BENCHMARKS.md#quality; check it on your model with cffa evaluate)",
        choices=FA_NOISES)
    struct_guidance: float = flag(
        0.0, "dual_unet: cross-modal guidance strength S >= 0. At each step the gradient of the training structure "
             "loss between the two predicted clean latents nudges both latents towards one vessel layout. "
             "0: off, the sampler as before, bit for bit; on the earlier tiny-retina 0.3-1 aligned pairs a little "
             "better and made FA less real (BENCHMARKS.md#quality)")
    struct_guidance_target: str = flag(
        "latent_edges", "what --struct_guidance makes the two halves agree on. latent_edges: the training structure "
                        "loss's edge maps of the two clean latents (a few convolutions a step) | vessels: the decoded "
                        "images' vessel maps, dark in the CF and bright in the FA, as cffa evaluate judges them (a "
                        "VAE decode and its backward pass a step; on tiny-retina S 0.03 took alignment from 0.62 to "
                        "0.93 at 3-6x the time a pair, BENCHMARKS.md#quality)",
        choices=GUIDANCE_TARGETS)
    batch_size: int = flag(32, "pairs per actor call (one Ray Data batch); split into --model_batch calls")
    model_batch: str | int = flag(
        AUTO, "pairs per UNet/VAE call, a fixed shape (the last call is padded), so pair k is byte-identical whatever "
              "--batch_size and --concurrency; auto: on GPU the largest that fits the GPU's memory, measured once "
              "and kept for the output folder, on CPU 8", parse=auto_or_int)
    rows_per_shard: int = flag(256, "pairs per parquet shard (and per commit: a killed job redoes at most this "
                                    "many per writer)")
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
    worker_resources: str | None = flag(None, RESOURCES_HELP.format(who="each model actor", them="the actors"),
                                        default_text="none")
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
            if getattr(self, flag_name) is not None:
                check_folder_name(flag_name, getattr(self, flag_name))
        if self.png_layout not in PNG_LAYOUTS:
            raise ConfigError(f"--png_layout {self.png_layout!r}; choose sharded or seed")
        if self.fa_noise not in FA_NOISES:
            raise ConfigError(f"--fa_noise {self.fa_noise!r}; choose same or negated")
        if self.struct_guidance < 0:
            raise ConfigError(f"--struct_guidance {self.struct_guidance:g} must be >= 0 (0 turns the guidance off)")
        if self.struct_guidance_target not in GUIDANCE_TARGETS:
            raise ConfigError(f"--struct_guidance_target {self.struct_guidance_target!r}; "
                              "choose latent_edges or vessels")
        if self.struct_guidance_target != "latent_edges" and not self.struct_guidance:
            raise ConfigError(f"--struct_guidance_target {self.struct_guidance_target} has no effect with "
                              "--struct_guidance 0: add --struct_guidance S (e.g. 0.03), or drop the target")
        parse_concurrency(self.concurrency)
        if self.model_batch != AUTO and (not isinstance(self.model_batch, int) or self.model_batch <= 0):
            raise ConfigError(f"--model_batch {self.model_batch!r} must be a positive number or auto")
        check_positive(self, "num_samples", "steps", "batch_size", "rows_per_shard", "cpus_per_actor")
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
        parse_resources("worker_resources", self.worker_resources)

    @property
    def custom_resources(self) -> dict[str, float]:
        """--worker_resources as {resource: amount} (validated by `validate`)."""
        return parse_resources("worker_resources", self.worker_resources)
