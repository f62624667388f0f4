"""The package's layers, checked from its source: imports point downwards only.

    cli / launch / sweep            the app and its launchers
      trainer                       the loop
        session, state, registry    the plug-in face, checkpoint assembly, names -> objects
          strategies/...            how a step is parallelised: torch and their own parts only
            env, checkpoint, loaders, schema, tree, timing, faults, preemption, observe, errors,
            footprint, bottleneck, ...

A strategy that reached up to the Session, the Trainer or the CLI would tie a parallelism to one
face of the product; a helper that reached up would make a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "disttrain"
APP = {"disttrain.cli", "disttrain.launch", "disttrain.sweep", "disttrain.horovodrun", "disttrain.__main__",
       "disttrain.export"}
FACES = {"disttrain.session", "disttrain.state", "disttrain.registry", "disttrain.trainer"}
HELPERS = {"disttrain.env", "disttrain.checkpoint", "disttrain.loaders", "disttrain.schema", "disttrain.tree",
           "disttrain.timing", "disttrain.faults", "disttrain.preemption", "disttrain.observe", "disttrain.errors",
           "disttrain.forward", "disttrain.blocks", "disttrain.activation_checkpointing",
           "disttrain.fingerprint", "disttrain.data", "disttrain.models", "disttrain.torchrun",
           "disttrain.flops", "disttrain.straggler", "disttrain.watchdog"}
APP |= {"disttrain.estimate"}  # memory before launch: composes the config as the app does
HELPERS |= {"disttrain.footprint", "disttrain.bottleneck"}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``disttrain.*`` module imported anywhere in the file (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "disttrain" or m.startswith("disttrain.")}


def _forbidden(module: str) -> set[str]:
    if module.startswith("disttrain.strategies"):
        return APP | FACES
    if module in HELPERS:
        return APP | FACES | {"disttrain.strategies"}
    if module in FACES - {"disttrain.trainer"}:
        return APP | {"disttrain.trainer"}
    if module == "disttrain.trainer":
        return APP
    return set()


MODULES = sorted(_module(p) for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_downwards(module):
    path = PKG.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PKG.parent / module.replace(".", "/") / "__init__.py"
    bad = sorted(m for m in _imports(path) for f in _forbidden(module) if m == f or m.startswith(f + "."))
    assert not bad, f"{module} imports {bad}, which sit above it"


def test_every_module_is_placed_in_a_layer():
    placed = APP | FACES | HELPERS | {"disttrain"}
    unplaced = [m for m in MODULES if m not in placed and not m.startswith("disttrain.strategies")]
    assert not unplaced, f"add {unplaced} to a layer in tests/test_architecture.py"
