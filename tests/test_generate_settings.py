"""The generation driver's pure parts: `auto` flags made concrete, actor pools, rates (no Ray needed)."""
import dataclasses

import pytest

from cffa_ray.config import parse_concurrency
from cffa_ray.errors import ConfigError
from cffa_ray.generate.config import GenerateConfig
from cffa_ray.generate.job import rates
from cffa_ray.generate.settings import actor_pool, identity, resolve

RECORD = {"model": "dual_unet", "resolution": 64}


def test_auto_flags_on_cpu():
    cfg = resolve(GenerateConfig(checkpoint_dir="c"), None)
    assert (cfg.mixed_precision, cfg.compile, cfg.model_batch) == ("no", False, 8)


def test_a_folder_with_pairs_keeps_its_auto_choices():
    made_on_gpu = {"mixed_precision": "bf16", "compile": True, "model_batch": 12}
    cfg = resolve(GenerateConfig(checkpoint_dir="c", use_gpu=True), made_on_gpu)  # no GPU measurement needed
    assert (cfg.mixed_precision, cfg.compile, cfg.model_batch) == ("bf16", True, 12)
    explicit = resolve(GenerateConfig(checkpoint_dir="c", model_batch=4, compile=False), made_on_gpu)
    assert (explicit.model_batch, explicit.compile) == (4, False)  # what the user says wins (and is checked)


def test_identity_records_the_concrete_choices():
    ident = identity(resolve(GenerateConfig(checkpoint_dir="c", steps=7), None), RECORD)
    assert {k: ident[k] for k in ("model_batch", "compile", "mixed_precision", "steps", "png_layout")} == {
        "model_batch": 8, "compile": False, "mixed_precision": "no", "steps": 7, "png_layout": "sharded"}
    # batch size and concurrency do not decide pixels
    other = identity(resolve(GenerateConfig(checkpoint_dir="c", steps=7, batch_size=3, concurrency="1-4"), None),
                     RECORD)
    assert other == ident
    # --fa_noise decides pixels; its default is left out, so folders made before the flag keep their identity
    assert "fa_noise" not in ident
    negated = identity(resolve(GenerateConfig(checkpoint_dir="c", steps=7, fa_noise="negated"), None), RECORD)
    assert negated == {**ident, "fa_noise": "negated"}
    assert "struct_guidance" not in ident  # likewise --struct_guidance: recorded when on
    guided = identity(resolve(GenerateConfig(checkpoint_dir="c", steps=7, struct_guidance=1.5), None), RECORD)
    assert guided == {**ident, "struct_guidance": 1.5}
    on_vessels = identity(resolve(GenerateConfig(checkpoint_dir="c", steps=7, struct_guidance=1.5,
                                                 struct_guidance_target="vessels"), None), RECORD)
    assert on_vessels == {**guided, "struct_guidance_target": "vessels"}  # the default target is left out
    with pytest.raises(ConfigError, match=r"^--struct_guidance_target 'edges'; choose latent_edges or vessels$"):
        GenerateConfig(checkpoint_dir="c", struct_guidance=1.0, struct_guidance_target="edges").validate()
    with pytest.raises(ConfigError, match=r"^--struct_guidance_target vessels has no effect with --struct_guidance "
                                          r"0: add --struct_guidance S \(e.g. 0.03\), or drop the target$"):
        GenerateConfig(checkpoint_dir="c", struct_guidance_target="vessels").validate()
    with pytest.raises(ConfigError, match=r"^--struct_guidance -1 must be >= 0 \(0 turns the guidance off\)$"):
        GenerateConfig(checkpoint_dir="c", struct_guidance=-1.0).validate()


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("3", (3, 3)), (2, (2, 2)), ("1-8", (1, 8))])
def test_concurrency_forms(text, expected):
    assert parse_concurrency(text) == expected


@pytest.mark.parametrize("text", ["0", "4-2", "many", "1-"])
def test_bad_concurrency_is_named(text):
    with pytest.raises(ConfigError, match="--concurrency"):
        parse_concurrency(text)


def test_actor_pools():
    assert actor_pool("1-8", use_gpu=True) == (1, 8)
    assert actor_pool("auto", use_gpu=False) == (1, 1)


def test_seed_b_names_resolve_to_the_runs_layout():
    cfg = GenerateConfig(name="exp1", runs_root="results/out_joint", savedir="exp1_noise")
    assert cfg.checkpoint_dir == "results/out_joint/exp1/best_checkpoint"
    assert cfg.output_dir == "results/out_joint_preds/exp1/exp1_noise" and cfg.png_layout == "seed"
    assert dataclasses.replace(cfg, steps=3).output_dir == cfg.output_dir  # rebuilding keeps it
    assert GenerateConfig(checkpoint_dir="c", png_layout="numbered").png_layout == "seed"  # the older name
    with pytest.raises(ConfigError, match="--savedir 'a/b'"):
        GenerateConfig(name="exp1", savedir="a/b").validate()


def test_steady_state_rate_is_per_actor_after_its_first_call():
    calls = [  # actor a: calls done at 10, 12, 14 (8 pairs each; the 12 s call reached two writers); b: 11, 15
        {"actor": "a", "done_at": 10.0, "pairs": 8, "gpu_peak": 0},
        {"actor": "a", "done_at": 12.0, "pairs": 5, "gpu_peak": 2**30},
        {"actor": "a", "done_at": 12.0, "pairs": 3, "gpu_peak": 0},
        {"actor": "a", "done_at": 14.0, "pairs": 8, "gpu_peak": 0},
        {"actor": "b", "done_at": 11.0, "pairs": 8, "gpu_peak": 0},
        {"actor": "b", "done_at": 15.0, "pairs": 8, "gpu_peak": 0}]
    r = rates(calls, t_start=4.0)
    assert r["startup_s"] == 6.0 and r["gpu_peak_gib"] == 1.0
    assert r["steady_pairs_per_s"] == 16 / 4 + 8 / 4  # a: 16 pairs in 4 s after its first call; b: 8 in 4 s


def test_fa_noise_is_checked_and_an_older_layout_name_still_resumes(tmp_path):
    from cffa_ray.generate.outputs import check_identity, write_identity

    with pytest.raises(ConfigError, match="--fa_noise 'negate'; choose same or negated"):
        GenerateConfig(checkpoint_dir="c", fa_noise="negate").validate()
    # a folder made when the seed layout was called `numbered`, holding a finished pair, resumes
    ident = identity(resolve(GenerateConfig(checkpoint_dir="c", name=None, png_layout="seed"), None), RECORD)
    write_identity(str(tmp_path), {**ident, "png_layout": "numbered"})
    (tmp_path / "parquet").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pair_id": [0]}), tmp_path / "parquet" / "part-000000-000000-n1.parquet")
    check_identity(str(tmp_path), ident)
    with pytest.raises(ConfigError, match="holds pairs made with different arguments"):
        check_identity(str(tmp_path), {**ident, "steps": 3})
