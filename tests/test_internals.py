"""Each entry of cffa_ray/internals.py still finds what it relies on in the installed libraries.

When a new Ray or torch-fidelity moves one of these private things, the failure names the entry
here, instead of a filter that silently stops filtering or an import that breaks a job.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import ray

from cffa_ray import internals


def test_ray_worker_line_printer_is_where_quiet_wraps_and_cli_stops_it():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    assert hasattr(dispatcher, "_lock") and isinstance(dispatcher.handlers, list), "Ray moved the dispatcher"
    seen = []
    dispatcher.handlers.append((internals.RAY_WORKER_LINE_PRINTER, lambda data: seen.append(data["lines"])))
    try:
        assert internals.filter_worker_lines(lambda line: "drop" not in line)
        dict(dispatcher.handlers)[internals.RAY_WORKER_LINE_PRINTER]({"lines": ["keep me", "drop me"]})
        assert seen == [["keep me"]]
        assert internals.stop_worker_lines()  # cli.last_line: no worker line after the closing line
        dispatcher.emit({"lines": ["after the closing line"]})
        assert seen == [["keep me"]] and internals.RAY_WORKER_LINE_PRINTER not in dict(dispatcher.handlers)
    finally:
        dispatcher.handlers[:] = [h for h in dispatcher.handlers if h[0] != internals.RAY_WORKER_LINE_PRINTER]


def test_ray_data_log_once_keys_and_progress_logger_exist_in_ray_data():
    spec = importlib.util.find_spec(internals.RAY_DATA_PROGRESS_LOGGER)
    assert spec and spec.origin, "Ray Data's progress module (and logger) moved"
    source = open(spec.origin).read()
    for key in internals.RAY_DATA_LOG_ONCE_KEYS:
        assert f'log_once("{key}")' in source, f"Ray Data no longer logs under the key {key}"


def test_mark_logged_once_silences_rays_log_once():
    from ray.util.debug import log_once

    internals.mark_logged_once("cffa-test-key")
    assert log_once("cffa-test-key") is False


def test_ray_train_report_logger_and_logging_config():
    name = internals.ray_train_report_logger()
    assert name.endswith(".py") and "ray/train" in name.replace("\\", "/")
    config = internals.train_logging_config("WARNING")
    assert config.log_level == "WARNING"
    assert logging.getLogger(name) is logging.getLogger(name)


@pytest.mark.slow  # starts Ray
def test_user_exception_message_reads_a_udf_error_out_of_ray_data():
    class BatchTooLarge(RuntimeError):
        pass

    def udf(batch):
        raise BatchTooLarge("--model_batch 8 does not fit; try 4")

    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True)
    try:
        with pytest.raises(Exception) as caught:
            ray.data.range(2).map_batches(udf).take_all()
        assert internals.user_exception_message(caught.value, BatchTooLarge) == "--model_batch 8 does not fit; try 4"
        assert internals.user_exception_message(caught.value, KeyError) is None
        # the block references behind a dataset, with their row counts
        bundles = list(internals.iter_block_bundles(ray.data.range(10, override_num_blocks=2)))
        assert sum(rows for _, rows in bundles) == 10 and all(refs for refs, _ in bundles)
    finally:
        ray.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="needs torch-fidelity")
def test_torch_fidelity_modules_load_without_a_working_torchvision():
    import sys

    before = set(sys.modules)
    extractor = internals.import_torch_fidelity("feature_extractor_inceptionv3")
    fid, kid = internals.import_torch_fidelity("metric_fid"), internals.import_torch_fidelity("metric_kid")
    assert hasattr(extractor, "FeatureExtractorInceptionV3")
    assert callable(fid.fid_statistics_to_metric) and fid.KEY_METRIC_FID
    assert callable(kid.kid_features_to_metric) and kid.KEY_METRIC_KID_MEAN and kid.KEY_METRIC_KID_STD
    stand_in = sys.modules.get("torch_fidelity")
    assert stand_in is None or "torch_fidelity" in before or hasattr(stand_in, "__file__"), \
        "the stand-in for torch_fidelity's __init__ was left in sys.modules"


def test_skipping_deepspeeds_shm_op_builds_nothing_and_leaves_gloo(tmp_path):
    """In a fresh process (DS_ACCELERATOR is read at deepspeed's first import), with an empty extensions folder."""
    code = f"""
import deepspeed.ops, os
from deepspeed.accelerator import get_accelerator
from deepspeed.comm.torch import build_shm_op
from cffa_ray import internals
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
assert builder is not None and builder.NAME == internals.DEEPSPEED_SHM_OP, "DeepSpeed renamed its CPU shm op"
assert deepspeed.ops.__compatible_ops__[builder.NAME] is True, "the op is not built here anyway"
internals.skip_deepspeed_shm_op()
assert build_shm_op() is None, "DeepSpeed no longer reads __compatible_ops__ before building its shm op"
assert os.listdir({str(tmp_path)!r}) == [], "something was compiled"
"""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
