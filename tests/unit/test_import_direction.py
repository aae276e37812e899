"""Imports point one way: gateway → cluster → workers, and inside workers/ from the group down.

    workers.group    the two Ray actors, their spec, the step loop: everything below
    workers.model    the decoder, attention, KV cache, runner, sampler
    workers.moe      route, dispatch, experts, combine (and the expert map)
    workers.comm     the transport and the backend choice
    workers.device   the device decision and memory sizing
    workers.weights  config.json, safetensors, tensor names, dtypes

A module may import its own subpackage and those below it, never one above. Read with `ast`
from the files themselves, so a new import anywhere is checked without a list to maintain.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ("gateway", "cluster", "workers")  # each may import the ones after it
WORKERS = ("group", "model", "moe", "comm", "device", "weights")  # the same, inside workers/
PURE = ("cluster/scheduler.py", "cluster/block_manager.py")  # DESIGN.md §2: no torch, no Ray


def imports_of(path: Path) -> set[str]:
    """Every absolute module a file imports (functions' local imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def modules(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py") if "_generated" not in p.parts)


@pytest.mark.parametrize("top", TOP)
def test_layers_import_only_downwards(top):
    above = set(TOP[:TOP.index(top)])
    bad = [(str(p.relative_to(ROOT)), m) for p in modules(top) for m in imports_of(p)
           if m.split(".")[0] in above]
    assert bad == []


def test_workers_subpackages_import_only_downwards():
    packages = {name: i for i, name in enumerate(WORKERS)}
    on_disk = {p.name for p in (ROOT / "workers").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert on_disk == set(WORKERS), "a new subpackage of workers/ needs its place in WORKERS"
    loose = [p.name for p in (ROOT / "workers").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], "every module of workers/ lives in a subpackage"
    bad = []
    for pkg, rank in packages.items():
        for p in modules(f"workers/{pkg}"):
            for m in imports_of(p):
                parts = m.split(".")
                if parts[0] == "workers" and len(parts) > 1 and packages.get(parts[1], rank) < rank:
                    bad.append((str(p.relative_to(ROOT)), m))
    assert bad == []


@pytest.mark.parametrize("path", PURE)
def test_scheduler_and_block_manager_are_plain_python(path):
    heavy = {m for m in imports_of(ROOT / path) if m.split(".")[0] in ("torch", "ray")}
    assert heavy == set()
