"""Checks for the AWS Ray cluster launcher config (cluster.yaml).

Schema validation uses Ray's own code path from `ray up`
(ray.autoscaler._private.commands._bootstrap_config): `prepare_config` merges
the provider defaults, then `validate_config` checks the result against
ray/autoscaler/ray-schema.json plus Ray's extra rules. Only the AWS steps that
need network access (instance-type lookup, IAM/VPC bootstrap) are left out.

The other tests pin down the security and layout decisions documented in the
yaml. Each helper that inspects rules has a positive control, so a check that
can never fail would show up as a failing control.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"

RAY_PUBLIC_SENSITIVE_PORTS = (6379, 8265, 10001)  # GCS, dashboard, Ray Client
GPU_MEMORY_RESOURCES = {"gpu_24gb": 24, "gpu_48gb": 48}
# AWS instance family -> memory (GB) of its single-GPU sizes' GPU.
GPU_FAMILY_MEMORY_GB = {
    "g5": 24,  # NVIDIA A10G
    "g6": 24,  # NVIDIA L4
    "g6e": 48,  # NVIDIA L40S
    "g4dn": 16,  # NVIDIA T4
}
GPU_INSTANCE_PREFIXES = ("g", "p")  # EC2 accelerated-computing GPU families


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def load_raw(path: Path = CLUSTER_YAML) -> Dict[str, Any]:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    assert isinstance(cfg, dict), f"{path} does not contain a mapping"
    return cfg


def ray_validate(raw: Dict[str, Any]) -> Dict[str, Any]:
    """What `ray up` does before touching AWS: prepare_config, validate_config."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def load_and_validate(path: Path) -> Dict[str, Any]:
    return ray_validate(load_raw(path))


@pytest.fixture(scope="module")
def raw() -> Dict[str, Any]:
    return load_raw()


@pytest.fixture(scope="module")
def prepared(raw) -> Dict[str, Any]:
    return ray_validate(raw)


