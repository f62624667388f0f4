"""A run's checkpointable state, assembled in one place for both faces (the Trainer and a user's
own loop through ``ds.save`` / ``ds.load``).

What a checkpoint holds, and who provides it:

* model and optimizer: the strategy (``Strategy.save_checkpoint``), whole or as shards;
* the prepared loaders' positions (epoch, samples of it done), so a loop continues mid-epoch;
* anything registered for checkpointing (LR schedulers, ...): its ``state_dict()``;
* every rank's RNG states (Python, NumPy, torch CPU/CUDA), each rank restores its own;
* the run's layout (strategy, world size, data-parallel size, the strategy's own facts) and its
  lineage (which run, and the runs resumed from it, wrote it: rotation deletes only those);
* the caller's ``extra`` values (the Trainer's step and loss history, a user's epoch, ...).

Everything but model and optimizer lives under the manifest's ``extra`` key.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from disttrain import checkpoint as ckpt
from disttrain.errors import ConfigError

if TYPE_CHECKING:
    from disttrain.env import DistEnv
    from disttrain.loaders import ShardedLoader
    from disttrain.strategies.base import Strategy

log = logging.getLogger(__name__)

FORMAT = 3
_RESERVED = ("rng", "meta", "loaders", "objects")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RunState:
    """The model, optimizer, loaders and registered objects of one Session, saved and restored
    together. Built by the Session; ``prepare`` fills it in."""

    def __init__(self, strategy: "Strategy", env: "DistEnv") -> None:
        self.strategy, self.env = strategy, env
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.loaders: list["ShardedLoader"] = []
        self.objects: list[Stateful] = []
        self.lineage = _agree_on_token()

    def register(self, obj: Stateful) -> None:
        """Save and restore ``obj`` (anything with ``state_dict``/``load_state_dict``, e.g. an LR
        scheduler) with every checkpoint, in registration order."""
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"{type(obj).__name__} has no state_dict()/load_state_dict(): it cannot be checkpointed")
        self.objects.append(obj)

    def meta(self) -> dict[str, Any]:
        """The run's layout, saved with every checkpoint and checked by ``Strategy.check_resume``."""
        return {
            "format": FORMAT,
            "strategy": self.strategy.name,
            "layout": self.strategy.checkpoint_layout(),
            "world_size": self.env.world_size,
            "data_parallel_size": self.strategy.data_shard(self.env)[1],
            "lineage": self.lineage,
            **self.strategy.checkpoint_meta(),
        }

    # ------------------------------------------------------------------ save
    def save(self, path: Path, extra: dict[str, Any], keep_last: int | None = None) -> Path:
        """Write a checkpoint at ``path`` (every rank calls this; the strategy decides who writes
        what). Returns ``path`` once every rank is done."""
        clash = [k for k in _RESERVED if k in extra]
        if clash:
            raise ValueError(f"save(): {clash} are names disttrain uses inside a checkpoint; rename those values")
        model = self._require_model()
        app = {
            **extra,
            "rng": self._gather_rng(),
            "meta": self.meta(),
            "loaders": [ld.state_dict() for ld in self.loaders],
            "objects": [o.state_dict() for o in self.objects],
        }
        manifest = self.strategy.save_checkpoint(model, self.optimizer, path)
        if manifest is not None:
            manifest["extra"] = app
            ckpt.save(manifest, path.parent, path.name, keep_last=keep_last, lineage=self.lineage)
        self.strategy.barrier()
        return path

    # ------------------------------------------------------------------ load
    def load(self, path: Path, manifest: dict[str, Any] | None = None, restore_rng: bool = True) -> dict[str, Any]:
        """Restore everything ``save`` wrote (``manifest``: the file, if the caller loaded it
        already). Raises ConfigError, on every rank alike, for a checkpoint this run cannot load.
        Returns the ``extra`` namespace: the caller's values, and disttrain's own (``meta``,
        ``rng``, ``loaders``, ``objects``)."""
        model = self._require_model()
        if manifest is None:
            manifest = ckpt.load(path)
        app = dict(manifest.get("extra") or {})
        meta = app.get("meta") or {}
        self.check(meta, path)
        failure: BaseException | None = None
        try:
            self.strategy.load_checkpoint(model, self.optimizer, path, manifest)
        except Exception as exc:  # a shard may fail on one rank only: every rank must stop alike
            failure = exc
        if self._any_rank(failure is not None):
            raise failure or RuntimeError(
                f"checkpoint {path}: another rank could not load its part of it (its error is above); stopping here too"
            )
        for ld, st in zip(self.loaders, app.get("loaders") or []):
            ld.load_state_dict(st)
        objects = app.get("objects") or []
        if len(objects) != len(self.objects):
            raise ConfigError(
                f"checkpoint {path} holds the state of {len(objects)} registered object(s) (schedulers, ...), this "
                f"run registered {len(self.objects)}: register the same objects in the same order"
            )
        for obj, st in zip(self.objects, objects):
            obj.load_state_dict(st)
        rng = app.get("rng") or {}
        if restore_rng and rng:
            ranks = sorted(rng)
            ckpt.restore_rng(rng.get(self.env.rank, rng[ranks[self.env.rank % len(ranks)]]))
        if meta.get("lineage"):
            self.lineage = str(meta["lineage"])  # a resumed run continues its lineage (rotation)
        return app

    def check(self, meta: dict[str, Any], path: Path | str = "checkpoint") -> None:
        """ConfigError if a checkpoint with layout ``meta`` cannot load into this run."""
        saved = meta.get("layout", "full")  # checkpoints of format 2 held whole state dicts
        mine = self.strategy.checkpoint_layout()
        if saved != mine:
            raise ConfigError(
                f"checkpoint {path} was written by strategy={meta.get('strategy')!r} (state layout {saved!r}), "
                f"this run uses strategy={self.strategy.name!r} (layout {mine!r}), which cannot read it: resume with "
                f"strategy={meta.get('strategy')}, or start fresh"
            )
        self.strategy.check_resume(meta)

    # ------------------------------------------------------------------ helpers
    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("call ds.prepare(model, optimizer, ...) before backward()/step()/save()/load()")
        return self.model

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank of the job (one small all-reduce)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.strategy.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _gather_rng(self) -> dict[int, Any]:
        """Every checkpointing rank's random states, keyed by global rank (collective over the
        strategy's ``reduce_group``: the ranks that call ``save`` together)."""
        mine = ckpt.capture_rng()
        if not dist.is_initialized():
            return {self.env.rank: mine}
        group = self.strategy.reduce_group()
        if dist.get_rank(group) < 0:  # this rank does not take part (e.g. a server rank)
            return {self.env.rank: mine}
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (self.env.rank, mine), group=group)
        return {int(r): state for r, state in gathered}


def _agree_on_token() -> str:
    """A random token every rank of the job holds alike (rank 0's, broadcast)."""
    token = [uuid.uuid4().hex[:12]]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return token[0]
