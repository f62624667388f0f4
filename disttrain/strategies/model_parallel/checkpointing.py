"""Checkpoints of a pipeline: each rank writes its own stages' tensors, nobody gathers the model.

The state of a rank is its ``StageModule`` and its (narrowed) optimizer, as
``torch.distributed.checkpoint.state_dict.get_state_dict`` gives them: the model under the
unsplit model's fully qualified names, the optimizer flattened per parameter name
(``state.blocks.4.mlp.0.weight.exp_avg``, ``param_groups.blocks.4.mlp.0.weight.lr``). Written with
``checkpoint.save_sharded`` (DCP: every rank writes its part; a stage's data-parallel replicas hold
the same keys and DCP writes each key once). Because every key is a name of the unsplit model, a
checkpoint loads into any split of the same model: another data-parallel size, another
placement, another number of stages. ``export`` gathers the whole model on global rank 0 for
``ds.save(path, full=True)``, the only time one rank holds it all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from disttrain import checkpoint as ckpt

_OPTIONS: Any = None


def _options() -> Any:
    global _OPTIONS
    if _OPTIONS is None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        _OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
    return _OPTIONS


def local_state(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """This rank's part, keyed by the unsplit model's names."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if optimizer is None:
        return {"model": {k: v for k, v in module.state_dict().items()}}
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_options())
    return {"model": model_sd, "optim": optim_sd}


def save(module: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    """Every rank writes its own stages' tensors under ``checkpoint.shards_dir(path)`` (collective)."""
    ckpt.save_sharded(local_state(module, optimizer), ckpt.shards_dir(path))


def load(module: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    """Read this rank's keys from ``checkpoint.shards_dir(path)`` into its stages (collective)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = local_state(module, optimizer)
    ckpt.load_sharded(state, ckpt.shards_dir(path))
    if optimizer is None:
        module.load_state_dict(state["model"])
        return
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options())


def export(module: nn.Module, sender: bool, order: list[str]) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on global rank 0 (``None`` elsewhere), gathered from one
    replica of every stage (``sender``), in the unsplit model's key order."""
    mine = {k: v.detach().cpu() for k, v in module.state_dict().items()} if sender else {}
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if parts is None:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return {k: merged[k] for k in order if k in merged} | {k: v for k, v in merged.items() if k not in order}
