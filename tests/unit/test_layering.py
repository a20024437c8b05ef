"""Layering is enforced: the components don't import each other, the gateway imports no torch, and inside the
gateway each room imports only the rooms below it, with no import circle anywhere."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ["training", "serving", "evaluation"]
HEAVY = {"torch", "peft", "trl", "transformers", "datasets", "accelerate", "bitsandbytes", "vllm"}

# The gateway's rooms, lowest first: a module may import its own room and the rooms below it, never above.
# Plain values (the error catalogue, the settings, a request's record, the JSON modes and checks, a canary's
# config and record) are the floor every room stands on.
RANKS = {
    "serving.errors": 0,
    "serving.config": 0,
    "serving.records": 0,
    "serving.outputs": 0,
    "serving.canary.analysis": 0,
    "serving.canary.state": 0,
    "serving.metrics": 1,
    "serving.state": 2,
    "serving.engines": 3,
    "serving.canary": 4,
    "serving.gateway": 5,
    "serving.plan": 6,
    "serving.http": 7,
    "serving.app": 8,
}
# The libraries only one room may import: the web framework at the HTTP edge, the databases in state/, the
# engine's HTTP client in engines/.
ONLY_IN = {
    "fastapi": ("serving.http", "serving.app"),
    "starlette": ("serving.http", "serving.app"),
    "uvicorn": ("serving.http",),
    "sqlalchemy": ("serving.state",),
    "alembic": ("serving.state",),
    "redis": ("serving.state",),
    "aiohttp": ("serving.engines",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    """Every module a file imports, at its top or inside a function (a lazy import is still a dependency)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return found


def imported_roots(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for name in imports(path):
            found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def serving_modules() -> dict[str, Path]:
    return {module_name(p): p for p in (ROOT / "serving").rglob("*.py") if "migrations" not in p.parts}


def rank(module: str) -> int | None:
    room = max((r for r in RANKS if module == r or module.startswith(r + ".")), key=len, default=None)
    return None if room is None else RANKS[room]


def gateway_graph() -> dict[str, set[str]]:
    """serving's modules and the serving modules each imports (a ``from package import name`` of a module
    counts as that module)."""
    modules = serving_modules()
    return {m: {n for n in imports(p) if n in modules and n != m} for m, p in modules.items()}


@pytest.mark.parametrize("component", COMPONENTS)
def test_components_do_not_import_each_other(component: str) -> None:
    roots = imported_roots(component)
    others = {c for c in COMPONENTS if c != component} | {"lorafleet", "finetune"}
    bad = {name: sorted(files) for name, files in roots.items() if name in others}
    assert not bad, f"{component} imports {bad}"


@pytest.mark.parametrize("package", ["contract", "serving"])
def test_torch_free_packages_import_no_heavy_library(package: str) -> None:
    roots = imported_roots(package)
    bad = {name: sorted(files) for name, files in roots.items() if name in HEAVY}
    assert not bad, f"{package} imports {bad}"
    assert not {c for c in roots if c in COMPONENTS and c != package}, "contract must not import components"


def test_gateway_import_loads_no_torch_at_runtime() -> None:
    code = (
        "import sys; import serving.app, lorafleet.cli; "
        f"heavy = sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules); print(heavy); sys.exit(bool(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# The fine-tuning jobs' room (``finetune``) runs beside the gateway, never inside it: it stands on the state
# database's stores and nothing else of the gateway, and only its runner (the training process) loads torch.
FINETUNE_MAY_IMPORT = ("serving.state", "serving.errors", "contract", "finetune")
TRAINING_PROCESS = {"finetune.runner", "finetune.gate"}


def finetune_modules() -> dict[str, Path]:
    return {module_name(p): p for p in (ROOT / "finetune").rglob("*.py")}


def test_the_jobs_room_stands_on_the_state_database_alone() -> None:
    outside = sorted(
        f"{module} imports {name}"
        for module, path in finetune_modules().items()
        for name in imports(path)
        if name.split(".")[0] == "serving" and not name.startswith(FINETUNE_MAY_IMPORT)
    )
    assert not outside, "finetune may use serving.state (and errors) only:\n" + "\n".join(outside)
    assert not {n for m, p in serving_modules().items() for n in imports(p) if n.startswith("finetune")}


def test_only_the_training_process_of_a_job_loads_torch() -> None:
    heavy = sorted(
        f"{module} imports {name}"
        for module, path in finetune_modules().items()
        if module not in TRAINING_PROCESS
        for name in imports(path)
        if name.split(".")[0] in HEAVY | {"training"}
    )
    assert not heavy, "the worker must stay torch-free:\n" + "\n".join(heavy)
    code = (
        "import sys; import finetune.worker, finetune.executors, lorafleet.commands.jobs; "
        f"heavy = sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules); print(heavy); sys.exit(bool(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_gateway_imports_by_absolute_names_only() -> None:
    """A relative import (``from ..http import x``) would slip past the room and circle rules below."""
    relative = sorted(
        f"{module}:{node.lineno}"
        for module, path in serving_modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    )
    assert not relative, f"use absolute imports: {relative}"


def test_every_gateway_module_belongs_to_a_room() -> None:
    homeless = sorted(m for m in serving_modules() if m != "serving" and rank(m) is None)
    assert not homeless, f"add these to RANKS (and to docs/development.md's map): {homeless}"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} ({rank(module)}) imports {name} ({rank(name)})"
        for module, names in graph.items()
        for name in names
        if (rank(name) or 0) > (rank(module) or 0)
    )


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle a depth-first walk meets; importing a module runs its packages' ``__init__`` too."""
    graph = {m: set(names) for m, names in graph.items()}
    for module in list(graph):
        for name in list(graph[module]):
            parent = name.rpartition(".")[0]
            while parent in graph and parent != module:
                graph[module].add(parent)
                parent = parent.rpartition(".")[0]
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(graph[module]):
            if state.get(name) == 1:
                found.append([*path[path.index(name) :], name])
            elif name not in state:
                visit(name, [*path, name])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_rooms_import_only_the_rooms_below_them() -> None:
    upward = upward_imports(gateway_graph())
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("library", sorted(ONLY_IN))
def test_each_library_stays_in_its_room(library: str) -> None:
    rooms = ONLY_IN[library]
    outside = sorted(
        module
        for module, path in serving_modules().items()
        if any(n.split(".")[0] == library for n in imports(path))
        and not any(module == r or module.startswith(r + ".") for r in rooms)
    )
    assert not outside, f"{library} is for {rooms or 'no module of serving'}; imported by {outside}"


def test_the_gateway_has_no_import_circle() -> None:
    found = circles(gateway_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_rules_find_what_they_are_for() -> None:
    """On a made-up graph: the circles of the old tree (a store and the database module importing each other; a
    package's __init__ importing back) and an upward import are all found."""
    old = {
        "serving.state.db": {"serving.state.tenants"},
        "serving.state.tenants": {"serving.state.db"},
        "serving.canary": {"serving.canary.manager"},
        "serving.canary.manager": {"serving.canary.state"},
        "serving.canary.state": set(),
    }
    assert sorted(map(tuple, circles(old))) == [
        ("serving.canary", "serving.canary.manager", "serving.canary"),
        ("serving.state.db", "serving.state.tenants", "serving.state.db"),
    ]
    assert upward_imports({"serving.outputs.jsoncheck": {"serving.state.policies"}}) == [
        "serving.outputs.jsoncheck (0) imports serving.state.policies (2)"
    ]
    assert upward_imports({"serving.state.policies": {"serving.outputs.modes"}}) == []
