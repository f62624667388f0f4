"""Desync detection: before the first step, every rank shows the others what it is about to
train (its model's parameter names, shapes and dtypes, and the resolved config) and the job
stops with a message naming the first differing entry, instead of hanging later in a collective
whose tensors do not match or whose count differs between ranks.

One ``all_gather_object`` over the whole world; every rank receives the same list, so every rank
reaches the same verdict and raises the same error: no rank is left waiting.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Mapping

import torch.distributed as dist
from torch import nn

from disttrain.errors import ConfigError

log = logging.getLogger(__name__)


class DesyncError(ConfigError):
    """Ranks were about to train different models or with different configs."""


def model_entries(model: nn.Module) -> dict[str, str]:
    """``{"parameter NAME": "shape (..) dtype", "buffer NAME": ...}`` in registration order."""
    out = {f"parameter {n}": f"shape {tuple(p.shape)} {p.dtype}" for n, p in model.named_parameters()}
    out.update({f"buffer {n}": f"shape {tuple(b.shape)} {b.dtype}" for n, b in model.named_buffers()})
    return out


def config_entries(config: Mapping[str, Any] | None) -> dict[str, str]:
    """``{"config KEY": repr(value)}`` for a flat mapping of resolved config values."""
    return {f"config {k}": repr(v) for k, v in (config or {}).items()}


def digest(entries: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for k, v in entries.items():
        h.update(f"{k}={v}\n".encode())
    return h.hexdigest()[:16]


def first_difference(ref: Mapping[str, str], other: Mapping[str, str]) -> tuple[str, str, str] | None:
    """``(entry, value in ref, value in other)`` for the first entry that differs, or None."""
    for key in list(ref) + [k for k in other if k not in ref]:
        a, b = ref.get(key, "<missing>"), other.get(key, "<missing>")
        if a != b:
            return key, a, b
    if list(ref) != list(other):
        return "parameter order", ", ".join(ref)[:200], ", ".join(other)[:200]
    return None


def verify(model: nn.Module, config: Mapping[str, Any] | None, key: str, rank: int) -> str:
    """Compare ``model`` (the user's module, before wrapping) and ``config`` across all ranks.
    Models are compared among ranks with the same ``key`` (``Strategy.replica_key``: pipeline
    stages differ by design); the config among all ranks. Raises DesyncError on every rank on a
    mismatch; returns this rank's fingerprint digest otherwise."""
    models, configs = model_entries(model), config_entries(config)
    mine = (rank, key, digest(models), digest(configs))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine[2]
    world = dist.get_world_size()
    summaries: list[Any] = [None] * world
    dist.all_gather_object(summaries, mine)
    if len({s[3] for s in summaries}) == 1 and all(
        s[2] == next(t[2] for t in summaries if t[1] == s[1]) for s in summaries
    ):
        return mine[2]
    # Something differs: fetch the entries (rarely: only on the failure path) to name it.
    full: list[Any] = [None] * world
    dist.all_gather_object(full, (rank, key, models, configs))
    problems = []
    ref_config = full[0]
    for rank, k, m, c in full[1:]:
        diff = first_difference(ref_config[3], c)
        if diff:
            problems.append(f"{diff[0]}: rank {ref_config[0]} has {diff[1]}, rank {rank} has {diff[2]}")
            break
    for rank, k, m, c in full:
        ref = next(f for f in full if f[1] == k)
        diff = first_difference(ref[2], m)
        if diff:
            problems.append(f"model {diff[0]}: rank {ref[0]} has {diff[1]}, rank {rank} has {diff[2]}")
            break
    raise DesyncError(
        "ranks disagree before the first step: " + "; ".join(problems) + ". Every rank must build the same "
        "model from the same config: check per-rank environment variables or files that feed the config, "
        "and code that depends on the rank"
    )
