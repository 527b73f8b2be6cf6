"""Utility, train-on-synthetic / test-on-real (TSTR): are the generated pairs worth training on?

The same small CF -> FA network (translation.py) is trained with the same seed and step budget
three times, each as a Ray task (one GPU each with --use_gpu):

    synthetic    on the generated pairs
    real         on as many real training pairs (--real_train) as there are generated pairs (all of
                 them when there are fewer)
    real, seed+1 the same real pairs from the next seed: how far two trainings on the same pairs land
                 apart, the noise of the ratio

and each is scored on the held-out real pairs (--real_test). Reported per score (PSNR, SSIM, vessel
soft Dice of the predicted FA): each mean, the ratio synthetic / real (1: the generated pairs teach
as much as as many real ones) and the seed spread, |real(seed+1) / real(seed) - 1|.
"""
from __future__ import annotations

import math

import numpy as np
import ray

from cffa_ray.evaluate import metrics
from cffa_ray.evaluate.translation import SCORES, predict, score_predictions, train_translation
from cffa_ray.progress import Progress

TASK_CPUS = 1  # each training's Ray task, and its torch threads


def train_and_score(train_cf: np.ndarray, train_fa: np.ndarray, test_cf: np.ndarray, test_fa: np.ndarray,
                    steps: int, seed: int, use_gpu: bool, threads: int | None = None) -> dict[str, list[float]]:
    """Ray task body: train on the thumbnails, score on the held-out ones -> {score: per test pair}.
    `threads`: torch's CPU threads (the task's CPUs; None: torch's default)."""
    import torch  # a Ray worker process: torch is imported where the training runs

    if threads:  # Ray sets no OMP_NUM_THREADS here: three tasks would each take every core
        torch.set_num_threads(threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model = train_translation(train_cf, train_fa, steps, seed, device)
    return score_predictions(predict(model, test_cf, device), test_cf, test_fa)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a / b):
        return None
    return float(a / b)


def summarise(scores: dict[str, dict[str, list[float]]]) -> dict:
    """{synthetic, real, real_seed2: {score: [per pair]}} -> per score {synthetic, real, real_seed2: {mean,
    std, n}, ratio, seed_spread}."""
    out = {}
    for k in SCORES:
        stats = {name: metrics.mean_std(s[k]) for name, s in scores.items()}
        ratio = _ratio(stats["synthetic"]["mean"], stats["real"]["mean"])
        again = _ratio(stats["real_seed2"]["mean"], stats["real"]["mean"])
        out[k] = {**stats, "ratio": ratio, "seed_spread": abs(again - 1) if again is not None else None}
    return out


def run_tstr(generated: tuple[np.ndarray, np.ndarray], train: tuple[np.ndarray, np.ndarray],
             test: tuple[np.ndarray, np.ndarray], steps: int, seed: int, use_gpu: bool) -> dict:
    """The three trainings as Ray tasks (thumbnails: uint8 CF [N, S, S, 3], FA [N, S, S]); waits for them.

    The real pairs used are the first len(generated) of `train` (in pair-id order) when it has more.
    """
    n_real = min(len(train[0]), len(generated[0]))
    real = (train[0][:n_real], train[1][:n_real])
    task = ray.remote(num_cpus=TASK_CPUS, num_gpus=1 if use_gpu else 0, max_retries=1)(train_and_score)
    test_refs = [ray.put(a) for a in test]
    jobs = {"synthetic": (generated, seed), "real": (real, seed), "real_seed2": (real, seed + 1)}
    refs = {name: task.remote(*(ray.put(a) for a in pairs), *test_refs, steps, s, use_gpu, TASK_CPUS)
            for name, (pairs, s) in jobs.items()}
    names = {ref: name for name, ref in refs.items()}
    scores, pending = {}, list(refs.values())
    with Progress(len(pending), what="trainings", label="cffa evaluate utility") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            scores[names[done[0]]] = ray.get(done[0])
            bar.update(1)
    return {"method": "train-on-synthetic, test-on-real: a small CF->FA UNet trained with one seed and budget on "
                      "the generated pairs and on as many real training pairs, scored on held-out real pairs; "
                      "ratio = synthetic / real",
            "pairs": {"synthetic": len(generated[0]), "real": n_real, "test": len(test[0])},
            "steps": steps, "seed": seed, "scores": summarise(scores)}
