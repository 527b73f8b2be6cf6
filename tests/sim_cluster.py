"""Simulated multi-node Ray clusters on one machine, for the tests and bench/scaling.py.

Three kinds of node, all real Ray processes:

* `SimCluster`: Ray's own `ray.cluster_utils.Cluster` (a head and worker "nodes", each its own raylet
  with its own resources), owned by a helper process (this file run as a script) that the test
  drives over a pipe: `add_node`, `remove_node` (SIGKILL when not graceful), `nodes`, `actors`.
  Ray keeps process-wide state (the auth mode and token read at import, the current-cluster file,
  exit hooks, `add_node` working only from the main thread), so it lives in that process, started
  with this test's own RAY_TMPDIR and token, never in pytest's.
* `namespaced_node`: a worker node started with `ray start --block` inside its own mount namespace
  (`unshare -m`), where a bind mount hides one folder behind a disk only that node sees.
* `AutoscalingHead`: `ray start --head --autoscaling-config=... --block` with Ray's fake multi-node
  provider (RAY_FAKE_CLUSTER=1), which starts worker nodes of the configured types on demand and
  removes them when idle.

Every process started here carries this cluster's temp dir (short, under /tmp) on its command line;
`stop()` kills the process groups it started, then whatever still names that temp dir, and nothing
else: other Ray clusters on the machine are never touched (no `ray stop`).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE_BYTES = 100 * 2**20  # per node: the jobs here move kilobytes; Ray's minimum is 75 MiB
REPLY = "@@sim-cluster "  # marks the helper's answers on its stdout
# Ray's switch for clusters on laptops; off, a process without a node takes 127.0.0.1 for its address.
# (`ray start` of a worker node refuses to run with it off: that one gets --node-ip-address instead.)
LOCAL_IP = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# A raylet waits this long for its node's agents (Python processes, slow to start when several nodes
# start at once on 2 cores) before it gives up and dies; Ray's default is 30 s.
AGENT_WAIT = {"RAY_agent_register_timeout_ms": "120000"}
# The GCS declares a node dead after this many failed health checks this far apart (Ray's defaults: 5, 3 s).
# A killed node's checks fail at once (connection refused), so a lost node is seen in ~3 s instead of ~15 s;
# a busy one's checks still wait out Ray's timeout (10 s) each, three in a row.
NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def hard_timeout(seconds: int, what: str):
    """Raise TimeoutError in the main thread after `seconds` (a test that would hang fails instead)."""
    def fire(signum, frame):
        raise TimeoutError(f"{what} ran past its hard timeout of {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    """Poll `predicate` until it returns something truthy (returned); AssertionError after `timeout`."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(every)


