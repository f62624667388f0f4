"""A model's *blocks*: the submodules that FSDP shards one at a time (``strategy.wrap``) and that
activation checkpointing recomputes (``activation_checkpointing``). Either named by class
(``[Block]``, as Lightning's and Accelerate's policies take them) or ``auto``, chosen by size
(torch FSDP1's ``size_based_auto_wrap_policy``): walking up from the leaves, a module becomes a
block once the parameters it holds outside blocks already chosen below it reach ``min_params``.
Containers without a forward (``ModuleList``, ``ModuleDict``) and the model itself never are.

A block already wrapped for activation checkpointing is matched through its wrapper, and the
wrapper is the unit (so FSDP shards outside the recomputed region, as torchtitan applies them).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from disttrain.errors import ConfigError

AUTO = "auto"
#: ``auto``'s default size threshold (parameters), when the caller names none
DEFAULT_MIN_PARAMS = 1_000_000
_WRAPPED = "_checkpoint_wrapped_module"  # torch's CheckpointWrapper keeps the block under this name


def check_spec(spec: Any, key: str) -> None:
    """ConfigError unless ``spec`` is ``auto`` or a non-empty list of class names (needs no model)."""
    ok = spec == AUTO or (
        isinstance(spec, (list, tuple)) and len(spec) > 0 and all(isinstance(s, str) and s for s in spec)
    )
    if not ok:
        raise ConfigError(
            f"{key}={spec!r}: expected auto (modules chosen by parameter count) or a list of module class "
            f"names, e.g. {key}=[Block]"
        )


def class_names(model: nn.Module) -> list[str]:
    """The distinct class names of ``model``'s submodules (through checkpoint wrappers), sorted."""
    return sorted({type(_inner(m)).__name__ for _, m in model.named_modules() if m is not model})


def select(model: nn.Module, spec: str | Sequence[str], key: str, min_params: int = DEFAULT_MIN_PARAMS,
           single_layers: bool = True) -> list[str]:
    """Names of ``model``'s blocks under ``spec``, children before parents (the order
    ``fully_shard`` needs). ``single_layers=False``: ``auto`` skips modules without submodules
    (checkpointing one layer saves nothing: its input is kept either way). A class name that
    matches nothing raises ConfigError listing the model's module classes."""
    check_spec(spec, key)
    if spec == AUTO:
        return _by_size(model, int(min_params), single_layers)
    wanted = set(spec)
    found: list[str] = []
    seen: set[str] = set()
    for name, module in model.named_modules():
        if module is model or name.rsplit(".", 1)[-1] == _WRAPPED:
            continue  # the model itself, or a block seen already through its checkpoint wrapper
        cls = type(_inner(module))
        hit = wanted & {cls.__name__, f"{cls.__module__}.{cls.__qualname__}"}
        if hit:
            found.append(name)
            seen |= hit
    missing = sorted(wanted - seen)
    if missing:
        raise ConfigError(
            f"{key}: {missing} match no module of the model ({type(model).__name__}); its module classes are "
            f"{class_names(model)}: name some of those, or use {key}=auto"
        )
    return found[::-1]  # named_modules is parents first


def outermost(names: Sequence[str]) -> list[str]:
    """``names`` without those inside another listed one (``layers.1.fc`` inside ``layers.1``)."""
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def shorten(names: Sequence[str], keep: int = 6) -> str:
    """``a, b, c, ... (7 more)``: names for a log line."""
    return ", ".join(names[:keep]) + (f", ... ({len(names) - keep} more)" if len(names) > keep else "")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _inner(module: nn.Module) -> nn.Module:
    return getattr(module, _WRAPPED, module)


def _by_size(model: nn.Module, min_params: int, single_layers: bool) -> list[str]:
    chosen: list[str] = []

    def visit(name: str, module: nn.Module) -> int:
        """Parameters under ``module`` not yet in a chosen block (choosing it if they suffice)."""
        if hasattr(module, _WRAPPED):  # a checkpointed block is one unit: not split further
            free, leaf = count_params(module), False
        else:
            free = sum(p.numel() for p in module.parameters(recurse=False))
            children = list(module.named_children())
            free += sum(visit(f"{name}.{child}" if name else child, m) for child, m in children)
            leaf = not children
        container = isinstance(module, (nn.ModuleList, nn.ModuleDict))
        if name and free >= min_params and not container and (single_layers or not leaf):
            chosen.append(name)
            return 0
        return free

    visit("", model)
    return chosen
