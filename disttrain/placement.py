"""Model-parallel placement: parse it from config, resolve names against a model, check it, and
propose one (``placement: auto``).

A placement is an ordered list of stages; each stage names its modules and where it runs::

    placement:
      - {modules: [layers.0-1], rank: 0}       # multi-process form: one stage per rank
      - {modules: [layers.2-4], rank: 1}
    placement:
      - {modules: [encoder], device: cuda:0}   # single-process form: devices of this process
      - {modules: [decoder, head], device: cuda:1}

A module is named by its fully qualified name (``encoder.block.3``; a name covers everything
inside it) or by an inclusive index range of a container's numbered children (``layers.0-3`` is
``layers.0``, ``layers.1``, ``layers.2``, ``layers.3``; ``0-3`` for a top-level ``nn.Sequential``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from disttrain.errors import ConfigError

RANGE = re.compile(r"^(?:(?P<parent>.+)\.)?(?P<a>\d+)-(?P<b>\d+)$")
EXAMPLE = "[{modules: [layers.0-1], rank: 0}, {modules: [layers.2-4], rank: 1}]"


@dataclass(frozen=True)
class StageSpec:
    """One stage as written in config: module names (unexpanded) and where it runs."""

    index: int
    names: tuple[str, ...]
    device: str | None = None
    rank: int | None = None

    def where(self) -> str:
        return f"device: {self.device}" if self.device is not None else f"rank: {self.rank}"


# ---------------------------------------------------------------------- config -> specs
def parse(placement: Any, world_size: int) -> list[StageSpec] | None:
    """Specs from the config value; ``None`` for ``auto``. Checks the form only (no model yet)."""
    if placement is None or placement == "auto":
        return None
    if isinstance(placement, str) or not isinstance(placement, Sequence) or not placement:
        raise ConfigError(
            f"strategy.placement={placement!r}: expected 'auto' or a non-empty list of stages, e.g. {EXAMPLE}"
        )
    specs = []
    for i, st in enumerate(placement):
        if not isinstance(st, Mapping):
            raise ConfigError(
                f"strategy.placement[{i}]={st!r}: each stage is a mapping with 'modules' and 'rank' (or "
                f"'device'), e.g. {{modules: [layers.0-1], rank: 0}}"
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
                f"or ranges, e.g. [layers.0-1] or [encoder, head]"
            )
        device, rank = st.get("device"), st.get("rank")
        if device is not None and rank is not None:
            raise ConfigError(
                f"strategy.placement[{i}] names both device={device!r} and rank={rank!r}: give 'device' in the "
                f"single-process form, 'rank' in the multi-process form"
            )
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise ConfigError(f"strategy.placement[{i}].rank={rank!r}: expected an integer rank")
        if device is None and rank is None and world_size > 1:
            rank = i  # multi-process default: stage i on rank i
        specs.append(StageSpec(i, tuple(modules), None if device is None else str(device), rank))
    return specs


def check_environment(specs: list[StageSpec], world_size: int) -> None:
    """Stages against the job: ranks exist and each holds one stage; devices exist."""
    k = len(specs)
    multi = world_size > 1
    with_rank = [s for s in specs if s.rank is not None]
    if multi:
        for s in specs:
            if s.device is not None:
                raise ConfigError(
                    f"strategy.placement[{s.index}] names device={s.device!r} but this job has WORLD_SIZE="
                    f"{world_size} processes: in the multi-process form each stage names a rank (it runs on that "
                    f"rank's own device); write rank: {s.index}"
                )
    if with_rank:
        if k > world_size:
            raise ConfigError(
                f"strategy.placement has {k} stages but the job has only {world_size} rank(s): more stages than "
                f"ranks. Launch {k} processes (torchrun --nproc_per_node={k}) or merge stages down to {world_size}"
            )
        if k < world_size:
            raise ConfigError(
                f"strategy.placement has {k} stages but the job has {world_size} ranks: the multi-process form "
                f"runs exactly one stage per rank (no data parallelism across pipelines); launch {k} processes "
                f"or split the model into {world_size} stages"
            )
        ranks = [s.rank for s in specs]
        bad = [r for r in ranks if not 0 <= r < world_size]
        if bad or len(set(ranks)) != k:
            raise ConfigError(
                f"strategy.placement ranks {ranks}: each rank 0..{world_size - 1} must hold exactly one stage"
            )
    for s in specs:
        if s.device is not None:
            check_device(s.device, f"strategy.placement[{s.index}].device")


def available_devices() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def check_device(device: str, what: str) -> torch.device:
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
def resolve(model: nn.Module, specs: list[StageSpec]) -> list[list[str]]:
    """Expand each stage's names to module names, in order, and check that every parameter is
    placed exactly once. Raises ConfigError naming the problem; touches nothing."""
    modules = dict(model.named_modules())
    resolved: list[list[str]] = []
    for spec in specs:
        names: list[str] = []
        for name in spec.names:
            names.extend(_expand(model, modules, name, spec.index))
        resolved.append(names)
    _check_exactly_once(model, modules, resolved)
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
            missing = [w for w in want if w not in children]
            if a > b or missing:
                numbered = [c for c in children if c.isdigit()]
                span = f"{numbered[0]}-{numbered[-1]}" if numbered else "none"
                raise ConfigError(
                    f"strategy.placement[{stage}] range {name!r}: {parent or 'the model'} has numbered children "
                    f"{span}; write an inclusive range inside it, e.g. {(parent + '.') if parent else ''}{span}"
                )
            return [f"{parent}.{w}" if parent else w for w in want]
    raise ConfigError(
        f"strategy.placement[{stage}] names module {name!r}, which the model ({type(model).__name__}) does not "
        f"have. Available modules: {available_names(model)}; ranges of numbered children are written "
        f"parent.A-B (inclusive), e.g. layers.0-3"
    )


def available_names(model: nn.Module, limit: int = 40) -> str:
    names = [n for n, _ in model.named_modules() if n]
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]" + (f" ({len(names)} in all)" if len(names) > limit else "")


def _check_exactly_once(model: nn.Module, modules: dict[str, nn.Module], resolved: list[list[str]]) -> None:
    seen: dict[str, int] = {}
    for stage, names in enumerate(resolved):
        for n in names:
            for other, ostage in seen.items():
                if n == other or n.startswith(other + ".") or other.startswith(n + "."):
                    raise ConfigError(
                        f"module {n!r} (stage {stage}) overlaps {other!r} (stage {ostage}): every module and "
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
    unplaced = [n for n, p in model.named_parameters() if id(p) not in owner]
    if unplaced:
        raise ConfigError(
            f"parameters not placed in any stage: {unplaced[:10]}{' ...' if len(unplaced) > 10 else ''}: every "
            f"parameter must be placed exactly once; add their modules to a stage (available: {available_names(model)})"
        )


# ---------------------------------------------------------------------- auto
def leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with no children, in registration order (the call order of a Sequential chain)."""
    out = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    for n, m in model.named_modules():
        if any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False)):
            raise ConfigError(
                f"placement: auto splits the model at its leaf modules, but {n or 'the root module'} holds "
                f"parameters of its own: write the placement by hand (e.g. {EXAMPLE})"
            )
    return out


