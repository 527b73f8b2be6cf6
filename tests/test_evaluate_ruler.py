"""The second ruler of `cffa evaluate` on CPU, without Ray: vessel topology (a tree vs a mesh, a shift changes
nothing), memorisation (copies of training images flagged, held-out images not) and utility (TSTR: the real
training pairs as "generated" read ~1, mismatched pairs clearly less)."""
import numpy as np
import pytest
from scipy import ndimage as ndi

from cffa_ray.evaluate import memorisation, topology, utility
from cffa_ray.evaluate.vessels import fa_vessels, pair_masks
from cffa_ray.synth import make_pair

TSTR_STEPS = 100  # per training; the CLI default is 300. The 4 trainings take ~15 s on 32-px pairs (43-52 s at
# 64 px, 2026-12-07); 50 steps left the two real seeds too far apart (Dice 0.49 against 0.33 at 64 px)


def synthetic_pairs(n, size=64, seed=0):
    """CF uint8 [N, S, S, 3], FA uint8 [N, S, S] of the project's synthetic registered pairs."""
    pairs = [make_pair(np.random.default_rng([seed, k]), size) for k in range(n)]
    return np.stack([np.asarray(cf) for cf, _ in pairs]), np.stack([np.asarray(fa) for _, fa in pairs])


# ------------------------------------------------------------------ topology

@pytest.fixture(scope="module")
def fa_maps():
    cfs, fas = synthetic_pairs(10)
    masks = [pair_masks(c, f) for c, f in zip(cfs, fas)]
    return fas, masks, [fa_vessels(f, m) for f, m in zip(fas, masks)]


def test_topology_flags_a_mesh_made_of_real_vessel_trees(fa_maps):
    _, masks, maps = fa_maps
    real = [topology.image_topology(v, m) for v, m in zip(maps, masks)]
    # a mesh: the max of rotated copies of each real map; its lines cross, closing loops
    meshes = [np.max([ndi.rotate(v, a, reshape=False, order=1) for a in (0, 45, 90, 135)], axis=0) * m
              for v, m in zip(maps, masks)]
    mesh = topology.summarise([topology.image_topology(v, m) for v, m in zip(meshes, masks)], real)
    assert mesh["far"] and mesh["max_abs_d"] > 2 * topology.FAR, mesh
    assert mesh["loops"]["generated"]["mean"] > mesh["loops"]["real"]["mean"] + 2, mesh["loops"]
    assert mesh["branch_points"]["d"] > topology.FAR and mesh["segment_length"]["d"] < -topology.FAR
    assert np.mean([t["loops"] for t in real]) < 1  # the synthetic trees have (almost) no loops


def test_topology_does_not_see_a_shift(fa_maps):
    fas, masks, _ = fa_maps
    real = [topology.image_topology(fa_vessels(f, m), m) for f, m in zip(fas, masks)]
    shifted = []
    for f, m in zip(fas, masks):
        moved = np.roll(f, 4, axis=1)
        both = m & np.roll(m, 4, axis=1)
        shifted.append(topology.image_topology(fa_vessels(moved, both), both))
    same = topology.summarise(shifted, real)
    # what changes is only the fundus the shifted pair still shares (4 px less on two sides): well inside
    # the sampling noise of 10 images, a tenth of the mesh's distance
    assert not same["far"] and same["max_abs_d"] < 1.0, same
    itself = topology.summarise(real, real)
    assert itself["max_abs_d"] == 0.0


def test_topology_of_a_blank_map():
    t = topology.image_topology(np.zeros((32, 32), np.float32))
    assert t["density"] == 0 and t["loops"] == 0 and np.isnan(t["branch_points"])
    assert np.isnan(topology.image_topology(np.ones((8, 8), np.float32), np.zeros((8, 8), bool))["density"])


def test_a_ring_has_one_loop_and_a_line_none():
    ring = np.zeros((48, 48), np.float32)
    yy, xx = np.mgrid[:48, :48]
    ring[np.abs(np.hypot(yy - 24, xx - 24) - 12) < 1.5] = 1
    line = np.zeros((48, 48), np.float32)
    line[24, 5:40] = 1
    assert topology.image_topology(ring)["loops"] == 1 and topology.image_topology(line)["loops"] == 0
    t = topology.image_topology(line)
    assert t["end_points"] > 0 and t["branch_points"] == 0 and t["segment_length"] > 25


# ------------------------------------------------------------------ memorisation

def test_memorisation_flags_copies_of_training_images_and_not_held_out_ones():
    train_cf, train_fa = synthetic_pairs(24, seed=0)
    held_cf, held_fa = synthetic_pairs(24, seed=1)
    new_cf, new_fa = synthetic_pairs(24, seed=2)  # unseen real images, as a model that does not copy makes
    rng = np.random.default_rng(0)
    for train, held, new in ((train_cf, held_cf, new_cf), (train_fa, held_fa, new_fa)):
        t = memorisation.embed_all(train)
        # copies with noise, one moved by a pixel
        copies = np.clip(train[:12].astype(float) + rng.normal(0, 6, train[:12].shape), 0, 255).astype(np.uint8)
        copies[0] = np.roll(copies[0], 1, axis=1)
        res = memorisation.compare(memorisation.embed_all(copies), memorisation.embed_all(held), t)
        assert res["fraction_above"] == 1.0, res
        assert (res["generated_nn"] == np.arange(12)).all()          # each copy finds its own original
        assert res["generated"]["min"] > 0.7 > res["held_out"]["max"]
        res = memorisation.compare(memorisation.embed_all(new), memorisation.embed_all(held), t)
        assert res["fraction_above"] <= 1 / 12, res
        assert abs(res["generated"]["mean"] - res["held_out"]["mean"]) < 0.1


