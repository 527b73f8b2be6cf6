"""The package's imports point one way: no import cycle between its modules, no job package
(train/, generate/, evaluate/) importing another's, private library internals only in internals.py,
and modules of a readable size. Parsed with ast (one test imports the drivers in a subprocess)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "cffa_ray"
JOBS = ("train", "generate", "evaluate")
MAX_LINES = 320  # "no module past ~300 lines"
PRIVATE = ("ray._private", "ray.train.v2._internal", "ray.data._internal", "torch_fidelity", "deepspeed.runtime")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, resolved to the module itself where
    `from package import module` names one."""
    known = modules()
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub if sub in known else node.module, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _ in imports_of(path) if m in known and m != name} for name, path in known.items()}


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_job_package_imports_another():
    for name, targets in graph().items():
        own = name.split(".")[1] if name.count(".") >= 2 else None
        for target in targets:
            parts = target.split(".")
            if len(parts) >= 2 and parts[1] in JOBS and own in JOBS:
                assert parts[1] == own, f"{name} imports {target}: job packages must not import each other"


def test_shared_runtime_sits_below_the_jobs():
    """Modules outside the job packages (except the CLI and the demo, which run jobs) import none of them."""
    for name, targets in graph().items():
        if name == "cffa_ray" or name.split(".")[1] in JOBS or name in ("cffa_ray.cli", "cffa_ray.demo"):
            continue
        jobs = [t for t in targets if len(t.split(".")) > 1 and t.split(".")[1] in JOBS]
        assert not jobs, f"{name} imports {jobs}: shared code must not depend on a job package"


def test_private_library_internals_only_in_internals_py():
    for name, path in modules().items():
        if name == "cffa_ray.internals":
            continue
        for target, line in imports_of(path):
            assert not target.startswith(PRIVATE), (
                f"{path.relative_to(REPO)}:{line} imports {target}: reach into private internals only in internals.py")


def test_modules_stay_readable():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules past {MAX_LINES} lines: {long}"


def test_job_drivers_load_no_model_library():
    """`cffa train/generate/evaluate/demo` drivers only name the worker code; diffusers, peft, transformers
    and DeepSpeed are imported in the workers' and actors' processes (~10 s of each driver's start on 2 cores)."""
    heavy = ("diffusers", "peft", "transformers", "deepspeed")
    code = ("import sys, cffa_ray.cli, cffa_ray.demo, cffa_ray.train.launch, cffa_ray.generate.job, "
            f"cffa_ray.evaluate.job; print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == [], f"a job driver imports {loaded.stdout.split()}: import them where they run"


def test_the_generation_driver_loads_no_torch(fake_checkpoint):
    """`cffa generate`'s driver names its Ray Data stages and model actor and checks the checkpoint's files;
    torch is imported where those run (1.4 s of the driver's start on 2 cores). Its imports and the checkpoint
    check are what this holds; a whole run left torch unloaded too (checked once, by hand, 2026-12-07)."""
    code = ("import sys; from cffa_ray.generate.job import check_checkpoint; "
            f"check_checkpoint({str(fake_checkpoint)!r}, None); print('torch' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["False"], "the generation driver imports torch: import it where it runs"