def propose(model: nn.Module, where: Sequence[Any], key: str) -> list[StageSpec]:
    """Split the leaf modules into ``len(where)`` contiguous stages balancing parameter bytes
    (parameters, gradients and optimizer state all scale with them). ``key`` is 'rank' or 'device'."""
    # a parameter-free leaf (an activation, dropout) stays with the layer before it
    units: list[list[str]] = []
    weights: list[int] = []
    for n, m in leaves(model):
        w = sum(p.numel() * p.element_size() for p in m.parameters())
        if units and w == 0:
            units[-1].append(n)
        else:
            units.append([n])
            weights.append(w)
    k = len(where)
    if len(units) < k:
        raise ConfigError(
            f"placement: auto needs at least {k} modules with parameters to make {k} stages; the model has "
            f"{len(units)}: use fewer stages"
        )
    cuts = _linear_partition(weights, k)
    specs = []
    for s in range(k):
        names = [n for unit in units[cuts[s] : cuts[s + 1]] for n in unit]
        kw = {key: where[s]}
        specs.append(StageSpec(s, tuple(compress(names)), **kw))
    return specs


def _linear_partition(w: list[int], k: int) -> list[int]:
    """Boundaries of ``k`` non-empty contiguous parts minimising the largest sum (then the spread)."""
    n = len(w)
    pre = [0]
    for x in w:
        pre.append(pre[-1] + x)
    inf = float("inf")
    # best[j][i]: minimal max-part over the first i units split into j parts
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for c in range(j - 1, i):
                v = max(best[j - 1][c], pre[i] - pre[c])
                if v < best[j][i]:
                    best[j][i], arg[j][i] = v, c
    cuts = [n]
    for j in range(k, 0, -1):
        cuts.append(arg[j][cuts[-1]])
    return cuts[::-1]


