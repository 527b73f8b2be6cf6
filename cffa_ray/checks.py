"""Driver-side checks that run before any work: output folders, checkpoints, base models.

Each raises ConfigError with one line that names the flag, the bad file and the fix, within
seconds and before anything is written, so that an error no retry can heal never reaches Ray.
"""
from __future__ import annotations

import json
import os
import re
import threading
import uuid
import zipfile
from dataclasses import fields
from pathlib import Path

from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub import errors as hub_errors
from safetensors import safe_open

from cffa_ray.config import BASE_FOLDER_PARTS, DEFAULT_BASE_MODEL, FAMILY, ModelConfig, check_prediction_type
from cffa_ray.errors import ConfigError
from cffa_ray.io import filesystem
from cffa_ray.paths import is_uri

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_TIMEOUT_S = 15
PROBE_TIMEOUT_S = 20


def _one_line(e: BaseException | str, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------ output folders

def check_output_dir(path: str, flag: str) -> None:
    """`path` is, or can become, a folder this process can write in (nothing is created here).

    Local: every existing part of the path is a folder and the deepest one is writable.
    s3:// / gs:// / file://: a probe object is written and deleted (the only way to learn about
    credentials and bucket permissions).
    """
    if is_uri(path):
        _probe_uri(path, flag)
        return
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise ConfigError(f"{flag} {path}: {existing} is a link to nothing; remove it or give another folder")
        existing = existing.parent
    if not existing.is_dir():
        what = "" if existing == target else f" ({existing} is a file)"
        raise ConfigError(f"{flag} {path} is not a folder{what}; give a folder (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {existing} (permission denied or read-only); "
                          "give a folder you can write to")


def _probe_uri(path: str, flag: str) -> None:
    """Write and delete an empty object; in a thread, as a cloud client may wait long for credentials
    that are not there (pyarrow's GCS client asks the metadata server of a GCE machine, for minutes)."""

    outcome: list = []

    def probe() -> None:
        target = f"{path.rstrip('/')}/.cffa-write-probe-{uuid.uuid4().hex[:8]}"
        try:
            fs, p = filesystem(target)
            fs.create_dir(p.rsplit("/", 1)[0], recursive=True)  # a no-op on object stores
            with fs.open_output_stream(p) as out:
                out.write(b"")
            fs.delete_file(p)
            outcome.append(None)
        except Exception as e:  # pyarrow raises OSError, ArrowInvalid, ... for bad URIs and credentials
            outcome.append(_one_line(e))

    thread = threading.Thread(target=probe, daemon=True, name="cffa-write-probe")
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    problem = outcome[0] if outcome else f"no answer within {PROBE_TIMEOUT_S} s"
    if problem:
        raise ConfigError(f"{flag} {path}: cannot write there ({problem}); check the URI, "
                          "the bucket and this machine's credentials")


# ------------------------------------------------------------------ files that must parse

def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from `path`, or ConfigError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{what}: {path} is not readable JSON ({_one_line(e, 80)}); "
                          "the folder is damaged or incomplete") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: {path} holds {type(value).__name__}, not a JSON object")
    return value


def check_safetensors(path: Path, what: str) -> None:
    """The file's safetensors header is readable and lists tensors (reads the header only)."""

    try:
        with safe_open(str(path), framework="numpy") as f:  # the header alone; "pt" would import torch (1.4 s)
            if not list(f.keys()):
                raise ValueError("it holds no tensors")
    except Exception as e:  # SafetensorError, OSError, ValueError
        size = path.stat().st_size if path.exists() else 0
        raise ConfigError(f"{what}: {path} is not a readable safetensors file ({_one_line(e, 80)}; "
                          f"{size} bytes); it is truncated or damaged: copy it again or use another one") from None


def check_checkpoint_files(folder: Path, adapters: tuple[str, ...], flag: str) -> None:
    """Every adapter's config parses and every safetensors header in the checkpoint is readable."""
    for adapter in adapters:
        read_json_file(folder / adapter / "adapter_config.json", flag)
    for weights in sorted(folder.rglob("*.safetensors")):
        check_safetensors(weights, flag)


# ------------------------------------------------------------------ base models

def check_model_folder(folder: Path, components: tuple[str, ...], flag: str) -> None:
    """A diffusers folder whose component configs parse and whose weights exist and are readable."""
    for name in ("model_index.json", *(f"{c}/config.json" for c in components),
                 "scheduler/scheduler_config.json"):
        if (folder / name).is_file():
            read_json_file(folder / name, flag)
    for component in components:
        weights = [p for p in (folder / component).iterdir() if p.suffix in (".safetensors", ".bin")]
        if not weights:
            raise ConfigError(f"{flag} {folder}: {component}/ has a config.json but no weights "
                              "(*.safetensors or *.bin); the download or save was incomplete")
        for w in weights:
            if w.suffix == ".safetensors":
                check_safetensors(w, flag)


