"""The one interface every parallelism implements.

A strategy is built from config (cheap, no process group), validated against the environment,
then set up. After that the Session and the Trainer only call these methods; neither ever asks
which strategy it holds. A strategy can own the whole train step (``train_step``) and even the
whole loop (``run``: a parameter server's server ranks serve instead of training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from disttrain import forward
from disttrain.errors import ConfigError
from disttrain.tree import map_tensors

if TYPE_CHECKING:
    from pathlib import Path

    from disttrain.env import DistEnv
    from disttrain.observe import RunLogger
    from disttrain.timing import StepTimer

T = TypeVar("T")
Batch = Sequence[Any]  # (inputs, targets)
LossFn = Callable[[Any, Any], torch.Tensor]  # None when the model returns its own loss

@dataclass(frozen=True)
class RunOptions:
    """Training options the Session owns and some strategies must know (an engine such as
    DeepSpeed folds them into its own config: one source of truth)."""

    precision: str = "32"  # "32" | "bf16"
    gradient_accumulation_steps: int = 1
    grad_clip: float | None = None


_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "mean": dist.ReduceOp.SUM,  # divided afterwards: gloo has no AVG
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


class Strategy:
    """Base class; its defaults describe one process that holds the whole model (``single``).

    Lifecycle: ``__init__(**options)`` -> ``validate(env)`` -> ``setup(env, device, ...)`` ->
    ``wrap`` / ``train_step`` / ... -> ``teardown()``.
    """

    #: the name shown in logs and reports (never used for branching)
    name: str = "base"

    def __init__(self) -> None:
        self.env: DistEnv | None = None
        self.device = torch.device("cpu")
        self.run_options = RunOptions()
        self._group_started = False

    # ------------------------------------------------------------------ lifecycle
    def validate(self, env: "DistEnv") -> None:
        """Raise ConfigError if this strategy cannot run in ``env``. Called on every rank before
        any process group exists, so a bad config fails everywhere at once, without a hang."""

    def setup(self, env: "DistEnv", device: torch.device, backend: str, timeout_s: float) -> None:
        """Start the process group (if the job is distributed) and remember the device."""
        from disttrain.env import init_process_group

        self.env = env
        self.device = device
        self._group_started = init_process_group(env, backend, timeout_s, device)

    def teardown(self) -> None:
        """Release what ``setup`` made. The Session destroys the process group afterwards."""

    def run(self, loop: Callable[[], T], logger: "RunLogger | None" = None) -> T | None:
        """Run the training loop on this rank. Strategies whose ranks have other roles (servers)
        run those roles here instead (logging their own metrics through ``logger``, which
        writes only on rank 0); the return value is then ``None``."""
        return loop()

    def finish_training(self, model: nn.Module) -> None:
        """Called on every rank after ``run`` returns, before the final evaluation and
        checkpoint: a strategy whose ranks had different roles brings them back together here
        (e.g. servers assemble the final model on every rank)."""

    def log_metrics(self) -> dict[str, float]:
        """Strategy-specific scalars for TensorBoard, polled by the Trainer at log steps."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Strategy-specific figures for the run's final summary line and summary.json."""
        return {}

    # ------------------------------------------------------------------ data
    def data_shard(self, env: "DistEnv") -> tuple[int, int]:
        """``(index, count)``: which shard of each epoch this rank reads, out of how many.
        Also used before setup to check the batch size divides evenly."""
        return env.rank, env.world_size

    def eval_shard(self, env: "DistEnv") -> tuple[int, int]:
        """``(index, count)`` of the eval set this rank evaluates; every sample is evaluated
        exactly once across the ranks whose ``eval_forward`` returns outputs."""
        return self.data_shard(env)

    # ------------------------------------------------------------------ model
    def build_model(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """Construct the model. A strategy that holds only part of it on this rank (pipeline
        stages) may build just that part."""
        return factory()

    def apply_precision(self, model: nn.Module, precision: str) -> nn.Module:
        """bf16: run the wrapped model's forward under autocast and return fp32 outputs (as
        Accelerate does). Engines with their own mixed precision override this."""
        if precision == "bf16":
            model.forward = _autocast_forward(model.forward, self.device)
        return model

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Move ``model`` to the device and wrap it (and the optimizer) for this strategy."""
        return model.to(self.device), optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside whatever ``wrap`` returned."""
        return model

    # ------------------------------------------------------------------ one step, in parts
    def set_grad_sync(self, model: nn.Module, enabled: bool) -> None:
        """Whether the next forward/backward synchronises gradients (off on non-final
        accumulation micro-steps). Must be called before the forward."""

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        """Apply the (already synchronised) gradients; clip first if asked."""
        if grad_clip:
            self.clip_grad_norm(model, grad_clip)
        optimizer.step()

    # ------------------------------------------------------------------ one step, whole
    def train_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        micro_batches: Sequence[Batch],
        loss_fn: LossFn,
        grad_clip: float | None,
        timer: "StepTimer",
    ) -> torch.Tensor:
        """Forward, backward and update over ``micro_batches`` (gradient accumulation: sync only
        on the last). Returns the mean loss of this rank, detached. Strategies that schedule
        micro-batches themselves (pipelines) or exchange gradients differently override this."""
        loss, _ = self.forward_backward(model, micro_batches, loss_fn, timer)
        with timer.phase("optimizer"):
            self.optimizer_step(model, optimizer, grad_clip)
            optimizer.zero_grad(set_to_none=True)
        return loss

    def forward_backward(
        self, model: nn.Module, micro_batches: Sequence[Batch], loss_fn: LossFn, timer: "StepTimer"
    ) -> tuple[torch.Tensor, int]:
        """The accumulation loop, written once: forward and backward of every micro-batch, the
        loss scaled by their number, gradients synchronised on the last only. Returns the mean
        loss (detached) and the number of samples."""
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        samples = 0
        for i, (inputs, targets) in enumerate(micro_batches):
            self.set_grad_sync(model, i == n - 1)
            inputs, targets = self.to_device(inputs), self.to_device(targets)
            with timer.phase("forward"):
                loss = forward.loss_of(forward.call(model, inputs, targets), targets, loss_fn)
            with timer.phase("backward"):
                self.backward(loss / n, model)
            total += loss.detach()
            samples += len(targets)
        return total / n, samples

    def eval_forward(self, model: nn.Module, inputs: Any, targets: Any = None) -> Any:
        """Outputs for ``inputs`` in eval mode (``targets`` go to a model whose forward takes
        them), or ``None`` on ranks that produce none (the non-final stages of a pipeline)."""
        return forward.call(model, self.to_device(inputs), self.to_device(targets))

    # ------------------------------------------------------------------ collectives
    def reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Reduce ``tensor`` over the ranks that train (``sum``, ``mean``, ``max``, ``min``)."""
        if op not in _REDUCE_OPS:
            raise ValueError(f"reduce op {op!r}: expected one of {sorted(_REDUCE_OPS)}")
        group = self.reduce_group()
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out, op=_REDUCE_OPS[op], group=group)
        if op == "mean":
            out = out / dist.get_world_size(group)
        return out

    def reduce_group(self) -> dist.ProcessGroup | None:
        """The group ``reduce`` and ``barrier`` span: by default every rank."""
        return None

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.reduce_group())

    def check_in_sync(self, model: nn.Module) -> list[str]:
        """Names of parameters that differ across the ranks that should hold identical copies.
        Compares per-parameter checksums with one max and one min reduction."""
        params = [(n, p) for n, p in self.unwrap(model).named_parameters()]
        if not params:
            return []
        sums = torch.stack([p.detach().double().sum() for _, p in params]).to(self.device)
        hi, lo = self.reduce(sums, "max"), self.reduce(sums, "min")
        return [n for (n, _), high, low in zip(params, hi.tolist(), lo.tolist()) if high != low]

    # ------------------------------------------------------------------ checkpoints
    # A checkpoint must let a restarted job continue exactly. The Session (``disttrain.state``)
    # saves, besides what these hooks write: every rank's RNG states, the loaders' positions,
    # registered objects (schedulers), the caller's values and the run's layout
    # (``checkpoint_meta``). ``save_checkpoint`` writes the model and optimizer: whole, in the
    # manifest the writing rank returns (the default: ``state_dict`` gathered by the writer),
    # or as shards in ``checkpoint.shards_dir(path)`` written by every rank (FSDP, ZeRO,
    # pipeline stages), the manifest then only recording that. ``load_checkpoint`` gets that
    # manifest back on every rank, after ``check_resume`` accepted the layout.
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Everything of model and optimizer needed to continue, as the writer will save it
        (collective over ``reduce_group`` where shards live elsewhere)."""
        return {
            "model": self.unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
        }

    def load_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]
    ) -> None:
        self.unwrap(model).load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])

    def export_state_dict(self, model: nn.Module) -> dict[str, Any] | None:
        """The whole model's ``state_dict`` under the unsplit model's keys, on global rank 0
        (``None`` elsewhere), for inference or another strategy: strategies holding shards or
        stages gather them here (collective). Default: the local model, which is whole."""
        return self.unwrap(model).state_dict() if self.env is None or self.env.is_rank_zero else None

    def checkpoint_layout(self) -> str:
        """How ``save_checkpoint`` stores model and optimizer: ``full`` (one whole state dict,
        readable by every strategy of that layout) or a strategy-specific name for sharded forms.
        A checkpoint is loaded only by a run of the same layout."""
        return "full"

    def checkpoint_meta(self) -> dict[str, Any]:
        """Facts about this strategy's layout saved with each checkpoint (besides the world and
        data-parallel sizes the Session records), for ``check_resume`` to compare on load, e.g.
        ``{"num_servers": 2}`` or ``{"stages": 4}``. Plain numbers and strings only."""
        return {}

    def check_resume(self, meta: dict[str, Any]) -> None:
        """Raise ConfigError if a checkpoint saved with ``meta`` (the saving run's
        ``world_size``, ``data_parallel_size``, ``strategy``, ``layout`` and this hook's partner
        ``checkpoint_meta``) cannot be loaded by this run. Called on every rank before any state
        is loaded, so a mismatch fails everywhere alike. The default accepts any world size: the
        state is whole, and the data position is remapped by the loaders."""

    def replica_key(self, env: "DistEnv") -> str:
        """Ranks that return the same key build identical models (``build_model``); the
        pre-training fingerprint check compares models only among them. Data parallel: every
        rank alike. A strategy whose ranks hold different parts (pipeline stages) returns the
        part's name."""
        return ""

    def writes_checkpoint(self) -> bool:
        """Whether this rank writes the checkpoint file (rank 0 for data parallelism)."""
        return self.env is None or self.env.is_rank_zero

    def save_checkpoint(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: "Path"
    ) -> dict[str, Any] | None:
        """Called on every rank for checkpoint ``path``. Returns, on the rank that
        ``writes_checkpoint``, the dict to write as the manifest file (the Session adds its own
        state and writes it atomically); ``None`` elsewhere. Default: the whole ``state_dict``."""
        state = self.state_dict(model, optimizer)
        return state if self.writes_checkpoint() else None

    def load_checkpoint(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: "Path", manifest: dict[str, Any]
    ) -> None:
        """Load what ``save_checkpoint`` wrote for ``path`` (its manifest: ``manifest``)."""
        self.load_state_dict(model, optimizer, manifest)

    # ------------------------------------------------------------------ helpers
    def to_device(self, x: Any) -> Any:
        """``x`` (a tensor, or tensors in lists, tuples and dicts) on this rank's device."""
        return map_tensors(lambda t: t.to(self.device, non_blocking=True), x)


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds: for ``validate`` implementations."""
    if not condition:
        raise ConfigError(message)


def _autocast_forward(forward: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    import functools

    @functools.wraps(forward)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out

    return wrapped
