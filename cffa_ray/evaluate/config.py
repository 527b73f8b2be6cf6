"""`cffa evaluate` settings: one dataclass field per flag (see cffa_ray/config.py)."""
from __future__ import annotations

from dataclasses import dataclass

from cffa_ray.config import check_positive
from cffa_ray.errors import ConfigError
from cffa_ray.flags import flag


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
    use_gpu: bool = flag(False, "run the Inception network on a GPU per actor, and the --utility trainings "
                                "on a GPU each")
    real_train: str | None = flag(None, "the real pairs the model was trained on (folder or manifest): the "
                                        "memorisation reference and the real side of --utility",
                                  default_text="the `data` in the checkpoint's run.json, when recorded and reachable")
    real_test: str | None = flag(None, "held-out real pairs, never trained on (folder or manifest): the "
                                       "memorisation baseline and the --utility test set",
                                 default_text="--real, when it is not the training data")
    utility: bool = flag(False, "train-on-synthetic, test-on-real: a small CF->FA UNet trained on the generated "
                                "pairs and on as many --real_train pairs, scored on --real_test (Ray tasks)")
    utility_steps: int = flag(300, "training steps of each --utility network (16 pairs each, at 64 px)")

    def validate(self) -> None:
        for flag_name, what in (("generated", "a `cffa generate` output folder or a pairs folder (cf/, fa/)"),
                                ("real", "a real pairs folder (cf/, fa/) or a manifest .csv/.parquet"),
                                ("output", "a folder for evaluation.json and evaluation.md")):
            if not getattr(self, flag_name):
                raise ConfigError(f"--{flag_name} is missing; give {what}")
        check_positive(self, "batch_size", "concurrency", "utility_steps")
        if self.resolution is not None and self.resolution < 16:
            raise ConfigError(f"--resolution {self.resolution} must be >= 16 (the coarsest SWD level)")