def compress(names: list[str]) -> list[str]:
    """``[layers.0, layers.1, layers.2]`` -> ``[layers.0-2]``."""
    out: list[str] = []
    run: list[tuple[str, int]] = []

    def flush() -> None:
        if not run:
            return
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


def to_yaml(specs: list[StageSpec]) -> str:
    """The placement in config syntax (YAML for a config file, and a command-line override)."""
    def one(s: StageSpec) -> str:
        where = f"device: {s.device}" if s.device is not None else f"rank: {s.rank}"
        return f"{{modules: [{', '.join(s.names)}], {where}}}"

    lines = ["placement:"] + [f"  - {one(s)}" for s in specs]
    flat = ",".join(one(s).replace(" ", "") for s in specs)
    lines.append(f"# command line: 'strategy.placement=[{flat}]'")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the chain contract
def check_chain(skeleton: nn.Module, order: list[str], example: torch.Tensor) -> str | None:
    """Run ``skeleton``'s forward on the meta device and check that it applies the placed modules
    as a chain: each called once, in placement order, each one's output the next one's input,
    the last one's output the model's output, and no unplaced module called between them.
    Returns an error message, or ``None`` if the chain holds (or the model cannot run on meta)."""
    mods = dict(skeleton.named_modules())
    placed = set(order)
    calls: list[list[Any]] = []
    depth = [0]
    handles = []

    def pre(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            if depth[0] == 0:
                calls.append([name, args[0] if args else None, None])
            depth[0] += 1
        return hook

    def post(_m: nn.Module, _args: tuple, out: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            calls[-1][2] = out

    def stray(name: str):
        def hook(_m: nn.Module, _args: tuple) -> None:
            if depth[0] == 0:
                calls.append([name, None, None, "unplaced"])
        return hook

    for n in order:
        handles += [mods[n].register_forward_pre_hook(pre(n)), mods[n].register_forward_hook(post)]
    for n, m in mods.items():
        if n and n not in placed and not any(n.startswith(p + ".") for p in placed) and not any(True for _ in m.children()):
            handles.append(m.register_forward_pre_hook(stray(n)))
    try:
        with torch.no_grad():
            out = skeleton(example.to("meta"))
    except Exception:  # an op without a meta kernel: the check cannot run, the pipeline still can
        return None
    finally:
        for h in handles:
            h.remove()
    strays = [c[0] for c in calls if len(c) == 4]
    if strays:
        return (
            f"forward calls module(s) {strays} that no stage holds: the multi-process form runs each stage as its "
            f"modules in order, so add them to the stage where forward calls them"
        )
    got = [c[0] for c in calls]
    if got != order:
        return (
            f"forward calls the placed modules in the order {got}, but the placement lists {order}: list them in "
            f"the order forward calls them, each exactly once"
        )
    for (n0, _, y0), (n1, x1, _) in zip(calls, calls[1:]):
        if x1 is not y0:
            return (
                f"forward transforms the output of {n0!r} before passing it to {n1!r}: the multi-process form "
                f"needs each placed module to feed the next directly (as nn.Sequential does); move that code "
                f"into a module and place it"
            )
    if calls and out is not calls[-1][2]:
        return f"forward transforms the output of {calls[-1][0]!r} after it: place that code in a module too"
    return None
