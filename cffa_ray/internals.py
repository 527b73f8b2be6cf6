"""Every place cffa-ray relies on a library's private internals, in one module.

Each entry is something no public API offers; each has a test in tests/test_internals.py that fails
loudly, naming the entry, when a new version of the library moves or renames it. When one breaks,
the fix is here (and only here); the rest of the package calls these functions.

    Ray        the printer of forwarded worker lines (quiet.py filters it); log_once keys of Ray Data's
               progress warnings; the logger names of Ray Data's progress and Ray Train's reports;
               Ray Train v2's LoggingConfig; a user exception's text inside Ray's wrapped error;
               the block references behind a dataset (progress.materialize)
    torch-fidelity  its InceptionV3 module, loaded without the package __init__ (which needs torchvision)
    DeepSpeed  the table of ops it may JIT-compile (`deepspeed.ops.__compatible_ops__`), to keep its CPU
               backend from compiling a shared-memory all-reduce
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from typing import Callable

# ------------------------------------------------------------------ Ray: what it prints

# keys under which Ray Data logs, once per process, that progress bars are off or on
RAY_DATA_LOG_ONCE_KEYS = ("ray_data_progress_manager_disabled", "ray_data_progress_manager_global")
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"  # "Progress bars disabled. To enable, ..."


def mark_logged_once(key: str) -> None:
    """Make Ray's `log_once(key)` return False from now on in this process: the warning it guards is not shown."""
    from ray.util.debug import log_once

    log_once(key)


def ray_train_report_logger() -> str:
    """The logger Ray Train v2 logs one INFO line per report under (named after its module file)."""
    from ray.train.v2._internal.execution import context as train_context

    return train_context.__file__


def train_logging_config(level: str):
    """Ray Train v2's LoggingConfig at `level` (the controller's and workers' own log lines)."""
    from ray.train.v2.api.config import LoggingConfig

    return LoggingConfig(log_level=level)


RAY_WORKER_LINE_PRINTER = "ray_print_logs"  # the dispatcher's handler that prints forwarded worker lines


def _worker_line_dispatcher():
    """Ray's dispatcher of the lines workers forward to the driver (its printer is the handler named
    RAY_WORKER_LINE_PRINTER, and it prints under its `_lock`), or None where this Ray has none."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    return global_worker_stdstream_dispatcher


def filter_worker_lines(keep: Callable[[str], bool]) -> bool:
    """Wrap Ray's printer of the lines workers forward to the driver so that only lines with keep(line)
    pass. Returns False where this Ray has no such printer (nothing is filtered then)."""
    dispatcher = _worker_line_dispatcher()
    if dispatcher is None:
        return False
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name == RAY_WORKER_LINE_PRINTER and not getattr(handler, "_cffa_filtered", False):
                def filtered(data, handler=handler):
                    lines = [ln for ln in data.get("lines", []) if ln.strip() and keep(ln)]
                    if lines:
                        handler({**data, "lines": lines})
                filtered._cffa_filtered = True
                dispatcher.handlers[i] = (name, filtered)
    return True


def stop_worker_lines() -> bool:
    """Stop printing the lines workers forward to the driver, once a batch being printed is out (the
    dispatcher removes its printer under the lock it prints under). Returns False where this Ray has none."""
    dispatcher = _worker_line_dispatcher()
    if dispatcher is None:
        return False
    dispatcher.remove_handler(RAY_WORKER_LINE_PRINTER)
    return True


# ------------------------------------------------------------------ Ray: errors and blocks

def user_exception_message(error: BaseException, exception_type: type) -> str | None:
    """The message of an `exception_type` raised in a Ray task or actor, from Ray's wrapping of it.

    Ray Data re-raises a UDF's error as RayTaskError(UserCodeException) whose traceback *text* is all
    that is left of the original exception, so the message is read from that text (None: not there).
    """
    found = re.search(rf"{re.escape(exception_type.__name__)}: (.+)", str(error))
    return found.group(1).strip() if found else None


def iter_block_bundles(ds):
    """(block object refs, row count) per finished bundle of a Ray Dataset, as it executes."""
    for bundle in ds.iter_internal_ref_bundles():
        yield list(bundle.block_refs), bundle.num_rows() or 0


# ------------------------------------------------------------------ DeepSpeed

DEEPSPEED_SHM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed's CPU backend on torch.distributed's (gloo) all-reduce in this process.

    Every process that starts DeepSpeed's TorchBackend on CPU JIT-compiles a shared-memory all-reduce
    (C++, with ninja) when `__compatible_ops__` says it can be built: ~25 s of both cores on a 2-core
    machine the first time, again whenever a different ninja is first on PATH (the two disagree about the
    build log), and a C++ compiler is needed. cffa's CPU training is for tests, demos and small runs,
    whose few all-reduces of LoRA gradients gloo does in microseconds; marked not compatible, the op is
    never built and DeepSpeed takes the path it takes where it cannot be built.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[DEEPSPEED_SHM_OP] = False


# ------------------------------------------------------------------ torch-fidelity

TORCH_FIDELITY = "torch_fidelity"
# torch-fidelity's module that needs torchvision: its dataset and caching helpers, which cffa never
# calls; its metric modules import names from it at load time
TORCH_FIDELITY_TORCHVISION_MODULE = "utils"


def import_torch_fidelity(module: str) -> types.ModuleType:
    """torch_fidelity.<module> (its InceptionV3 extractor, metric_fid, metric_kid), also where
    torchvision cannot load beside this torch.

    torch-fidelity's package __init__ and its `utils` import torchvision, which on PyPI pins one torch
    build (a CPU torch gets "operator torchvision::nms does not exist"); the extractor and the metric
    math need torch alone. Where the plain import fails on torchvision, the module is loaded with a
    bare stand-in for the package __init__ and one for `utils` whose names raise if ever called; both
    are removed again afterwards. Raises ModuleNotFoundError when torch-fidelity is not installed.
    """
    try:
        return importlib.import_module(f"{TORCH_FIDELITY}.{module}")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "torchvision":
            raise
    except RuntimeError as e:  # a torchvision built for another torch fails while registering its ops
        if "torchvision" not in str(e):
            raise
    spec = importlib.util.find_spec(TORCH_FIDELITY)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"No module named {TORCH_FIDELITY!r}", name=TORCH_FIDELITY)
    package = types.ModuleType(TORCH_FIDELITY)
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType(f"{TORCH_FIDELITY}.{TORCH_FIDELITY_TORCHVISION_MODULE}")
    utils.__getattr__ = _needs_torchvision  # `from torch_fidelity.utils import x` gets a refusing x
    stand_ins = {TORCH_FIDELITY: package, utils.__name__: utils}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module(f"{TORCH_FIDELITY}.{module}")
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _needs_torchvision(name: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"torch_fidelity.utils.{name} needs torchvision, which cannot load beside this torch")
    return refuse
