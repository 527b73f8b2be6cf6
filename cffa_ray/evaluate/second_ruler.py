"""The second ruler of `cffa evaluate`: are the vessels trees, are the pairs useful, do they leak training images?

    topology      every run: topology.py's measures of the generated vs the --real vessel maps (made by
                  the scoring tasks), per modality
    memorisation  when a training set (--real_train, else a `data` recorded in the run.json beside the
                  checkpoint that generation.json names, when reachable) and a held-out set (--real_test,
                  else --real when it is not the training data) are known: memorisation.py on the thumbnails
    utility       with --utility: utility.py's three trainings as Ray tasks

Driver side: resolve_sets() before Ray starts (a bad path fails in one line before any work), measure()
after the scoring pipeline, with the thumbnails it kept.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from cffa_ray.data import PAIR_ID
from cffa_ray.errors import ConfigError
from cffa_ray.evaluate import memorisation, topology, utility
from cffa_ray.evaluate.inputs import GENERATED, REAL, GeneratedSet, discover_with_flag
from cffa_ray.evaluate.thumbnails import THUMB_SIZE, collect_thumbnails
from cffa_ray.io import filesystem, read_text
from cffa_ray.paths import absolute, is_uri, join_path
from cffa_ray.run_layout import RUN_RECORD

TRAIN, TEST = "real_train", "real_test"
NN_COLUMNS = ("nn_cf_similarity", "nn_cf_train_file", "nn_fa_similarity", "nn_fa_train_file")


@dataclass
class RealSets:
    """The training and held-out real pairs, where they came from, and their records."""

    train: str | None = None
    train_from: str = ""
    test: str | None = None
    test_from: str = ""
    records: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def memorisation(self) -> bool:
        return bool(self.train and self.test)


def _reachable(path: str) -> bool:
    try:
        fs, p = filesystem(path)
        return fs.get_file_info(p).type.name != "NotFound"
    except Exception:  # a URI whose filesystem is not configured here: not reachable
        return False


def recorded_training_data(generated: GeneratedSet) -> str | None:
    """The --data of the training run whose checkpoint made the pairs: run.json beside the checkpoint folder
    (<run>/best_checkpoint -> <run>/run.json), when it records one and it can be read from here."""
    checkpoint = (generated.identity or {}).get("checkpoint")
    if not checkpoint:
        return None
    try:
        text = read_text(join_path(checkpoint.rstrip("/").rsplit("/", 1)[0], RUN_RECORD))
        data = json.loads(text).get("data") if text else None
    except Exception:  # unreachable storage or a foreign file: no recorded training set
        return None
    return data if isinstance(data, str) and (is_uri(data) or data.startswith("/")) and _reachable(data) else None


def resolve_sets(cfg, generated: GeneratedSet) -> RealSets:
    """Which real pairs are the training and the held-out sets; reads their records (DataError on a bad one)."""
    sets = RealSets()
    if cfg.real_train:
        sets.train, sets.train_from = absolute(cfg.real_train), "--real_train"
    else:
        data = recorded_training_data(generated)
        if data:
            sets.train, sets.train_from = data, "the training data recorded in the checkpoint's run.json"
    if cfg.real_test:
        sets.test, sets.test_from = absolute(cfg.real_test), "--real_test"
    elif sets.train and absolute(cfg.real).rstrip("/") != sets.train.rstrip("/"):
        sets.test, sets.test_from = cfg.real, "--real"
    if cfg.utility and not sets.train:
        raise ConfigError("--utility needs the real training pairs: give --real_train PAIRS (a folder with cf/ and "
                          "fa/ or a manifest)")
    if cfg.utility and not sets.test:
        raise ConfigError("--utility needs held-out real pairs: give --real_test PAIRS (pairs never trained on)")
    for name, path in ((TRAIN, sets.train), (TEST, sets.test)):
        if path:
            sets.records[name] = discover_with_flag(path, f"--{name}" if getattr(cfg, name) else "--real_train")
    return sets


# ------------------------------------------------------------------ the three measures (driver)

def topology_section(collected: dict) -> dict:
    """Per modality topology.summarise of the generated vs the real images (rows carry cf_/fa_ measures)."""
    out = {"method": f"vessel maps thresholded at {topology.VESSEL_THRESHOLD}, skeletonised (scikit-image); "
                     "loops = holes of the vessel mask; d = (generated - real) / pooled std, "
                     f"|d| > {topology.FAR} flagged far"}
    for m in ("cf", "fa"):
        per_set = [[{k: r[f"{m}_{k}"] for k in topology.MEASURES} for r in collected[s]["rows"]]
                   for s in (GENERATED, REAL)]
        out[m] = topology.summarise(*per_set)
    return out


def _memorisation(collected: dict, thumbs: dict[str, dict], sets: RealSets) -> dict:
    train, test = thumbs[TRAIN], thumbs[TEST]
    gen_rows = collected[GENERATED]["rows"]
    out = {"method": f"cosine of band-pass {THUMB_SIZE} px embeddings (memorisation.py); a generated image is "
                     f"flagged above the held-out {memorisation.PERCENTILE:g}th percentile",
           "train": {"path": sets.train, "from": sets.train_from, "pairs": len(train["pair_ids"])},
           "held_out": {"path": sets.test, "from": sets.test_from, "pairs": len(test["pair_ids"])}}
    test_rows = [{"set": TEST, PAIR_ID: pid} for pid in test["pair_ids"]]
    closest = []
    for m in ("cf", "fa"):
        train_emb = memorisation.embed_all(train[m])
        res = memorisation.compare(memorisation.embed_all(collected[GENERATED]["thumbs"][m]),
                                   memorisation.embed_all(test[m]), train_emb)
        for rows, sims, nn in ((gen_rows, res["generated_sims"], res["generated_nn"]),
                               (test_rows, res["held_out_sims"], res["held_out_nn"])):
            for row, s, j in zip(rows, sims, nn):
                row[f"nn_{m}_similarity"], row[f"nn_{m}_train_file"] = float(s), train["files"][m][j]
        out[m] = {"generated": res["generated"], "held_out": res["held_out"], "threshold": res["threshold"],
                  "fraction_above": res["fraction_above"]}
        closest += [{"modality": m, "generated_pair_id": r[PAIR_ID], "train_file": r[f"nn_{m}_train_file"],
                     "similarity": r[f"nn_{m}_similarity"]} for r in gen_rows]
    out["closest"] = sorted(closest, key=lambda c: -c["similarity"])[:memorisation.CLOSEST]
    collected[TEST] = {"rows": test_rows}
    return out


def measure(cfg, sets: RealSets, collected: dict) -> dict:
    """{topology, memorisation, utility} sections of evaluation.json (None where not measured, with why)."""
    out = {"topology": topology_section(collected), "memorisation": None, "utility": None}
    if not sets.memorisation:
        out["memorisation_skipped"] = ("no training set known: give --real_train (and --real_test) to check "
                                       "memorisation" if not sets.train else
                                       "no held-out set: give --real_test (--real is the training data)")
        return out
    thumbs = {name: collect_thumbnails(sets.records[name], name, cfg.batch_size) for name in (TRAIN, TEST)}
    out["memorisation"] = _memorisation(collected, thumbs, sets)
    if cfg.utility:
        gen = collected[GENERATED]["thumbs"]
        print(f"[cffa] utility: training 3 CF->FA networks ({cfg.utility_steps} steps each) as Ray tasks", flush=True)
        out["utility"] = utility.run_tstr((gen["cf"], gen["fa"]), (thumbs[TRAIN]["cf"], thumbs[TRAIN]["fa"]),
                                          (thumbs[TEST]["cf"], thumbs[TEST]["fa"]), cfg.utility_steps, cfg.seed,
                                          cfg.use_gpu)
    return out


def needs_thumbs(sets: RealSets) -> bool:
    return sets.memorisation


def stack_thumbs(rows: list[dict]) -> dict[str, np.ndarray]:
    """Pop the per-row thumbnails the pipeline kept (thumb_cf, thumb_fa) into {cf: [N, S, S, 3], fa: [N, S, S]}."""
    return {"cf": np.stack([r.pop("thumb_cf") for r in rows]), "fa": np.stack([r.pop("thumb_fa") for r in rows])}