def default_sigint() -> None:
    """preexec_fn: SIGINT at its default, as in a terminal. A test session in the background (`pytest ... &`)
    ignores it and every child inherits that: `ray start --block` would not end on it, and Ray's workers fail
    on a cancelled task ("'Handlers' object is not callable": Ray's DeferSigint calls the saved SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_group(proc: subprocess.Popen, grace: float = 10, signum: int = signal.SIGTERM) -> None:
    """`signum` to the process group `proc` leads (started with start_new_session), SIGKILL after `grace`.
    (`ray start --block` ends in ~1 s on SIGINT, as on Ctrl-C, but takes 10 s over SIGTERM.)"""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def kill_leftovers(marker: str) -> list[int]:
    """SIGKILL every process whose command line names `marker` (this cluster's own temp dir)."""
    pids = [int(p) for p in subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


class Ray:
    """What every process of one simulated cluster shares: its temp dir, auth token and environment, and
    the helper process that queries it (and, for SimCluster, owns it)."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root)
        # a short temp dir: Ray's unix socket paths must stay under ~107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="cffa-mn-", dir="/tmp")
        self.token = self.root / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        # LOCAL_IP: where a process has no node to ask, Ray takes the address that routes to the internet
        # as this host's; every node, driver and helper here must use loopback instead.
        self.env = {**os.environ, **(env or {}), "RAY_TMPDIR": self.temp_dir, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(self.token), "PYTHONUNBUFFERED": "1", **LOCAL_IP, **AGENT_WAIT,
                    **NODE_DEATH}
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            self.env.pop(name, None)
        self.address: str | None = None  # the GCS address, once a head runs
        self.procs: list[subprocess.Popen] = []

    # ---- drivers
    def driver_env(self, **extra: str) -> dict[str, str]:
        """The environment of a `cffa` driver joining this cluster, as a user's shell on the head has it."""
        assert self.address, "no head yet"
        return {**self.env, "RAY_ADDRESS": self.address, **extra}

    def start_cffa(self, log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """`python -m cffa_ray.cli ARGS` joining this cluster, output to `log`, in its own session."""
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cffa_ray.cli", *map(str, args)], cwd=REPO,
                                    env=self.driver_env(**(env or {})), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    # ---- the helper process
    def _start_helper(self) -> None:
        with open(self.root / "sim_cluster_helper.log", "w") as err:
            self.helper = subprocess.Popen([sys.executable, __file__, "serve"], cwd=REPO, env=self.env,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                           start_new_session=True)
        self.procs.append(self.helper)

    def call(self, op: str, timeout: float = 90, **args):
        """Send one command to the helper and return its answer (AssertionError on its error)."""
        self.helper.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.helper.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.helper.stdout, selectors.EVENT_READ)
        deadline = time.time() + timeout
        while True:
            assert time.time() < deadline, f"the cluster helper did not answer {op} in {timeout} s"
            if not sel.select(timeout=max(0.0, deadline - time.time())):
                continue
            line = self.helper.stdout.readline()
            log = (self.root / "sim_cluster_helper.log").read_text()[-3000:]
            assert line, f"the cluster helper exited ({self.helper.poll()}): {log}"
            if line.startswith(REPLY):
                reply = json.loads(line[len(REPLY):])
                assert "error" not in reply, f"{op}: {reply['error']}"
                return reply

    def nodes(self) -> list[dict]:
        """Alive nodes: {node_id, resources, is_head}."""
        return self.call("nodes")["nodes"]

    def worker_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if not n["is_head"]]

    def actors(self, class_part: str, state: str | None = "ALIVE") -> list[dict]:
        """Actors whose class name contains `class_part`, in `state` (None: any): {class_name, node_id, pid,
        state, death_cause} (death_cause: why a DEAD one ended, in Ray's words; else None)."""
        found = self.call("actors", class_part=class_part)["actors"]
        return [a for a in found if state is None or a["state"] == state]

    # ---- the end
    def __exit__(self, exc_type, *exc) -> None:
        survivors = self.stop()
        assert exc_type is not None or not survivors, f"processes of {self.temp_dir} outlived stop(): {survivors}"

    def stop(self) -> list[int]:
        """Stop what this cluster started (see the module doc); returns the pids still found at the end."""
        helper = getattr(self, "helper", None)
        if helper is not None and helper.poll() is None:
            with contextlib.suppress(Exception):
                self.call("shutdown", timeout=60)
        for proc in reversed(self.procs):
            kill_group(proc, signum=signal.SIGINT if proc.args[:2] == [RAY, "start"] else signal.SIGTERM)
        survivors = kill_leftovers(self.temp_dir)
        for _ in range(3):  # workers of a killed raylet exit on their own; catch any that did not
            time.sleep(0.5)
            survivors = kill_leftovers(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return survivors


class SimCluster(Ray):
    """A ray.cluster_utils.Cluster in the helper process (see the module doc). Use as a context manager."""

    def __init__(self, root: Path, head_cpus: float = 1, head_resources: dict | None = None,
                 env: dict[str, str] | None = None):
        super().__init__(root, env)
        self.head_args = {"num_cpus": head_cpus, "resources": head_resources or {}}

    def __enter__(self) -> "SimCluster":
        self._start_helper()
        try:
            self.address = self.call("start_head", timeout=120, **self.head_args)["address"]
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, num_cpus: float = 1, resources: dict | None = None) -> str:
        """Start a worker node (3-6 s); returns its node id."""
        return self.call("add_node", num_cpus=num_cpus, resources=resources or {})["node_id"]

    def remove_node(self, node_id: str, graceful: bool = False) -> float:
        """Kill every process of the node (SIGKILL unless graceful); returns the seconds it took."""
        return self.call("remove_node", node_id=node_id, graceful=graceful)["seconds"]


def fake_cluster_config(cluster_yaml: Path, gcs_address: str, head_cpus: float, max_workers: int,
                        idle_timeout_minutes: float) -> dict:
    """cluster.yaml's node types scaled down for the fake multi-node provider.

    Each worker type keeps its custom resources (the accelerator names `--worker_resources` asks for;
    GPU is left out, there is none) with 1 CPU and a small object store, at most `max_workers` nodes of
    it; the cluster as a whole at most cluster.yaml's max_workers or the types' sum, whichever is less.
    """
    import yaml

    raw = yaml.safe_load(Path(cluster_yaml).read_text())
    types = {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    for name, node_type in raw["available_node_types"].items():
        if name == raw["head_node_type"]:
            continue
        accelerators = {k: 1 for k in node_type.get("resources", {}) if k not in ("CPU", "GPU", "memory")}
        types[name] = {"resources": {"CPU": 1, **accelerators, "object_store_memory": OBJECT_STORE_BYTES},
                       "node_config": {}, "min_workers": 0,
                       "max_workers": min(node_type.get("max_workers", max_workers), max_workers)}
    total = min(raw.get("max_workers", 10**6), sum(t["max_workers"] for t in types.values()))
    return {
        "cluster_name": "cffa-fake", "max_workers": total, "upscaling_speed": raw.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ray"}, "available_node_types": types, "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class AutoscalingHead(Ray):
    """`ray start --head --autoscaling-config=... --block` with Ray's fake multi-node provider: worker
    nodes of cluster.yaml's types (scaled down) start on demand and go when idle."""

    def __init__(self, root: Path, cluster_yaml: Path, head_cpus: float = 2, max_workers: int = 3,
                 idle_timeout_minutes: float = 0.5, env: dict[str, str] | None = None):
        super().__init__(root, {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(env or {})})
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.config = self.root / "fake_cluster.yaml"
        self.config.write_text(json.dumps(fake_cluster_config(cluster_yaml, self.address, head_cpus, max_workers,
                                                              idle_timeout_minutes)))
        self.start = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                      f"--num-cpus={head_cpus}", f"--object-store-memory={OBJECT_STORE_BYTES}",
                      f"--autoscaling-config={self.config}", f"--temp-dir={self.temp_dir}",
                      "--min-worker-port=0", "--max-worker-port=0",
                      "--dashboard-host=127.0.0.1", *ray_start_ports("dashboard-port", "ray-client-server-port")]

    def __enter__(self) -> "AutoscalingHead":
        with open(self.root / "head.log", "w") as out:
            self.procs.append(subprocess.Popen(self.start, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True, preexec_fn=default_sigint))
        self._start_helper()
        try:
            wait_for(self._gcs_listening, 120, "the autoscaling head to come up", every=0.5)
            self.call("attach", timeout=120, address=self.address)
        except BaseException:
            self.stop()
            raise
        return self

    def _gcs_listening(self) -> bool:
        assert self.procs[0].poll() is None, (self.root / "head.log").read_text()[-3000:]
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", int(self.address.rsplit(":", 1)[1]))) == 0


def ray_start_ports(*extra: str) -> list[str]:
    """Free ports for every listening port of a `ray start` node (other Ray clusters share this machine)."""
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", *extra)
    return [f"--{name}={free_port()}" for name in names]


def namespaced_node(cluster: Ray, private_disk: Path, mount_over: Path, log: Path, num_cpus: float = 1,
                    resources: dict | None = None) -> subprocess.Popen:
    """A worker node of `cluster` in its own mount namespace, where `mount_over` shows `private_disk`.

    Returns the node's process (its own process group). Needs root (unshare, mount). The node is started
    as Ray's fake autoscaler starts its nodes (`serve_node`): `ray start --address=127.0.0.1:...` would
    swap loopback for the host's routable address, which the GCS does not listen on here.
    """
    start = [sys.executable, __file__, "node", cluster.address, str(num_cpus), json.dumps(resources or {})]
    script = f"mount --bind {private_disk} {mount_over} && exec " + " ".join(f"'{a}'" for a in start)
    with open(log, "w") as out:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=cluster.env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    cluster.procs.append(proc)
    return proc


def can_unshare() -> str | None:
    """None when mount namespaces and bind mounts work here, else why not."""
    folder = tempfile.mkdtemp(prefix="cffa-unshare-")
    try:
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                f"mount --bind {folder} {folder}"], capture_output=True, text=True, timeout=30)
    except OSError as e:  # no unshare binary
        return str(e)
    finally:
        os.rmdir(folder)
    return None if probe.returncode == 0 else (probe.stderr.strip() or f"unshare exited {probe.returncode}")