def node_types(cfg: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return cfg["available_node_types"]


def gpu_worker_types(cfg: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    head = cfg["head_node_type"]
    return {
        name: nt
        for name, nt in node_types(cfg).items()
        if name != head
        and (
            nt.get("resources", {}).get("GPU", 0) > 0
            or nt["node_config"]
            .get("InstanceType", "")
            .startswith(GPU_INSTANCE_PREFIXES)
        )
    }


def walk(obj: Any) -> Iterator[Any]:
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


def iter_ingress_rules(cfg: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """Every EC2-style ingress rule anywhere in the config."""
    for node in walk(cfg):
        if isinstance(node, dict):
            for key in ("IpPermissions", "SecurityGroupIngress"):
                rules = node.get(key)
                if isinstance(rules, list):
                    yield from (r for r in rules if isinstance(r, dict))


def _is_world(cidr: str) -> bool:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False
    return net.prefixlen == 0


def rule_exposes_port_to_world(rule: Dict[str, Any], port: int) -> bool:
    cidrs = [r.get("CidrIp", "") for r in rule.get("IpRanges", []) or []]
    cidrs += [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges", []) or []]
    if not any(_is_world(c) for c in cidrs):
        return False
    proto = str(rule.get("IpProtocol", "tcp")).lower()
    if proto in ("-1", "all"):
        return True  # every protocol and port
    if proto not in ("tcp", "6", "udp", "17"):
        return False
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if lo in (-1, None) and hi in (-1, None):
        return True
    return int(lo) <= port <= int(hi)


def world_exposed_ray_ports(cfg: Dict[str, Any]) -> List[tuple]:
    return [
        (port, rule)
        for rule in iter_ingress_rules(cfg)
        for port in RAY_PUBLIC_SENSITIVE_PORTS
        if rule_exposes_port_to_world(rule, port)
    ]


def all_commands(cfg: Dict[str, Any]) -> List[str]:
    cmds: List[str] = []
    for key in (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        cmds += cfg.get(key) or []
    for nt in node_types(cfg).values():
        for key in ("initialization_commands", "worker_setup_commands"):
            cmds += nt.get(key) or []
    return cmds


TORCH_CUDA_INSTALL = re.compile(
    r"pip install\b.*\btorch\b.*--(?:index-url|extra-index-url)[ =]"
    r"https://download\.pytorch\.org/whl/cu\d+"
)
PROJECT_INSTALL = re.compile(r"pip install\b.*(?:-e\s+\S*cffa-ray|cffa-ray\S*\s*@)")


def torch_cuda_before_project(commands: List[str]) -> bool:
    torch_idx = [i for i, c in enumerate(commands) if TORCH_CUDA_INSTALL.search(c)]
    proj_idx = [i for i, c in enumerate(commands) if PROJECT_INSTALL.search(c)]
    return bool(torch_idx) and bool(proj_idx) and min(torch_idx) < min(proj_idx)


CREDENTIAL_PATTERNS = [
    re.compile(r"aws_access_key_id", re.I),
    re.compile(r"aws_secret_access_key", re.I),
    re.compile(r"aws_session_token", re.I),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    # 40-char base64-ish blob, the shape of an AWS secret key
    re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
]


def find_credentials(text: str) -> List[str]:
    return [m.group(0) for p in CREDENTIAL_PATTERNS for m in p.finditer(text)]


# --------------------------------------------------------------------------- #
# Ray's own schema validation
# --------------------------------------------------------------------------- #


def test_validates_with_ray_autoscaler_schema(prepared):
    # prepare_config fills defaults like cluster_synced_files; validate_config
    # ran in the fixture and raised on any problem.
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_raw_file_is_not_valid_without_prepare_config(raw):
    # Shows validate_config is strict: it needs the defaults that `ray up`
    # merges in, so the test above really depends on prepare_config.
    stripped = {k: v for k, v in raw.items() if k != "cluster_synced_files"}
    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(stripped)


def _set(path: List[Any], value: Any) -> Callable[[Dict[str, Any]], None]:
    def mutate(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


BROKEN_CONFIGS = {
    "max_workers_is_string": (_set(["max_workers"], "ten"), jsonschema.ValidationError),
    "gpu_count_is_fractional": (
        _set(["available_node_types", "gpu_24gb", "resources", "GPU"], 0.5),
        jsonschema.ValidationError,
    ),
    "resource_negative": (
        _set(["available_node_types", "gpu_48gb", "resources", "gpu_48gb"], -1),
        jsonschema.ValidationError,
    ),
    "unknown_node_type_key": (
        _set(["available_node_types", "cpu", "min_worker"], 0),
        jsonschema.ValidationError,
    ),
    "setup_command_not_a_string": (
        _set(["setup_commands"], [["pip", "install", "torch"]]),
        jsonschema.ValidationError,
    ),
    "idle_timeout_negative": (_set(["idle_timeout_minutes"], -5), jsonschema.ValidationError),
    "unknown_security_group_key": (
        _set(["provider", "security_group", "Ingress"], []),
        jsonschema.ValidationError,
    ),
    "head_type_missing": (_set(["head_node_type"], "nope"), ValueError),
    "min_workers_exceed_max": (
        _set(["available_node_types", "cpu", "min_workers"], 1000),
        ValueError,
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CONFIGS))
def test_broken_copy_is_rejected(raw, tmp_path, case):
    mutate, error = BROKEN_CONFIGS[case]
    broken = copy.deepcopy(raw)
    mutate(broken)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(error):
        load_and_validate(path)


def test_unbroken_roundtrip_copy_is_accepted(raw, tmp_path):
    # Control for the test above: the dump/load round trip alone is fine.
    path = tmp_path / "copy.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(raw)))
    load_and_validate(path)


# --------------------------------------------------------------------------- #
# security
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "rule, exposed",
    [
        ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
          "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, True),
        ({"IpProtocol": "tcp", "FromPort": 6000, "ToPort": 7000,
          "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, True),
        ({"IpProtocol": "tcp", "FromPort": 10001, "ToPort": 10001,
          "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}, True),
        ({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, True),
        ({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
          "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, False),
        ({"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
          "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}, False),
    ],
)
def test_port_exposure_detector(rule, exposed):
    cfg = {"available_node_types": {},
           "provider": {"security_group": {"IpPermissions": [rule]}}}
    assert bool(world_exposed_ray_ports(cfg)) is exposed


def test_ray_ports_not_open_to_internet(raw, prepared):
    for cfg in (raw, prepared):
        assert world_exposed_ray_ports(cfg) == []


def test_only_ssh_may_be_opened_by_extra_rules(raw):
    for rule in iter_ingress_rules(raw):
        assert rule.get("IpProtocol") == "tcp"
        assert rule.get("FromPort") == 22 and rule.get("ToPort") == 22, rule


def test_credential_detector_catches_keys():
    fake = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert find_credentials(f"x: {fake}")
    assert find_credentials("aws_secret_access_key: x")
    assert find_credentials("Aws_Access_Key_Id = y")
    assert not find_credentials("IamInstanceProfile: arn:aws:iam::123456789012:x")


def test_no_aws_credentials_in_file():
    assert find_credentials(CLUSTER_YAML.read_text()) == []


def test_no_ray_token_value_in_file(raw):
    # The token travels as a file (~/.ray/auth_token), never as a literal.
    for cmd in all_commands(raw):
        assert "RAY_AUTH_TOKEN=" not in cmd, cmd


def test_head_runs_no_training_work(raw):
    head = node_types(raw)[raw["head_node_type"]]
    res = head["resources"]
    assert res.get("CPU") == 0
    assert res.get("GPU", 0) == 0
    assert not set(res) & set(GPU_MEMORY_RESOURCES)
    assert not head["node_config"]["InstanceType"].startswith(GPU_INSTANCE_PREFIXES)
    assert "InstanceMarketOptions" not in head["node_config"]  # no spot head


# --------------------------------------------------------------------------- #
# GPU / worker layout
# --------------------------------------------------------------------------- #


def test_gpu_workers_scale_from_zero(raw):
    gpus = gpu_worker_types(raw)
    assert gpus
    for name, nt in gpus.items():
        assert nt.get("min_workers") == 0, name
        assert isinstance(nt.get("max_workers"), int) and nt["max_workers"] > 0, name
        assert nt["max_workers"] <= raw["max_workers"], name


@pytest.mark.parametrize("resource, gb", sorted(GPU_MEMORY_RESOURCES.items()))
def test_gpu_memory_class_exists_and_matches_instance(raw, resource, gb):
    matching = {
        name: nt for name, nt in gpu_worker_types(raw).items()
        if nt["resources"].get(resource, 0) >= 1
    }
    assert matching, f"no node type offers {resource}"
    for name, nt in matching.items():
        assert nt["resources"].get("GPU", 0) >= 1, name
        family = nt["node_config"]["InstanceType"].split(".")[0]
        assert GPU_FAMILY_MEMORY_GB.get(family) == gb, (name, family)


def test_gpu_workers_declare_a_memory_class(raw):
    for name, nt in gpu_worker_types(raw).items():
        assert set(nt["resources"]) & set(GPU_MEMORY_RESOURCES), name


def test_cpu_worker_type_for_ray_data(raw):
    cpu_types = {
        name: nt for name, nt in node_types(raw).items()
        if name != raw["head_node_type"] and name not in gpu_worker_types(raw)
    }
    assert cpu_types
    for name, nt in cpu_types.items():
        assert nt.get("min_workers") == 0, name
        assert nt.get("max_workers", 0) > 0, name


def test_workers_have_instance_profile_for_s3(raw):
    for name, nt in node_types(raw).items():
        arn = nt["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        if name != raw["head_node_type"]:
            assert arn.startswith("arn:aws:iam::"), name


def test_idle_timeout_set(raw):
    assert isinstance(raw.get("idle_timeout_minutes"), (int, float))
    assert raw["idle_timeout_minutes"] > 0


# --------------------------------------------------------------------------- #
# setup / start commands
# --------------------------------------------------------------------------- #


def test_torch_order_detector():
    torch = "pip install torch --index-url https://download.pytorch.org/whl/cu128"
    proj = 'pip install -e "$HOME/cffa-ray[cloud]"'
    assert torch_cuda_before_project([torch, proj])
    assert not torch_cuda_before_project([proj, torch])
    assert not torch_cuda_before_project(["pip install torch", proj])


def test_cuda_torch_installed_on_every_node_before_project(prepared):
    # After prepare_config, head_setup_commands = setup_commands + head extras
    # and worker_setup_commands = setup_commands + worker extras.
    assert torch_cuda_before_project(prepared["head_setup_commands"])
    assert torch_cuda_before_project(prepared["worker_setup_commands"])


def test_project_mounted_from_working_dir(raw):
    assert raw["file_mounts"].get("~/cffa-ray") == "."
    assert ".venv" in raw.get("rsync_exclude", [])


def test_storage_location_is_s3_env_var(raw):
    setup = "\n".join(raw["setup_commands"])
    assert re.search(r"CFFA_STORAGE=s3://[\w.\-]+/", setup)


def test_auth_token_reaches_every_node(raw):
    # Workers get file_mounts from the head, so one mount covers all nodes.
    assert raw["file_mounts"].get("~/.ray/auth_token")
    assert any("~/.ray/auth_token" in c and "test -s" in c for c in raw["setup_commands"])


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_ray_start_uses_token_auth(raw, key):
    starts = [c for c in raw[key] if "ray start" in c]
    assert starts
    for cmd in starts:
        assert re.search(r"\bRAY_AUTH_MODE=token\b", cmd), cmd


def test_head_start_is_head_and_workers_join_head(raw):
    assert all("--head" in c for c in raw["head_start_ray_commands"] if "ray start" in c)
    for c in raw["worker_start_ray_commands"]:
        if "ray start" in c:
            assert "--head" not in c and "$RAY_HEAD_IP" in c
