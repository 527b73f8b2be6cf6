"""Helpers the test modules share (fixtures live in conftest.py): running the real CLI, checking a
one-line driver error, model and data builders, a Ray head of the tests' own."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.sim_cluster import RAY, default_sigint, free_port, kill_group

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 600  # a hang (e.g. Ray Data starved of CPUs) fails the test instead of blocking CI
SHARED_HEAD_ENV = "CFFA_TEST_SHARED_RAY"  # set by conftest's `ray_head` fixture: the head's cli_env as JSON


def _cli_env(extra: dict | None, local: bool) -> dict:
    """The environment of a `cffa` process: the test session's shared Ray head where one runs (unless
    `local`: then the process starts a local Ray of its own, as a user's first run does)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    shared = env.pop(SHARED_HEAD_ENV, None)
    if shared and not local:
        env.update(json.loads(shared))
    return {**env, **(extra or {})}


def run_cli(*args: str, timeout: float = CLI_TIMEOUT_S, env: dict | None = None,
            local: bool = False) -> subprocess.CompletedProcess:
    """Run `cffa <args>` as a user would, in a fresh process; `env` adds variables. It joins the session's
    shared Ray head when a test module asked for one (`ray_head`), else (or with `local`) starts its own."""
    return subprocess.run([sys.executable, "-m", "cffa_ray.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=_cli_env(env, local))


def run_clis(*commands: tuple) -> list[subprocess.CompletedProcess]:
    """Independent `cffa` commands at the same time (each as run_cli), their results in order: one job's
    single-threaded start-up (imports, actor starts) leaves a core idle that another job's can fill."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda argv: run_cli(*argv), commands))


def start_cli(*args: str, env: dict | None = None, local: bool = False) -> subprocess.Popen:
    """`cffa <args>` in the background, in its own session so the test can signal it (and a local Ray).
    SIGINT starts at its default, as in a terminal: a test session started in the background of a script
    (`pytest ... &`) ignores it, and an ignored signal stays ignored in every child."""
    return subprocess.Popen([sys.executable, "-m", "cffa_ray.cli", *map(str, args)], cwd=REPO,
                            env=_cli_env(env, local), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=default_sigint)


def running(proc: subprocess.Popen, log: Path | None = None) -> bool:
    """True while `proc` runs (a predicate for wait_for); once it has ended, an AssertionError with the tail
    of its output: `log`, the file it writes to, or else its stdout pipe."""
    if proc.poll() is not None:
        output = log.read_text() if log is not None else proc.stdout.read()
        raise AssertionError(f"the command ended early (exit {proc.returncode}):\n{output[-4000:]}")
    return True


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                                  f"STDERR:\n{proc.stderr[-6000:]}")


def write_tiny_tokenizer(folder: Path, max_length: int = 77):
    """A real CLIPTokenizer with a handful of tokens (no download), saved like a hub tokenizer."""
    from cffa_ray.models.base import tiny_tokenizer

    return tiny_tokenizer(folder, max_length)


TRAIN_ARGS = ("--preset", "tiny", "--resolution", 64, "--max_steps", 12, "--num_workers", 2, "--zero_stage", 2,
              "--batch_size", 2, "--val_every", 4, "--sample_every", 6, "--num_sample_pairs", 2,
              "--sample_steps", 4)  # (previews: files of the right kind, not pictures worth 50 steps)


# The shared generation (conftest's `generated`): 40 pairs of the shared run, the default seed (42) and model
# batch (auto: 8 on CPU)
GEN_ARGS = ("--num_samples", 40, "--steps", 4, "--batch_size", 8, "--concurrency", 2)


# A tiny training for tests whose subject is not the data path or the sharding (signals, full disks, errors):
# one worker, and each step's pixels encoded in the worker (no latent-cache actor), ~22 s instead of ~38 s on
# 2 cores. The shared run (TRAIN_ARGS), test_latent_cache and the ZeRO-3 and multi-node runs cover the cache
# and several workers.
QUICK_TRAIN = ("--preset", "tiny", "--resolution", 64, "--batch_size", 1, "--num_sample_pairs", 0, "--log_every", 1,
               "--num_workers", 1, "--no-cache_latents")


def log_steps(path) -> list[int]:
    """The steps of a run's training_log.txt or validation_log.txt, in file order."""
    return [int(m.group(1)) for line in path.read_text().splitlines() if (m := re.match(r"step=(\d+)", line))]


def train_argv(data, out, *extra):
    return ["train", "--data", str(data), "--output_dir", str(out), "--name", "r", "--preset", "tiny",
            "--resolution", "32", "--num_workers", "2", "--batch_size", "1", *map(str, extra)]


def gen_argv(ckpt, out, *extra):
    return ["generate", "--checkpoint_dir", str(ckpt), "--output_dir", str(out), *map(str, extra)]


MODEL_RECORD = {"model": "dual_unet", "base_model": None, "preset": "tiny", "resolution": 32,
                "unet_lora_rank": 4, "unet_lora_alpha": 4.0}


def fails_in_driver(capsys, argv, pattern, out_dir):
    """`cffa argv` through the real entry point: exit 2, one line naming the problem, `out_dir` untouched."""
    from cffa_ray.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"cffa {argv[0]}: error: ")
    assert "Traceback" not in captured.out + captured.err
    assert re.search(pattern, err), err
    assert not out_dir.exists(), f"{out_dir} was written"
    return err


def randomise_lora(model: torch.nn.Module, std: float, seed: int | None = 0) -> torch.nn.Module:
    """Give every LoRA B matrix random values (a fresh adapter has B = 0 and changes nothing), as after
    training; returns the model."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model


def odd_pairs(folder):
    """Eight pairs, six of them odd in one way each (plus a 16-bit FA and a CF JPEG stored turned with its EXIF
    orientation, which are not odd)."""
    from cffa_ray.synth import write_synthetic_pairs

    write_synthetic_pairs(folder, 8, 64)
    cf, fa = folder / "cf", folder / "fa"
    Image.open(cf / "synth_00001.png").convert("L").save(cf / "synth_00001.png")  # grey CF
    rgba = Image.open(fa / "synth_00002.png").convert("RGBA")
    rgba.putalpha(200)
    rgba.save(fa / "synth_00002.png")  # RGBA FA, half transparent
    Image.open(fa / "synth_00003.png").resize((96, 96)).save(fa / "synth_00003.png")  # pair of two sizes
    for image in (cf / "synth_00004.png", fa / "synth_00004.png"):
        Image.open(image).resize((64, 48)).save(image)  # not square
    for image in (cf / "synth_00005.png", fa / "synth_00005.png"):
        Image.open(image).resize((8, 8)).save(image)  # 8x8 for --resolution 64
    grey = np.asarray(Image.open(fa / "synth_00000.png"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(fa / "synth_00000.png")  # 16-bit FA
    # a CF the camera stored turned 90 degrees (EXIF orientation 6: "rotate clockwise to view") beside an upright
    # FA: read upright, the pair matches (had the orientation been ignored, it would differ in shape)
    exif = Image.Exif()
    exif[0x0112] = 6
    cf6 = Image.open(cf / "synth_00006.png").resize((64, 48))
    cf6.transpose(Image.Transpose.ROTATE_90).save(cf / "synth_00006.jpg", exif=exif, quality=95)
    Image.open(fa / "synth_00006.png").resize((64, 48)).save(fa / "synth_00006.png")
    (cf / "synth_00006.png").unlink()
    Image.new("L", (9500, 9500), 30).save(fa / "synth_00007.png")  # over PIL's decompression-bomb limit
    return folder


# ------------------------------------------------------------------ a Ray head of the tests' own



@contextlib.contextmanager
def lock_held_elsewhere(folder: Path, flag: str, job: str):
    """folder_lock(folder) held by another process for the `with` block (yields it); killed at the end, as
    kill -9 would: the kernel lets the lock go."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom cffa_ray.folder_lock import folder_lock\n"
                               f"with folder_lock({str(folder)!r}, {flag!r}, {job!r}):\n"
                               "    print('held', flush=True)\n    sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


class RayHead:
    """A Ray head of our own (`ray start --head --block` on 127.0.0.1, token authentication on, free
    ports, its own temp dir), stopped by its process group only: never `ray stop`, which would end
    every Ray on the machine. `cli_env` points a `cffa` process at it; the methods drive the jobs CLI."""

    # 4 CPUs: a 2-worker training and its Ray Data ingest (the product's local Ray: the workers' CPUs plus two).
    # Every CPU more lets a job's Ray Data tasks fan out to one more worker process, each ~1-1.5 s of CPU
    # importing Ray before any work (the suite started ~270 such processes at 6); at 4 the
    # generation and error tests took 211 s against 230 s.
    def __init__(self, root: Path, num_cpus: int = 4):
        self.root = root
        self.token = root / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.dashboard = free_port()
        # the job driver runs `python`: it must be this environment's
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.address = f"http://127.0.0.1:{self.dashboard}"
        # Its workers find the state API by this address: by default they would search the machine, and with
        # another Ray instance running (a local test run, another checkout's suite) Ray Train's
        # placement-group cleaner fails with "Found multiple active Ray instances" and a traceback.
        self.env["RAY_API_SERVER_ADDRESS"] = self.address
        self.gcs_port, self.num_cpus = free_port(), num_cpus
        # a short temp dir: Ray's unix socket paths must stay under ~107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="cffa-ray-", dir="/tmp")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
             f"--dashboard-port={self.dashboard}", "--dashboard-host=127.0.0.1",
             f"--ray-client-server-port={free_port()}", f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            preexec_fn=default_sigint)
        deadline = time.time() + 120
        while self.ray("job", "list").returncode != 0:
            assert self.proc.poll() is None, self.proc.stdout.read()
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(1)

    @property
    def cli_env(self) -> dict[str, str]:
        """What a `cffa` process needs to join this head instead of starting a Ray of its own."""
        return {"RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token)}

    def stop(self) -> None:
        """Stop this cluster only: its `ray start --block` process group (never `ray stop`)."""
        kill_group(self.proc, signum=signal.SIGINT)  # `ray start --block` ends in ~1 s on it (10 s over SIGTERM)
        left = subprocess.run(["pgrep", "-f", self.temp_dir], capture_output=True, text=True).stdout.split()
        for pid in left:
            os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args, "--address", self.address] if args[0] != "job" else
                              [RAY, args[0], args[1], "--address", self.address, *args[2:]],
                              env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def submit(self, job_id: str, *entrypoint: str) -> subprocess.Popen:
        """`ray job submit` with the project's runtime env file; returns `ray job logs --follow` on it, which
        tails the job's logs until it ends (`finished` collects them). One waiting process instead of a
        `ray job status`, a Python process of its own, every few seconds."""
        argv = ("job", "submit", "--submission-id", job_id, "--working-dir", ".", "--runtime-env",
                "jobs/runtime_env.yaml", "--no-wait", "--", *entrypoint)
        deadline = time.time() + 120
        # the head may answer 500 "No available agent to submit job, please try again later" (seen on a doubly
        # loaded machine, two pytest-xdist workers): try again, as the message says
        while (proc := self.ray(*argv)).returncode and "No available agent" in proc.stdout + proc.stderr:
            assert time.time() < deadline, proc.stdout + proc.stderr
            time.sleep(2)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return subprocess.Popen([RAY, "job", "logs", "--address", self.address, "--follow", job_id], env=self.env,
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finished(self, job_id: str, job: subprocess.Popen, timeout: float = 600) -> str:
        """The logs of a `submit`ted job once it has ended; an AssertionError unless it succeeded. (Should the
        log stream break off before the job's last line, the job's status is polled instead.)"""
        try:
            output = job.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            job.kill()
            raise AssertionError(f"{job_id} still runs after {timeout} s") from None
        if not re.search(rf"Job '{re.escape(job_id)}' (succeeded|failed|was stopped)", output):
            deadline = time.time() + timeout
            while (status := self.status(job_id)) in ("PENDING", "RUNNING"):
                assert time.time() < deadline, f"{job_id} still {status}"
                time.sleep(2)
            output += f"\nJob '{job_id}' {status.lower()}\n"
        assert re.search(rf"Job '{re.escape(job_id)}' succeeded", output), output[-5000:]
        return output

    def status(self, job_id: str) -> str:
        """RUNNING, PENDING, SUCCEEDED, FAILED or STOPPED, as `ray job status` prints it."""
        out = re.sub(r"\x1b\[[0-9;]*m", "", self.ray("job", "status", job_id).stdout)
        if m := re.search(r"Status for job '[^']+': (\w+)", out):
            return m.group(1)
        for word, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("stopped", "STOPPED")):
            if f"Job '{job_id}' " in out and word in out:
                return status
        return "UNKNOWN"


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    """Per image [3, R, R] in [-1, 1]: mean red minus mean blue over the fundus (a CF is orange, an FA grey);
    the black surround is left out."""
    inside = images.mean(1) > -0.8
    return torch.stack([(im[0][m] - im[2][m]).mean() for im, m in zip(images, inside)])