def check_hub_model(repo_id: str, model: str, required: tuple[str, ...]) -> None:
    """A hub id diffusers can load: complete in the local cache, or listed by a reachable hub."""

    what = f"--base_model {repo_id}"
    if repo_id == DEFAULT_BASE_MODEL[model]:
        what += f" (the default for --model {model})"
    cached = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(cached, str) and all(isinstance(try_to_load_from_cache(repo_id, f), str)
                                       for f in required if f.endswith(".json")):
        return  # diffusers loads a cached snapshot without the network
    fix = ("download it where the hub can be reached (`hf download REPO --local-dir DIR`) and give the "
           "folder, or try the pipeline with random weights: --preset tiny").replace("REPO", repo_id)
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{what} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                          f"HF_HUB_OFFLINE is set; {fix}")
    try:
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except hub_errors.GatedRepoError:
        raise ConfigError(f"{what} is gated: accept its terms on huggingface.co and set HF_TOKEN") from None
    except hub_errors.RepositoryNotFoundError:
        raise ConfigError(f"{what} is not a model on the Hugging Face hub (or it is private: set HF_TOKEN); "
                          "check the id or give a local folder") from None
    except Exception as e:  # no network, DNS, proxy, timeout, HTTP 5xx
        raise ConfigError(f"{what}: the Hugging Face hub cannot be reached ({_one_line(e, 80)}) and the "
                          f"model is not in the local cache ({constants.HF_HUB_CACHE}); {fix}") from None
    files = {s.rfilename for s in info.siblings or []}
    missing = [f for f in ("model_index.json", *required) if f.endswith(".json") and f not in files]
    if files and missing:
        raise ConfigError(f"{what} is not a diffusers pipeline (the hub repo lacks {', '.join(missing)})")


def check_model_record(record: dict, where: Path, flag: str) -> None:
    """model.json names a design we know and every setting that rebuilds its model, with valid values."""
    names = [f.name for f in fields(ModelConfig)]
    # lora_targets came later: older records lack it, and generation reads it from peft's adapter_config
    missing = [n for n in names if n not in record and n != "lora_targets"]
    if missing:
        raise ConfigError(f"{flag}: {where} lacks {', '.join(missing)}; it was not written by this version of "
                          "cffa train, or it is damaged")
    try:
        ModelConfig(**{n: record[n] for n in names if n in record}).validate_model()
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{flag}: {where} holds a bad setting: {_one_line(e)}") from None


def check_base_model(base_model: str, model: str) -> None:
    """Fail early, in the driver, for a --base_model that cannot be a diffusers model of this family."""
    family = FAMILY[model]
    path = Path(base_model).expanduser()
    if path.exists():
        missing = [p for p in BASE_FOLDER_PARTS[family] if not (path / p).exists()]
        if not path.is_dir() or missing:
            raise ConfigError(
                f"--base_model {base_model} is not a diffusers {family.upper()} folder "
                f"(missing {', '.join(missing) or 'folder'}); give a folder saved with save_pretrained or a hub id"
            )
        scheduler_config = path / "scheduler/scheduler_config.json"
        if scheduler_config.is_file():
            check_prediction_type(read_json_file(scheduler_config, "--base_model"), base_model)
        check_model_folder(path, tuple(p.split("/")[0] for p in BASE_FOLDER_PARTS[family]
                                       if p.endswith("/config.json")),
                           "--base_model")
        return
    if not HUB_ID.match(base_model):
        raise ConfigError(f"--base_model {base_model} is neither an existing folder nor a hub id like org/name")
    check_hub_model(base_model, model, BASE_FOLDER_PARTS[family])


# ------------------------------------------------------------------ a run folder that a rerun resumes

def check_run_folder(run_dir: str) -> None:
    """The records, LoRA exports and resumable DeepSpeed states a rerun reads are readable.

    Local folders only (object stores would need a download of every checkpoint).
    """

    root = Path(run_dir)
    if is_uri(run_dir) or not root.is_dir():
        return
    flag = f"run folder {run_dir}"
    fix = "delete that checkpoint folder to resume from an earlier one, or pick a new --name"
    # run.json may not be there yet (a folder made by hand, or by a run stopped before it wrote one)
    for record in [*root.glob("run.json"), *root.glob("best_checkpoint/model.json"),
                   *root.glob("latest_checkpoints/step_*/model.json")]:
        read_json_file(record, flag)
    for weights in [*root.glob("best_checkpoint/**/*.safetensors"),
                    *root.glob("latest_checkpoints/step_*/**/*.safetensors")]:
        check_safetensors(weights, flag)
    for state in root.glob("ray_train/checkpoint_*/**/*.pt"):
        if not zipfile.is_zipfile(state):  # torch.save writes a zip: a truncated one has no directory
            raise ConfigError(f"{flag}: {state} is truncated or damaged ({state.stat().st_size} bytes); {fix}")