def test_embedding_is_unit_norm_and_blank_safe():
    cf, fa = synthetic_pairs(1)
    assert np.linalg.norm(memorisation.embed(cf[0])) == pytest.approx(1, abs=1e-5)
    assert np.linalg.norm(memorisation.embed(fa[0])) == pytest.approx(1, abs=1e-5)
    assert not memorisation.embed(np.zeros((64, 64), np.uint8)).any()


# ------------------------------------------------------------------ utility (TSTR)

@pytest.fixture(scope="module")
def tstr_real():
    """(train CF, train FA), (test CF, test FA) at 32 px: the test's subject is the ruler, not the resolution."""
    return synthetic_pairs(12, 32, seed=0), synthetic_pairs(8, 32, seed=1)


def _scores(pairs, test, seed=0):
    return utility.train_and_score(*pairs, *test, TSTR_STEPS, seed, False)


@pytest.mark.slow  # trains four networks
def test_tstr_real_pairs_as_generated_read_one_and_mismatched_pairs_less(tstr_real):
    (cf, fa), test = tstr_real
    real = {"real": _scores((cf, fa), test), "real_seed2": _scores((cf, fa), test, seed=1)}
    order = np.random.default_rng(3).permutation(len(cf))  # the same pairs, met in another order
    same = utility.summarise({"synthetic": _scores((cf[order], fa[order]), test), **real})
    for k in ("dice", "ssim", "psnr"):
        noise = same[k]["seed_spread"]
        assert abs(same[k]["ratio"] - 1) <= max(3 * noise, 0.03), (k, same[k])
    assert same["dice"]["real"]["mean"] > 0.3                          # the network learnt where vessels go
    # CF i with FA i+1: no vessel shared
    mismatched = utility.summarise({"synthetic": _scores((cf, np.roll(fa, 1, axis=0)), test), **real})
    assert mismatched["dice"]["ratio"] < 1 - max(5 * mismatched["dice"]["seed_spread"], 0.2), mismatched["dice"]
    assert mismatched["dice"]["ratio"] < same["dice"]["ratio"] - 0.2


# ------------------------------------------------------------------ through the real CLI

def test_utility_needs_training_and_held_out_pairs(capsys, tmp_path, pairs_dir):
    from tests.helpers import fails_in_driver

    out = tmp_path / "eval"
    argv = ["evaluate", "--generated", pairs_dir, "--real", pairs_dir, "--output", out, "--utility"]
    fails_in_driver(capsys, argv, r"--utility needs the real training pairs: give --real_train", out)
    fails_in_driver(capsys, [*argv, "--real_train", pairs_dir], r"--utility needs held-out .*: give --real_test", out)
    fails_in_driver(capsys, [*argv, "--real_train", tmp_path / "nope", "--real_test", pairs_dir],
                    r"--real_train .*nope does not exist", out)
    fails_in_driver(capsys, [*argv, "--real_train", pairs_dir, "--real_test", pairs_dir, "--utility_steps", 0],
                    r"--utility_steps 0 must be > 0", out)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_head")
def test_evaluate_second_ruler_through_the_cli(pairs_dir, tmp_path):
    """The training pairs themselves as the generated set: memorisation flags every image (and names its
    original), the held-out pairs are not flagged, topology reads no difference, TSTR reads 1."""
    import csv
    import json

    from cffa_ray.synth import write_synthetic_pairs
    from tests.helpers import assert_ok, run_cli

    write_synthetic_pairs(tmp_path / "held_out", 8, 64, seed=1)
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--generated", pairs_dir, "--real", pairs_dir, "--output", out, "--real_train",
                   pairs_dir, "--real_test", tmp_path / "held_out", "--utility", "--utility_steps", 8)
    assert_ok(proc)
    printed = {ln.split(" (")[0]: ln for ln in proc.stdout.splitlines() if ln.startswith("[cffa] ")}
    assert {"[cffa] topology", "[cffa] memorisation", "[cffa] utility"} <= set(printed), proc.stdout
    assert "CF 100.0% flagged" in printed["[cffa] memorisation"] and "vessel Dice 1.000" in printed["[cffa] utility"]
    ev = json.loads((out / "evaluation.json").read_text())
    for m in ("cf", "fa"):
        assert ev["topology"][m]["max_abs_d"] == 0.0 and not ev["topology"][m]["far"]
        assert ev["memorisation"][m]["fraction_above"] == 1.0
        assert ev["memorisation"][m]["generated"]["min"] > 0.999 > ev["memorisation"][m]["held_out"]["max"]
    assert ev["memorisation"]["train"] == {"path": str(pairs_dir), "from": "--real_train", "pairs": 16}
    u = ev["utility"]
    assert u["pairs"] == {"synthetic": 16, "real": 16, "test": 8} and u["steps"] == 8
    assert all(u["scores"][k]["ratio"] == pytest.approx(1.0) for k in ("psnr", "ssim", "dice"))
    assert u["scores"]["dice"]["seed_spread"] is not None
    rows = list(csv.DictReader((out / "pairs.csv").open()))
    gen = [r for r in rows if r["set"] == "generated"]
    assert all(r["nn_fa_train_file"] == str(pairs_dir / "fa" / f"{r['pair_id']}.png") for r in gen)
    assert len([r for r in rows if r["set"] == "real_test"]) == 8 and gen[0]["fa_loops"] != ""
    md = (out / "evaluation.md").read_text()
    assert "## Vessel topology" in md and "## Memorisation" in md and "## Utility" in md
    report = run_cli("report", out)
    assert_ok(report)
    page = (out / "report.html").read_text()
    assert "utility (TSTR) ratio synthetic / real: vessel Dice 1.000" in page and "Vessel topology" in page
