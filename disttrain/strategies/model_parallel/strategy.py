"""``strategy=model_parallel``: a thin Strategy over exactly one role object, chosen once when the
job is known (``validate``): :class:`~.pipeline.Pipeline` (stages over ranks, with data
parallelism) when the job has several processes, :class:`~.local.LocalDevices` (stages over the
devices of one process) when it has one. Every hook below hands over to that role."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from disttrain.env import DistEnv
from disttrain.errors import ConfigError
from disttrain.strategies.base import Batch, LossFn, Strategy
from disttrain.strategies.model_parallel import options as opts_mod
from disttrain.strategies.model_parallel.local import LocalDevices
from disttrain.strategies.model_parallel.pipeline import Pipeline
from disttrain.strategies.model_parallel.role import Role
from disttrain.tree import to_plain


class ModelParallelStrategy(Strategy):
    """Options (``conf/strategy/model_parallel.yaml``, docs/model_parallel.md): ``placement``
    (``auto`` or stages of module names), ``split_points``, ``pipeline_size`` (K; world = K x D),
    ``schedule``, ``stages_per_rank``, ``microbatches`` (M), ``memory_cap_gb``, ``init``,
    ``devices`` (one process), ``bucket_cap_mb`` (data-parallel gradient buckets), ``report``."""

    name = "model_parallel"

    def __init__(
        self,
        placement: Any = "auto",
        split_points: Sequence[str] | None = None,
        pipeline_size: int | None = None,
        schedule: str = "gpipe",
        stages_per_rank: int | None = None,
        microbatches: int = 4,
        memory_cap_gb: float | None = None,
        init: str = "auto",
        devices: Sequence[str] | None = None,
        bucket_cap_mb: float = 25.0,
        report: bool = True,
    ) -> None:
        super().__init__()
        self.raw = dict(placement=to_plain(placement), split_points=to_plain(split_points), pipeline_size=pipeline_size,
                        schedule=schedule, stages_per_rank=stages_per_rank, microbatches=microbatches,
                        memory_cap_gb=memory_cap_gb, init=init, devices=to_plain(devices),
                        bucket_cap_mb=bucket_cap_mb, report=report)
        self.role: Role | None = None

    # ------------------------------------------------------------------ lifecycle
    def validate(self, env: DistEnv) -> None:
        precision = self.run_options.precision
        if precision != "32":  # run_options are set before validate: on every rank, before any process group
            raise ConfigError(f"precision={precision}: strategy=model_parallel trains in fp32; set precision=32")
        options = opts_mod.resolve(self.raw, env.world_size)
        self.role = LocalDevices(options) if env.world_size == 1 else Pipeline(options, env.rank, env.world_size)

    @property
    def _r(self) -> Role:
        if self.role is None:
            raise RuntimeError("strategy=model_parallel: validate(env) first (the Session does)")
        return self.role

    def setup(self, env: DistEnv, device: torch.device, backend: str, timeout_s: float) -> None:
        super().setup(env, device, backend, timeout_s)
        self._r.setup(device)

    def teardown(self) -> None:
        if self.role is not None:
            self.role.teardown()

    def run(self, loop: Callable[[], Any], logger: Any = None) -> Any:
        self._r.set_logger(logger)
        return loop()

    # ------------------------------------------------------------------ data and model
    def data_shard(self, env: DistEnv) -> tuple[int, int]:
        return self._r.data_shard()

    def build_model(self, factory: Callable[[], nn.Module]) -> nn.Module:
        return self._r.build_model(factory)

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        return self._r.wrap(model, optimizer)

    def apply_precision(self, model: nn.Module, precision: str) -> nn.Module:
        return model  # fp32 only (checked in validate)

    def to_device(self, x: Any) -> Any:
        return self._r.to_device(x)

    # ------------------------------------------------------------------ steps
    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        self._r.backward(loss)

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Batch],
                   loss_fn: LossFn, grad_clip: float | None, timer: Any) -> torch.Tensor:
        return self._r.train_step(model, optimizer, micro_batches, loss_fn, grad_clip, timer)

    def eval_forward(self, model: nn.Module, inputs: Any, targets: Any = None) -> torch.Tensor | None:
        # stages run the user's modules on the inputs; the last stage's outputs meet the targets
        # in the Trainer's loss function (a model's own loss is not split across stages)
        return self._r.eval_forward(model, inputs)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return self._r.clip_grad_norm(model, max_norm)

    def check_in_sync(self, model: nn.Module) -> list[str]:
        return self._r.check_in_sync(model)

    def replica_key(self, env: DistEnv) -> str:
        return self._r.replica_key()

    # ------------------------------------------------------------------ reports
    def log_metrics(self) -> dict[str, float]:
        return self._r.metrics()

    def bubble_fraction(self) -> float:
        """Mean over pipeline ranks of the idle share of the step, over the whole run."""
        return self._r.bubble_fraction()

    def memory_report(self) -> list[dict[str, float]] | None:
        """Measured bytes after the first steps: per stage (one process) or per pipeline rank."""
        return self._r.memory_report()

    def summary(self) -> dict[str, Any]:
        return self._r.summary()

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "schedule": self.raw["schedule"], "microbatches": self.raw["microbatches"],
                **(self.role.describe() if self.role is not None else {})}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_layout(self) -> str:
        return self._r.layout

    def checkpoint_meta(self) -> dict[str, Any]:
        return self._r.checkpoint_meta()

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> dict[str, Any] | None:
        return self._r.save_checkpoint(model, optimizer, path)

    def load_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path,
                        manifest: dict[str, Any]) -> None:
        self._r.load_checkpoint(model, optimizer, path, manifest)

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` snapshot of this run (the Trainer's pre-flight check)."""
        self._r.restore(model, optimizer, state)

    def export_state_dict(self, model: nn.Module) -> dict[str, Any] | None:
        return self._r.export_state_dict(model)
