"""Where layers live: parse a placement from config, resolve its names against the user's model,
check it, and write one back in config syntax.

A placement is an ordered list of stages; each stage names the user's modules::

    placement:                                   # a pipeline over ranks (any forward torch.export traces)
      - {modules: [tok_emb, pos_emb, blocks.0-3]}
      - {modules: [blocks.4-7, ln_f, head]}
    placement:                                   # one process, over its devices
      - {modules: [encoder], device: cuda:0}
      - {modules: [decoder, head], device: cuda:1}

A module is named by its fully qualified name (``encoder.block.3``; a name covers everything
inside it) or by an inclusive index range of a container's numbered children (``blocks.0-3`` is
``blocks.0`` ... ``blocks.3``; ``0-3`` for a top-level ``nn.Sequential``). Pipeline stages may
also say ``rank: r`` (the pipeline rank the schedule puts them on; checked, never needed).

Everything here is pure: no process group, no device work; every rank reaches the same verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from disttrain.errors import ConfigError

RANGE = re.compile(r"^(?:(?P<parent>.+)\.)?(?P<a>\d+)-(?P<b>\d+)$")
EXAMPLE = "[{modules: [tok_emb, blocks.0-3]}, {modules: [blocks.4-7, head]}]"
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


@dataclass(frozen=True)
class StageSpec:
    """One stage as written in config: module names (unexpanded) and, optionally, where it runs."""

    index: int
    names: tuple[str, ...]
    device: str | None = None
    rank: int | None = None


# ---------------------------------------------------------------------- config -> specs
def parse(placement: Any) -> list[StageSpec] | None:
    """Specs from the config value; ``None`` for ``auto``. Checks the form only (no model yet)."""
    if placement is None or placement == "auto":
        return None
    if isinstance(placement, str) or not isinstance(placement, Sequence) or not placement:
        raise ConfigError(
            f"strategy.placement={placement!r}: expected 'auto' or a non-empty list of stages, e.g. {EXAMPLE}"
        )
    return [_parse_stage(i, st) for i, st in enumerate(placement)]


def _parse_stage(i: int, st: Any) -> StageSpec:
    if not isinstance(st, Mapping):
        raise ConfigError(
            f"strategy.placement[{i}]={st!r}: each stage is a mapping with 'modules' (and 'device' in one "
            f"process), e.g. {{modules: [blocks.0-3]}}"
        )
    extra = sorted(set(st) - {"modules", "device", "rank"})
    if extra:
        raise ConfigError(f"strategy.placement[{i}] has unknown keys {extra}: allowed are modules, device, rank")
    modules = st.get("modules")
    if isinstance(modules, str):
        modules = [modules]
    if not modules or not all(isinstance(m, str) and m for m in modules):
        raise ConfigError(
            f"strategy.placement[{i}].modules={modules!r}: expected a non-empty list of module names "
            f"or ranges, e.g. [blocks.0-3] or [encoder, head]"
        )
    device, rank = st.get("device"), st.get("rank")
    if device is not None and rank is not None:
        raise ConfigError(
            f"strategy.placement[{i}] names both device={device!r} and rank={rank!r}: give 'device' when one "
            f"process holds every stage, nothing (or 'rank') for a pipeline over processes"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise ConfigError(f"strategy.placement[{i}].rank={rank!r}: expected an integer pipeline rank")
    return StageSpec(i, tuple(modules), None if device is None else str(device), rank)


def available_devices() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def check_device(device: str, what: str) -> torch.device:
    """``device`` as a torch.device, or ConfigError naming the devices this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{what}={device!r} is not a device ({exc}): available are {available_devices()}") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if dev.index is None:
            raise ConfigError(f"{what}={device!r}: name the GPU, e.g. cuda:0; available are {available_devices()}")
        if dev.index >= count:
            raise ConfigError(
                f"{what}={device!r} does not exist: this machine has {count} GPU(s); available devices are "
                f"{available_devices()}"
            )
    elif dev.type != "cpu":
        raise ConfigError(f"{what}={device!r}: only cpu and cuda:N are supported; available are {available_devices()}")
    return dev


