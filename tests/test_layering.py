"""Layering is enforced: the components don't import each other; the gateway imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ["training", "serving", "evaluation"]
HEAVY = {"torch", "peft", "trl", "transformers", "datasets", "accelerate", "bitsandbytes", "vllm"}


def imported_roots(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("component", COMPONENTS)
def test_components_do_not_import_each_other(component: str) -> None:
    roots = imported_roots(component)
    others = {c for c in COMPONENTS if c != component} | {"lorafleet"}
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
