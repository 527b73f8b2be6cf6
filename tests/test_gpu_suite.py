"""bench/gpu_suite.py --smoke: the GPU suite's code runs end to end on CPU with tiny presets and produces
every figure of its table, so the one command that measures a card cannot rot between GPU loans."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, _cli_env, assert_ok


@pytest.mark.slow
@pytest.mark.usefixtures("ray_head")
def test_gpu_suite_smoke_produces_every_figure(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--smoke", "--json", str(out)], cwd=REPO,
                          env=_cli_env(None, False), capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    rows = json.loads(out.read_text())["rows"]
    labels = [r["figure"] for r in rows]
    for part in ("in-process sampler", "Ray job steady state", "joint_sdxl 512x1024: peak GiB",
                 "Ray Train + DeepSpeed", "kernel ms", "training joint_sdxl: plain loop"):
        assert any(part in label for label in labels), part
    measured = {r["figure"]: r["value"] for r in rows}
    assert measured["generation dual_unet: in-process sampler, pairs/s"] > 0
    assert measured["generation dual_unet: Ray job steady state, pairs/s"] > 0
    assert measured["training dual_unet: Ray Train + DeepSpeed, pairs/s"] > 0
    assert measured["training dual_unet: profiled step, kernel ms"] > 0
    assert all(r["met"] is None for r in rows)  # a smoke run checks that figures come, not their values
