"""The multi-process form: pipeline stages over ranks, composed with data parallelism.

World size = K x D on a 2-D ``DeviceMesh`` (``dp``, ``pp``): rank = dp_index * K + pp_index. The
K ranks of one ``pp`` row run one pipeline (each holds the stages the schedule gives its pipeline
rank); the D ranks of one ``dp`` column hold the same stages and average their gradients
(``GradSync``). Data is sharded over ``dp`` only: the ranks of one pipeline read the same batches
(the first stage uses the inputs, the last the targets), so the global batch keeps its meaning and
D = 1 is a pure pipeline. Stage building is the ``StageBuilder``'s; the schedule is torch's.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from disttrain import forward
from disttrain.errors import ConfigError
from disttrain.strategies.model_parallel import checkpointing
from disttrain.strategies.model_parallel.builder import StageBuilder
from disttrain.strategies.model_parallel.grad_sync import GradSync
from disttrain.strategies.model_parallel.options import Options
from disttrain.strategies.model_parallel.report import REPORT_STEP, Reporter
from disttrain.strategies.model_parallel.stage_module import (
    CALL_HINT,
    build_whole,
    check_optimizer_covers,
    meta_copy,
    narrow_optimizer,
)
from disttrain.strategies.model_parallel.stats import Meter, StepStats


class Pipeline:
    """This rank's pipeline stages: stepping, collectives, checkpoints (see the module docstring)."""

    layout = "pipeline"

    def __init__(self, opts: Options, rank: int, world_size: int) -> None:
        self.opts, self.spec = opts, opts.spec
        self.k, self.v, self.m = opts.pipeline_size, opts.stages_per_rank, opts.microbatches
        self.n_stages = self.k * self.v
        self.d = world_size // self.k
        self.pp_rank, self.dp_rank = rank % self.k, rank // self.k
        self.stage_ranks = self.spec.stage_ranks(self.k, self.v)
        self.local = [s for s in range(self.n_stages) if self.stage_ranks[s] == self.pp_rank]
        self.device = torch.device("cpu")
        self.pp_group: Any = None
        self.dp_group: Any = None
        self.builder = StageBuilder(opts, self.local, self.device)
        self.builder.on_cut.append(self._after_cut)
        self.grad_sync: GradSync | None = None
        self.meter = Meter(self.device)
        self.stats: StepStats | None = None
        self.reporter = Reporter(opts.report)
        self._loss: tuple[Callable, int] | None = None
        self._pending_load: Any = None

    # ------------------------------------------------------------------ lifecycle
    def setup(self, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.device = self.builder.device = device
        self.meter = Meter(device, REPORT_STEP)
        mesh = init_device_mesh(device.type, (self.d, self.k), mesh_dim_names=("dp", "pp"))
        self.pp_group, self.dp_group = mesh.get_group("pp"), mesh.get_group("dp")
        self.stats = StepStats(device, self.pp_group, self.stage_ranks[-1])

    def teardown(self) -> None:
        if self.grad_sync is not None:
            self.grad_sync.close()
        self.builder.runners.clear()

    def set_logger(self, logger: Any) -> None:
        self.reporter.logger = logger

    def data_shard(self) -> tuple[int, int]:
        return self.dp_rank, self.d

    @property
    def module(self) -> nn.Module | None:
        return self.builder.module

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.builder.optimizer

    @property
    def names(self) -> list[list[str]] | None:
        return self.builder.names

    @property
    def proposal(self) -> Any:
        return self.builder.proposal

    # ------------------------------------------------------------------ building
    def build_model(self, factory: Callable[[], nn.Module]) -> nn.Module:
        model, skeleton, on_meta = build_whole(factory, self.opts.init)
        module = self.builder.adopt(model, skeleton, on_meta)
        self.builder.replaced = {}  # the optimizer is built from the module afterwards
        return module

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        b = self.builder
        if model is not b.module:  # the plug-in face: the user's whole model
            b.adopt(model, meta_copy(model), on_meta=False)
        assert b.module is not None
        if not b.module.on_meta:
            b.module.to(self.device)
        if optimizer is not None:
            narrow_optimizer(optimizer, b.replaced)  # the parameters a cut just now dropped (still alive)
            check_optimizer_covers(optimizer, b.module.parameters(), b.module.model_name)
        b.optimizer, b.replaced = optimizer, {}
        return b.module, optimizer

    def _after_cut(self) -> None:
        assert self.module is not None
        if self.d > 1:
            self.grad_sync = GradSync(list(self.module.parameters()), self.dp_group, self.opts.bucket_cap_mb)
        if self._pending_load is not None:
            checkpointing.load(self.module, self.optimizer, self._pending_load)
            self._pending_load = None

    # ------------------------------------------------------------------ one step
    def _weighted_loss(self, output: Any, target: Any) -> torch.Tensor:
        """The user's loss on one micro-batch, weighted by its share of the step's samples: the
        sum over micro-batches is the mean loss of the whole batch (as unsplit)."""
        assert self._loss is not None
        loss_fn, total = self._loss
        return forward.loss_of(output, target, loss_fn) * (len(target) / total)

    def backward(self, loss: torch.Tensor) -> None:
        raise ConfigError(CALL_HINT)

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence,
                   loss_fn: Callable, grad_clip: float | None, timer: Any) -> torch.Tensor:
        if model is not self.module:
            raise ConfigError("train_step got a model that is not this pipeline's: pass the model prepare() returned")
        assert self.stats is not None
        self.builder.optimizer = optimizer
        t0 = time.perf_counter()
        batches = [(_as_args(self.to_device(x)), self.to_device(y)) for x, y in micro_batches]
        self._loss = (loss_fn, sum(len(y) for _, y in batches))
        runners = [self.builder.runner(self._chunk(x), self._chunk((y,))[0], True, self._weighted_loss,
                                       self.pp_group, self.meter, loss_fn) for x, y in batches]
        self.meter.start_step()
        if self.grad_sync is not None:
            self.grad_sync.start_step(self.m * len(batches))
        losses: list[torch.Tensor] = []
        for runner, (x, y) in zip(runners, batches):
            runner.step(x, y, losses)
        if self.grad_sync is not None:
            with timer.phase("dp_allreduce"):
                self.grad_sync.finish()
        busy, wall = sum(self.meter.busy.values()), time.perf_counter() - t0
        mine = float(sum(loss.detach().double() for loss in losses)) if losses else None
        pending = self.stats.start(mine, busy, wall)  # the last stage's loss to every rank, during the update
        timer.add("forward", self.meter.busy["F"])
        timer.add("backward", self.meter.busy["B"] + self.meter.busy["W"])
        timer.add("pipeline_wait", max(wall - busy, 0.0))
        self.reporter.before_update(self.module, self.meter)
        with timer.phase("optimizer"):
            if grad_clip:
                self.clip_grad_norm(model, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with timer.phase("loss_sync"):
            loss = self.stats.finish(pending)
        self.reporter.after_update(self)
        return torch.tensor(loss, dtype=torch.float32, device=self.device)

    def eval_forward(self, model: nn.Module, inputs: Any) -> torch.Tensor | None:
        """Outputs on the rank holding the last stage, ``None`` elsewhere. The batch is padded
        (its last sample repeated) to a multiple of M; the padding is cut off the outputs."""
        x = _as_args(self.to_device(inputs))
        n = len(x[0])
        padded = tuple(_pad(a, max(self.m, -(-n // self.m) * self.m)) for a in x)
        runner = self.builder.runner(self._chunk(padded), None, False, None, self.pp_group, None, None)
        out = runner.forward(padded)
        return None if out is None else out[:n]

    def _chunk(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        n = len(args[0])
        if n % self.m:
            raise ConfigError(
                f"a batch of {n} samples per data-parallel replica cannot be split into strategy.microbatches={self.m} "
                f"equal micro-batches: make data.batch_size a multiple of microbatches x data-parallel size "
                f"({self.m} x {self.d} = {self.m * self.d})"
            )
        return tuple(a[: n // self.m] if torch.is_tensor(a) else a for a in args)

    def to_device(self, x: Any) -> Any:
        if torch.is_tensor(x):
            return x.to(self.device, non_blocking=True)
        if isinstance(x, (list, tuple)):
            return type(x)(self.to_device(v) for v in x)
        return x

    # ------------------------------------------------------------------ collectives
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the norm over every stage's gradients (stages hold disjoint parameters)."""
        assert self.module is not None
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            sq += g.detach().double().pow(2).sum()
        dist.all_reduce(sq, group=self.pp_group)
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return norm.float()

    def check_in_sync(self, model: nn.Module) -> list[str]:
        """Parameters that differ between this rank's data-parallel replicas."""
        assert self.module is not None
        params = list(self.module.named_parameters())
        if self.d == 1 or not params or self.module.on_meta:
            return []
        sums = torch.stack([p.detach().double().sum() for _, p in params]).to(self.device)
        hi, lo = sums.clone(), sums.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.dp_group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.dp_group)
        return [n for (n, _), h, low in zip(params, hi.tolist(), lo.tolist()) if h != low]

    def replica_key(self) -> str:
        return f"pipeline rank {self.pp_rank}" if self.builder.is_cut else ""

    # ------------------------------------------------------------------ reports
    def metrics(self) -> dict[str, float]:
        return self.stats.metrics() if self.stats is not None else {}

    def bubble_fraction(self) -> float:
        return self.stats.run_bubble() if self.stats is not None else float("nan")

    def memory_report(self) -> list[dict[str, float]] | None:
        return self.reporter.rows

    def summary(self) -> dict[str, Any]:
        out = self.reporter.summary()
        bubble = self.bubble_fraction()
        if bubble == bubble:  # not NaN: at least one step
            out["bubble_fraction"] = round(bubble, 4)
        return out

    def describe(self) -> dict[str, Any]:
        return {"pipeline_size": self.k, "stages_per_rank": self.v, "data_parallel": self.d, "stages": self.n_stages}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        return {"pipeline_stages": self.n_stages, "pipeline_size": self.k}

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Any) -> dict[str, Any] | None:
        assert self.module is not None
        if self.module.on_meta:
            raise ConfigError(
                "strategy.init=meta with placement auto or split points: the stages are built at the first batch, "
                "so there is nothing to checkpoint before it; train one step first (or pin the placement)"
            )
        checkpointing.save(self.module, optimizer, path)
        return {"pipeline": self.layout, "stages": self.n_stages, "pipeline_size": self.k} if dist.get_rank() == 0 else None

    def load_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Any,
                        manifest: dict[str, Any]) -> None:
        assert self.module is not None
        if self.module.on_meta:  # the stages' tensors exist from the first batch on: load then
            self._pending_load = path
            return
        checkpointing.load(self.module, optimizer, path)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        """Restore a local snapshot (``Strategy.state_dict``: the Trainer's pre-flight). A snapshot
        taken before the stages were cut holds the whole model and a fresh optimizer: this rank
        takes its own tensors and starts its optimizer fresh again."""
        assert self.module is not None
        mine = self.module.state_dict()
        self.module.load_state_dict({k: v for k, v in state["model"].items() if k in mine})
        saved = state.get("optimizer")
        if optimizer is None or saved is None:
            return
        if saved.get("state"):  # taken after the cut: the same parameters
            optimizer.load_state_dict(saved)
            return
        optimizer.state.clear()
        for group, old in zip(optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in old.items() if k != "params"})

    def export_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        assert self.module is not None and self.builder.skeleton is not None
        return checkpointing.export(self.module, self.dp_rank == 0, list(self.builder.skeleton.state_dict()))


def _as_args(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _pad(t: Any, n: int) -> Any:
    """``t`` with its last sample repeated up to ``n`` samples (an eval batch to a traced shape)."""
    if not torch.is_tensor(t) or len(t) >= n:
        return t
    return torch.cat([t, t[-1:].expand(n - len(t), *t.shape[1:])])