# ------------------------------------------------------------------ the helper process

def serve() -> None:
    """Own a ray.cluster_utils.Cluster; one JSON command a line on stdin, one answer a line on stdout."""
    # Ray is imported here only: the test process that imports this module must not hold Ray's state.
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever Ray prints goes to the log, not into the answers
    cluster = Cluster()
    nodes: dict[str, object] = {}

    def node_args(num_cpus: float, resources: dict) -> dict:
        # fixed free ports: other engineers' and CI's Ray clusters share this machine
        return {"num_cpus": num_cpus, "resources": resources, "object_store_memory": OBJECT_STORE_BYTES,
                "node_ip_address": "127.0.0.1", "metrics_export_port": free_port(), "metrics_agent_port": free_port(),
                "runtime_env_agent_port": free_port(), "dashboard_agent_listen_port": free_port()}

    def start_head(num_cpus: float, resources: dict) -> dict:
        head = cluster.add_node(**node_args(num_cpus, resources), include_dashboard=True, dashboard_host="127.0.0.1",
                                dashboard_port=free_port())
        ray.init(address=head.gcs_address, logging_level="WARNING", log_to_driver=False)
        return {"address": head.gcs_address}

    def add_node(num_cpus: float, resources: dict) -> dict:
        node = cluster.add_node(**node_args(num_cpus, resources))
        nodes[node.node_id] = node
        return {"node_id": node.node_id}

    def remove_node(node_id: str, graceful: bool) -> dict:
        t0 = time.time()
        cluster.remove_node(nodes.pop(node_id), allow_graceful=graceful)
        return {"seconds": round(time.time() - t0, 3)}

    def attach(address: str) -> dict:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        return {"address": address}

    def alive_nodes() -> dict:
        return {"nodes": [{"node_id": n["NodeID"], "resources": n["Resources"],
                           "is_head": "node:__internal_head__" in n["Resources"]} for n in ray.nodes() if n["Alive"]]}

    def actors(class_part: str) -> dict:
        found = list_actors(detail=True, limit=1000, raise_on_missing_output=False)
        return {"actors": [{"class_name": a.class_name, "node_id": a.node_id, "pid": a.pid, "state": a.state,
                            "death_cause": str(a.death_cause)[:400] if a.death_cause else None}
                           for a in found if class_part in a.class_name]}

    def shutdown() -> dict:
        ray.shutdown()
        cluster.shutdown()
        return {}

    ops = {"start_head": start_head, "attach": attach, "add_node": add_node, "remove_node": remove_node,
           "nodes": alive_nodes, "actors": actors, "shutdown": shutdown}
    for line in sys.stdin:
        command = json.loads(line)
        try:
            reply = ops[command.pop("op")](**command)
        except Exception as e:  # answered, so that the test fails with it instead of waiting
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(REPLY + json.dumps(reply) + "\n")
        replies.flush()
        if '"shutdown"' in line:
            break


def serve_node(address: str, num_cpus: str, resources: str) -> None:
    """One worker node of the cluster at `address`, until SIGTERM: what the fake autoscaler's provider
    does for each node it starts (ray/autoscaler/_private/fake_multi_node/node_provider.py)."""
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=address, redis_address=address, node_ip_address="127.0.0.1", num_cpus=float(num_cpus),
        resources=json.loads(resources), object_store_memory=OBJECT_STORE_BYTES, min_worker_port=0,
        max_worker_port=0, dashboard_agent_listen_port=free_port(), metrics_agent_port=free_port(),
        runtime_env_agent_port=free_port(), metrics_export_port=free_port())
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    signal.signal(signal.SIGTERM, lambda *_: (node.kill_all_processes(check_alive=False, allow_graceful=True),
                                               sys.exit(0)))
    while True:
        time.sleep(1)


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
elif __name__ == "__main__" and sys.argv[1:2] == ["node"]:
    serve_node(*sys.argv[2:5])
