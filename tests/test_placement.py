"""--worker_resources (placing work on a node type) and the shared-storage checks, without a cluster.

The multi-node behaviour itself is in tests/test_multinode.py (simulated clusters, slow).
"""
import pytest

from cffa_ray import internals
from cffa_ray.cli import build_parser
from cffa_ray.config import parse_resources
from cffa_ray.generate.config import GenerateConfig
from cffa_ray.shared_storage import NotShared, check_driver_record, local_folder
from cffa_ray.train.config import TrainConfig
from tests.helpers import fails_in_driver as _fails
from tests.helpers import gen_argv, train_argv


def test_worker_resources_parse_and_reach_every_placed_part():
    assert parse_resources("worker_resources", '{"gpu_24gb": 1, "spot": 0.5}') == {"gpu_24gb": 1.0, "spot": 0.5}
    assert parse_resources("worker_resources", None) == {}
    assert TrainConfig(data="x", worker_resources='{"a10g": 1}').custom_resources == {"a10g": 1.0}
    assert GenerateConfig(checkpoint_dir="c", worker_resources='{"a10g": 2}').custom_resources == {"a10g": 2.0}


@pytest.mark.parametrize("command", ["train", "generate"])
def test_worker_resources_in_help(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--worker_resources WORKER_RESOURCES custom Ray resources" in text
    assert "gpu_24gb" in text and "(default: none)" in text


@pytest.mark.parametrize("value, pattern", [
    ("gpu_24gb", r"give a JSON object of custom Ray resources, e.g. '\{\"gpu_24gb\": 1\}'"),
    ("{}", r"give a JSON object"),
    ('{"GPU": 1}', r"GPU is not a custom resource of a node type; use --use_gpu"),
    ('{"CPU": 2}', r"CPU is not a custom resource .* use --cpus_per_worker / --cpus_per_actor"),
    ('{"accelerator_type:A10G": 1}', r"give custom resources only"),
    ('{"gpu_24gb": 0}', r"gpu_24gb 0 must be a fraction up to 1 or a whole number"),
    ('{"gpu_24gb": 1.5}', r"gpu_24gb 1.5 must be a fraction up to 1 or a whole number"),
    ('{"gpu_24gb": "1"}', r"gpu_24gb '1' must be"),
])
def test_bad_worker_resources_refused_before_any_work(capsys, tmp_path, data, fake_checkpoint, value, pattern):
    _fails(capsys, train_argv(data, tmp_path / "out", "--worker_resources", value), pattern, tmp_path / "out")
    _fails(capsys, gen_argv(fake_checkpoint, tmp_path / "gen", "--worker_resources", value), pattern, tmp_path / "gen")


def test_shared_storage_helpers(tmp_path):
    assert local_folder("s3://bucket/runs") is None and local_folder("gs://b/x") is None
    assert local_folder(f"file://{tmp_path}") == str(tmp_path)
    assert local_folder("relative") == str((tmp_path.cwd() / "relative").absolute())
    (tmp_path / "generation.json").write_text("{}")
    check_driver_record(str(tmp_path / "generation.json"), "--output_dir", str(tmp_path))  # seen: no error
    check_driver_record("s3://bucket/out/generation.json", "--output_dir", "s3://bucket/out")  # never probed
    wrapped = RuntimeError(f"ray.exceptions.RayTaskError(NotShared): ...\n{NotShared.__name__}: --output_dir /x is "
                           "not the same folder on every node (node 1.2.3.4 ab) ...; use storage\n")
    message = internals.user_exception_message(wrapped, NotShared)
    assert message.startswith("--output_dir /x is not the same folder on every node")
    assert internals.user_exception_message(ValueError("other"), NotShared) is None