# ---------------------------------------------------------------------- specs + model -> modules
def resolve(model: nn.Module, specs: Sequence[StageSpec], root_tensors_free: bool = False) -> list[list[str]]:
    """Expand each stage's names to module names, in order, and check that every parameter is
    placed exactly once. ``root_tensors_free``: parameters held by the root module itself (no
    name places them) go wherever the traced forward uses them. Raises ConfigError naming the
    user's modules; touches nothing."""
    modules = dict(model.named_modules())
    resolved = [[n for name in spec.names for n in _expand(model, modules, name, spec.index)] for spec in specs]
    _check_exactly_once(model, modules, resolved, root_tensors_free)
    return resolved


def expand(model: nn.Module, names: Sequence[str], stage: int = 0) -> list[str]:
    """Module names for one stage's names (ranges expanded), without the exactly-once check."""
    modules = dict(model.named_modules())
    return [n for name in names for n in _expand(model, modules, name, stage)]


def _expand(model: nn.Module, modules: dict[str, nn.Module], name: str, stage: int) -> list[str]:
    if name in modules and name != "":
        return [name]
    m = RANGE.match(name)
    if m:
        parent = m.group("parent") or ""
        a, b = int(m.group("a")), int(m.group("b"))
        if parent in modules:
            children = [n for n, _ in modules[parent].named_children()]
            want = [str(i) for i in range(a, b + 1)]
            if a > b or any(w not in children for w in want):
                numbered = [c for c in children if c.isdigit()]
                span = f"{numbered[0]}-{numbered[-1]}" if numbered else "none"
                raise ConfigError(
                    f"strategy.placement[{stage}] range {name!r}: {parent or 'the model'} has numbered children "
                    f"{span}; write an inclusive range inside it, e.g. {(parent + '.') if parent else ''}{span}"
                )
            return [f"{parent}.{w}" if parent else w for w in want]
    raise ConfigError(
        f"strategy.placement[{stage}] names module {name!r}, which the model ({type(model).__name__}) does not "
        f"have. Its modules: {available_names(model)}; ranges of numbered children are written "
        f"parent.A-B (inclusive), e.g. blocks.0-3"
    )


def available_names(model: nn.Module, limit: int = 40) -> str:
    """The model's module names, compressed (``blocks.0-7``), for error messages."""
    names = compress([n for n, _ in model.named_modules() if n and n.count(".") <= 1])
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def _check_exactly_once(
    model: nn.Module, modules: dict[str, nn.Module], resolved: list[list[str]], root_tensors_free: bool
) -> None:
    seen: dict[str, int] = {}
    for stage, names in enumerate(resolved):
        for n in names:
            for other, ostage in seen.items():
                if n == other or n.startswith(other + ".") or other.startswith(n + "."):
                    where = "twice in stage" if ostage == stage else f"in stage {ostage} and stage"
                    raise ConfigError(
                        f"module {n!r} is placed {where} {stage} (as {other!r} and {n!r}): every module and "
                        f"parameter must be placed exactly once; remove one of them"
                    )
            seen[n] = stage
    owner: dict[int, tuple[int, str]] = {}
    for stage, names in enumerate(resolved):
        for n in names:
            for pn, p in modules[n].named_parameters(prefix=n, remove_duplicate=False):
                if id(p) in owner and owner[id(p)][0] != stage:
                    s0, n0 = owner[id(p)]
                    raise ConfigError(
                        f"parameter {pn!r} is shared with {n0!r}: placed in stage {stage} and stage {s0}. A tied "
                        f"parameter must live in one stage: put both modules in the same stage"
                    )
                owner.setdefault(id(p), (stage, pn))
    root = {id(p) for p in model.parameters(recurse=False)} if root_tensors_free else set()
    unplaced = [n for n, p in model.named_parameters() if id(p) not in owner and id(p) not in root]
    if unplaced:
        mods = compress(sorted({n.rpartition(".")[0] for n in unplaced}, key=_natural))
        raise ConfigError(
            f"module(s) {mods} hold parameters but are placed in no stage: every parameter must be placed exactly "
            f"once; add them to a stage (the model's modules: {available_names(model)})"
        )


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------- units for placement: auto
def units(model: nn.Module) -> list[str]:
    """The modules ``placement: auto`` may put in a stage, in registration order: the root's
    children, with containers (ModuleList, Sequential, ModuleDict) opened into their children,
    recursively. ``blocks`` becomes ``blocks.0``, ``blocks.1``, ...; a Sequential MLP its layers."""
    out: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, _CONTAINERS) and any(True for _ in child.children()):
                walk(full + ".", child)
            else:
                out.append(full)

    walk("", model)
    return out


def leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with no children, in registration order (the one-process form's auto split)."""
    out = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    for n, m in model.named_modules():
        if any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False)):
            raise ConfigError(
                f"placement: auto splits the model at its leaf modules, but {n or 'the root module'} holds "
                f"parameters of its own: write the placement by hand (e.g. {EXAMPLE})"
            )
    return out


def propose_by_bytes(model: nn.Module, devices: Sequence[str]) -> list[StageSpec]:
    """The one-process form's ``auto``: the leaf modules in ``len(devices)`` contiguous stages
    balancing parameter bytes (a parameter-free leaf stays with the layer before it)."""
    from disttrain.strategies.model_parallel.cost import linear_partition

    groups: list[list[str]] = []
    weights: list[float] = []
    for n, m in leaves(model):
        w = sum(p.numel() * p.element_size() for p in m.parameters())
        if groups and w == 0:
            groups[-1].append(n)
        else:
            groups.append([n])
            weights.append(float(w))
    k = len(devices)
    if len(groups) < k:
        raise ConfigError(
            f"placement: auto needs at least {k} modules with parameters to make {k} stages; the model "
            f"({type(model).__name__}) has {len(groups)}: use fewer devices"
        )
    cuts = linear_partition(weights, k)
    assert cuts is not None  # no memory cap: every split is feasible
    return [
        StageSpec(s, tuple(compress([n for g in groups[cuts[s]:cuts[s + 1]] for n in g])), device=str(devices[s]))
        for s in range(k)
    ]


def compress(names: Sequence[str]) -> list[str]:
    """``[blocks.0, blocks.1, blocks.2]`` -> ``[blocks.0-2]``."""
    out: list[str] = []
    run: list[tuple[str, int]] = []

    def flush() -> None:
        if run:
            parent, a = run[0]
            b = run[-1][1]
            pre = f"{parent}." if parent else ""
            out.append(f"{pre}{a}" if a == b else f"{pre}{a}-{b}")
            run.clear()

    for n in names:
        parent, _, last = n.rpartition(".")
        if last.isdigit():
            if run and run[-1][0] == parent and run[-1][1] + 1 == int(last):
                run.append((parent, int(last)))
                continue
            flush()
            run.append((parent, int(last)))
        else:
            flush()
            out.append(n)
    flush()
    return out


def to_yaml(specs: Sequence[StageSpec]) -> str:
    """The placement in config syntax: YAML for a config file, and a command-line override."""

    def one(s: StageSpec) -> str:
        where = f", device: {s.device}" if s.device is not None else ""
        return f"{{modules: [{', '.join(s.names)}]{where}}}"

    lines = ["placement:"] + [f"  - {one(s)}" for s in specs]
    flat = ",".join(one(s).replace(" ", "") for s in specs)
    lines.append(f"# command line: 'strategy.placement=[{flat}]'")
    return "\n".join(lines)
