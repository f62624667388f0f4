"""The plug-in face: a handful of calls that make an existing PyTorch loop distributed.

    ds = disttrain.setup(strategy="ddp")
    model, optimizer, loader = ds.prepare(model, optimizer, loader)
    ...
    ds.backward(loss)          # instead of loss.backward()
    optimizer.step()           # unchanged (or ds.step())

The Trainer is built on the same object. Nothing here asks which strategy it holds.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from disttrain import activation_checkpointing as ac
from disttrain import watchdog
from disttrain.checkpoint import write_full
from disttrain.env import DistEnv, configure_threads, destroy_process_group
from disttrain.errors import ConfigError
from disttrain.loaders import ShardedLoader, shard_loader
from disttrain.registry import build_strategy
from disttrain.state import RunState
from disttrain.strategies.base import RunOptions, Strategy
from disttrain.timing import StepTimer

if TYPE_CHECKING:
    from disttrain.preemption import StopRequest

log = logging.getLogger(__name__)
T = TypeVar("T")

PRECISIONS = ("32", "bf16")


class Session:
    """One process's handle on a distributed job: environment, strategy, device, precision."""

    def __init__(
        self,
        strategy: Strategy | str | dict = "ddp",
        *,
        env: DistEnv | None = None,
        accelerator: str = "auto",
        precision: str = "32",
        backend: str = "auto",
        timeout_s: float = 300.0,
        num_threads: int | None = None,
        gradient_accumulation_steps: int = 1,
        grad_clip: float | None = None,
        seed: int | None = None,
        batch_size_per_rank: bool = False,
        activation_checkpointing: str | Sequence[str] | None = None,
        **strategy_options: Any,
    ) -> None:
        precision = str(precision)
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}: expected one of {list(PRECISIONS)}")
        ac.check(activation_checkpointing)
        self.activation_checkpointing = activation_checkpointing
        if int(gradient_accumulation_steps) < 1:
            raise ConfigError(f"gradient_accumulation_steps={gradient_accumulation_steps}: must be >= 1")
        self.env = env or DistEnv.from_environ()
        self.strategy = build_strategy(strategy, **strategy_options)
        # the one record of these options: the strategy reads them too (DeepSpeed's config)
        self.strategy.run_options = RunOptions(precision, int(gradient_accumulation_steps), grad_clip)
        self.strategy.validate(self.env)  # before any process group: fails on every rank alike
        self.device = self.env.device(accelerator)
        self.num_threads = configure_threads(self.device, num_threads)
        watchdog.enable_flight_recorder()  # torch's record of the last collectives, for hang reports
        if seed is not None:
            seed_everything(seed)
        self.strategy.setup(self.env, self.device, self.env.backend(self.device, backend), timeout_s)
        self.batch_size_per_rank = bool(batch_size_per_rank)
        self.timer = StepTimer(self.device)
        self._micro = 0  # backward calls since the start of the run (plug-in face)
        self._stepped_at = 0  # value of _micro at the last applied step
        self.state = RunState(self.strategy, self.env)  # what save() and load() cover
        self._closed = False
        atexit.register(self.close)  # the plug-in face may never call close(): end cleanly anyway

    # ------------------------------------------------------------------ facts
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        """True on the one process that logs and writes files (global rank 0)."""
        return self.env.is_rank_zero

    @property
    def accumulate(self) -> int:
        """Micro-batches per optimizer step (``gradient_accumulation_steps``)."""
        return self.strategy.run_options.gradient_accumulation_steps

    @property
    def grad_clip(self) -> float | None:
        return self.strategy.run_options.grad_clip

    @property
    def precision(self) -> str:
        return self.strategy.run_options.precision

    @property
    def data_shard(self) -> tuple[int, int]:
        """``(index, count)`` of this rank's data shard; ``count`` is the data-parallel size."""
        return self.strategy.data_shard(self.env)

    # ------------------------------------------------------------------ prepare
    def prepare(self, *objects: Any) -> Any:
        """Prepare a model, an optimizer, any number of DataLoaders and LR schedulers (in any
        order); returns them in the same order. At most one model and one optimizer per call.
        Schedulers are returned as they are and saved/restored with every checkpoint."""
        models = [o for o in objects if isinstance(o, nn.Module)]
        optims = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
        if len(models) > 1 or len(optims) > 1:
            raise ValueError(
                f"prepare() takes at most one model and one optimizer per call, got {len(models)} and "
                f"{len(optims)}: call prepare() once per model/optimizer pair"
            )
        model: nn.Module | None = models[0] if models else None
        optimizer: torch.optim.Optimizer | None = optims[0] if optims else None
        if model is not None:
            model, optimizer = self.prepare_model(model, optimizer)
        out: list[Any] = []
        for o in objects:
            if isinstance(o, nn.Module):
                out.append(model)
            elif isinstance(o, torch.optim.Optimizer):
                out.append(_SessionOptimizer(self, optimizer) if optimizer is not None else o)
            elif isinstance(o, DataLoader):
                out.append(self.prepare_loader(o))
            elif isinstance(o, torch.optim.lr_scheduler.LRScheduler):
                self.register_for_checkpointing(o)  # stepped by the user, saved and restored with the run
                out.append(o)
            else:
                raise TypeError(
                    f"prepare() got a {type(o).__name__}: expected nn.Module, Optimizer or DataLoader (or an LR "
                    f"scheduler, to save with checkpoints)"
                )
        return out[0] if len(out) == 1 else tuple(out)

    def build_model(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """Construct the model through the strategy: one that holds only part of it on this
        rank (a pipeline stage) may build just that part."""
        return self.strategy.build_model(factory)

    def prepare_model(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Wrap ``model`` (and its optimizer) for the strategy; returns the raw wrapped pair. With
        ``activation_checkpointing``, its blocks are wrapped for recomputation first."""
        ac.apply(model, self.activation_checkpointing)
        model, optimizer = self.strategy.wrap(model, optimizer)
        model = self.strategy.apply_precision(model, self.precision)
        self.strategy.set_grad_sync(model, self.accumulate == 1)
        self.state.model, self.state.optimizer = model, optimizer
        return model, optimizer

    def prepare_loader(
        self, loader: DataLoader, shuffle: bool | None = None, seed: int = 0, device_placement: bool = True
    ) -> ShardedLoader:
        """Rebuild ``loader`` so each data-parallel rank reads its own shard of every epoch.

        The loader's ``batch_size`` is the *global* batch: each of N data-parallel ranks gets
        ``batch_size / N`` samples, so a run gives the same result as one process on the
        gathered batch (Accelerate's ``split_batches=True``); with ``batch_size_per_rank=True``
        (``setup``) it is each rank's batch instead. With ``device_placement`` (the default, as
        in Accelerate) the tensors of every batch arrive on this rank's device; the strategy
        decides which (a single-process pipeline leaves them where its first stage moves them).
        The loader's position is saved and restored by ``save``/``load``."""
        index, count = self.data_shard
        sharded = shard_loader(
            loader, index, count, shuffle=shuffle, seed=seed,
            place=self.strategy.to_device if device_placement else None, per_rank=self.batch_size_per_rank,
        )
        self.state.loaders.append(sharded)
        return sharded

    # ------------------------------------------------------------------ step (plug-in face)
    @property
    def sync_gradients(self) -> bool:
        """True when the last backward completed an accumulation cycle (the step will apply)."""
        return self._micro % self.accumulate == 0

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` for the strategy; scales for accumulation and skips gradient
        synchronisation on all but the last micro-step of each accumulation cycle."""
        model = self._require_model()
        self.strategy.backward(loss / self.accumulate, model)
        self._micro += 1
        # The next forward belongs to the micro-step after this one.
        self.strategy.set_grad_sync(model, (self._micro + 1) % self.accumulate == 0)

    def step(self) -> bool:
        """Apply the accumulated gradients (clipping if configured) and zero them, at the end of
        an accumulation cycle; a no-op otherwise. Returns whether a step was taken."""
        if not self.sync_gradients or self._micro == self._stepped_at:
            return False
        self._stepped_at = self._micro
        model, opt = self._require_model(), self.state.optimizer
        assert opt is not None, "prepare() an optimizer before step()"
        self.strategy.optimizer_step(model, opt, self.grad_clip)
        opt.zero_grad(set_to_none=True)
        return True

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return self.strategy.clip_grad_norm(self._require_model(), max_norm)

    def train_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        micro_batches: list,
        loss_fn: Callable[..., torch.Tensor] | None,
    ) -> torch.Tensor:
        """One whole optimizer step, owned by the strategy: the Trainer's path, and the plug-in
        face's for strategies that run forward and backward together (pipelines):
        ``loss = ds.train_step(model, optimizer, (inputs, targets), loss_fn)``. ``micro_batches``:
        one ``(inputs, targets)`` batch (inputs a tensor), or a list of batches accumulated into
        the step. Returns the mean loss."""
        if isinstance(micro_batches, (tuple, list)) and micro_batches and torch.is_tensor(micro_batches[0]):
            micro_batches = [micro_batches]  # one batch
        optimizer = optimizer.inner if isinstance(optimizer, _SessionOptimizer) else optimizer
        return self.strategy.train_step(model, optimizer, micro_batches, loss_fn, self.grad_clip, self.timer)

    def eval_forward(self, model: nn.Module, inputs: Any, targets: Any = None) -> Any:
        """The model's output for ``inputs`` without gradients (``targets`` go to a model whose
        forward takes them); ``None`` on ranks that produce no output (non-final pipeline stages)."""
        with torch.no_grad():
            return self.strategy.eval_forward(model, inputs, targets)

    # ------------------------------------------------------------------ collectives
    def reduce(self, tensor: torch.Tensor | float, op: str = "mean") -> torch.Tensor:
        """Reduce over the training ranks: ``sum``, ``mean``, ``max`` or ``min``."""
        t = torch.as_tensor(tensor, device=self.device, dtype=torch.float64 if not torch.is_tensor(tensor) else None)
        return self.strategy.reduce(t, op)

    def barrier(self) -> None:
        self.strategy.barrier()

    def all_gather_object(self, obj: Any, everyone: bool = False) -> list[Any]:
        """``obj`` from every training rank (``everyone``: every rank of the job), in rank order."""
        group = None if everyone else self.strategy.reduce_group()
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return [obj]
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    @property
    def training_ranks(self) -> list[int]:
        """Global ranks of the training ranks (``all_gather_object``'s order)."""
        if not dist.is_initialized():
            return [self.rank]
        return dist.get_process_group_ranks(self.strategy.reduce_group() or dist.group.WORLD)

    def broadcast_object(self, obj: Any, src_index: int) -> Any:
        """``obj`` of the training rank at position ``src_index`` (as in ``all_gather_object``)."""
        group = self.strategy.reduce_group()
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return obj
        box = [obj]
        src = src_index if group is None else dist.get_global_rank(group, src_index)
        dist.broadcast_object_list(box, src=src, group=group)
        return box[0]

    def run(self, loop: Callable[[], T], logger: Any = None) -> T | None:
        """Run ``loop`` on training ranks; ranks with other roles (parameter servers) serve."""
        return self.strategy.run(loop, logger)

    def finish_training(self) -> None:
        """After ``run``: ranks with other roles come back together (parameter servers send the
        final weights to every rank), so every rank holds the final model."""
        self.strategy.finish_training(self._require_model())

    # ------------------------------------------------------------------ what the strategy reports
    @property
    def strategy_name(self) -> str:
        return self.strategy.name

    @property
    def eval_shard(self) -> tuple[int, int]:
        """``(index, count)`` of the eval set this rank evaluates."""
        return self.strategy.eval_shard(self.env)

    def strategy_metrics(self) -> dict[str, float]:
        """The strategy's own scalars for TensorBoard (staleness, bubble, ...), polled at log steps."""
        return self.strategy.log_metrics()

    def strategy_summary(self) -> dict[str, Any]:
        """The strategy's own figures for the run's summary."""
        return self.strategy.summary()

    def check_in_sync(self) -> list[str]:
        """Names of parameters that differ across ranks that should hold identical copies."""
        return self.strategy.check_in_sync(self._require_model())

    def verify_same_job(self, model: nn.Module, config: dict[str, Any] | None = None) -> str:
        """Before the first step: every rank about to train the same model (among ranks holding
        the same part) and config, or DesyncError on every rank naming the first difference."""
        from disttrain import fingerprint

        return fingerprint.verify(model, config, self.strategy.replica_key(self.env), self.rank)

    def snapshot(self) -> dict[str, Any]:
        """A copy of the model's and optimizer's state, for ``restore`` (the pre-flight check)."""
        import copy

        return copy.deepcopy(self.strategy.state_dict(self._require_model(), self.state.optimizer))

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.strategy.load_state_dict(self._require_model(), self.state.optimizer, snapshot)

    def stop_request(self) -> "StopRequest":
        """SIGTERM/SIGUSR1 handling for a loop: see ``disttrain.preemption``."""
        from disttrain.preemption import StopRequest, job_store, stop_key

        group = self.strategy.reduce_group()
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD) if dist.is_initialized() else [self.rank]
        return StopRequest(job_store(), self.rank, ranks, stop_key(self.env.restart_count))

    # ------------------------------------------------------------------ rank-zero helpers
    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the main process only."""
        if self.is_main:
            print(*args, **kwargs)

    def rank_zero_only(self, fn: Callable[..., T]) -> Callable[..., T | None]:
        """Decorator: run ``fn`` on the main process only (``None`` elsewhere)."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T | None:
            return fn(*args, **kwargs) if self.is_main else None

        return wrapper

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. to prepare a dataset), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when ``precision="bf16"``, else a no-op."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike, keep_last: int | None = None, full: bool = False, **extra: Any) -> Path:
        """Save model, optimizer, the prepared loaders' positions, registered objects (e.g. LR
        schedulers), every rank's RNG states and ``extra`` (tensors, numbers, strings, containers)
        to ``path`` atomically. Call on every rank; the strategy decides who writes what. With
        ``keep_last``, this run's older checkpoints in the same directory beyond that many are
        removed (never another run's, never the one ``latest`` names).

        ``full=True`` instead exports the whole model for inference or another strategy: one
        file ``{"model": state_dict, "extra": extra}`` under the unsplit model's keys, gathered
        from shards or pipeline stages by the strategy, written by rank 0 (no optimizer: not a
        checkpoint to resume from). Load it with ``torch.load(path, weights_only=True)``."""
        if full:
            state = self.strategy.export_state_dict(self._require_model())
            if state is not None:
                write_full(Path(path), state, extra)
            self.barrier()
            return Path(path)
        return self.state.save(Path(path), extra, keep_last=keep_last)

    def load(
        self, path: str | os.PathLike, restore_rng: bool = True, manifest: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Load what ``save`` wrote into the prepared model, optimizer, loaders and registered
        objects; returns ``extra``. Each rank gets back its own random states (Python, NumPy,
        torch) as they were at the save, so the run continues exactly; a resumed loop's next
        ``for batch in loader`` continues the saved epoch where it stopped. A rank the checkpoint
        has no RNG state for (the world grew) takes the state of rank ``rank % saved_ranks``.
        ``manifest``: the file's contents, if the caller has read it already."""
        return self.state.load(Path(path), manifest=manifest, restore_rng=restore_rng)

    def full_state_dict(self) -> dict[str, Any] | None:
        """The whole model's ``state_dict`` (plain tensors, the unsplit model's keys) on the main
        process, gathered from shards or pipeline stages; ``None`` on the other ranks.
        Collective: call it on every rank (as Accelerate's ``get_state_dict``)."""
        state = self.strategy.export_state_dict(self._require_model())
        return None if state is None else {k: v.detach().cpu() for k, v in state.items()}

    def register_for_checkpointing(self, obj: Any) -> None:
        """Save and restore ``obj`` (anything with ``state_dict``/``load_state_dict``: an LR
        scheduler, a GradScaler, your own counter) with every checkpoint."""
        self.state.register(obj)

    @contextlib.contextmanager
    def join(self) -> Iterator[None]:
        """Wrap a loop in which ranks may take different numbers of steps (uneven inputs: a
        user's own sampler, sharded files of different sizes, iterable data). Ranks that run out
        early shadow the others' collectives instead of hanging them; at the end every rank holds
        the same parameters: for DDP this is torch's ``Join`` (ranks that finished shadow the
        others' allreduces, then the last rank to finish broadcasts its parameters). A model that
        cannot join (another strategy's) raises ConfigError."""
        from torch.distributed.algorithms import Join, Joinable

        model = self._require_model()
        if not dist.is_initialized() or dist.get_world_size(self.strategy.reduce_group()) == 1:
            yield
            return
        if not isinstance(model, Joinable):
            raise ConfigError(
                f"strategy {self.strategy.name} cannot train on uneven inputs (ranks with different numbers of "
                f"batches): give every rank the same number of batches, e.g. ds.prepare(loader) with drop_last=True"
            )
        with Join([model]):
            yield

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.strategy.unwrap(model)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Release the strategy's objects, then the process group (in that order: a DDP reducer
        outliving its group is what lets gloo abort the process at exit). Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self.state.model = self.state.optimizer = None
        try:
            self.strategy.teardown()
        finally:
            destroy_process_group()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_model(self) -> nn.Module:
        return self.state._require_model()


class _SessionOptimizer(torch.optim.Optimizer):
    """The user's optimizer, seen through the Session: ``step()`` applies only at the end of an
    accumulation cycle (with clipping), ``zero_grad()`` only between cycles. Everything else
    (param_groups, state, state_dict) is the wrapped optimizer's, so LR schedulers work."""

    def __init__(self, session: Session, optimizer: torch.optim.Optimizer) -> None:
        # Deliberately not calling Optimizer.__init__: this object owns no parameters.
        self.session, self.inner = session, optimizer

    @property
    def param_groups(self):  # type: ignore[override]
        return self.inner.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.inner.state

    @property
    def defaults(self):  # type: ignore[override]
        return self.inner.defaults

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("closures are not supported through ds.prepare(); call the loss yourself")
        self.session.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.session.sync_gradients:
            self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"SessionOptimizer({self.inner!r})"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the same seed on every rank: models start identical)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


STRATEGY_ENV, STRATEGY_OPTIONS_ENV = "DISTTRAIN_STRATEGY", "DISTTRAIN_STRATEGY_OPTIONS"


def setup(strategy: Strategy | str | dict = "ddp", **kwargs: Any) -> Session:
    """Start a distributed session: ``ds = disttrain.setup(strategy="ddp")``. Reads rank and
    world size from torchrun/SLURM/Kubeflow (or runs as one process), starts the process group,
    and returns the Session. Keyword arguments are Session's, then the strategy's options.

    The launcher may choose the strategy without editing the script (as ``accelerate launch``
    does): ``DISTTRAIN_STRATEGY=deepspeed`` replaces the script's strategy, and
    ``DISTTRAIN_STRATEGY_OPTIONS='{"zero_stage": 3}'`` (JSON) adds options to it."""
    import json

    if os.environ.get(STRATEGY_ENV):
        chosen = os.environ[STRATEGY_ENV]
        if chosen != strategy:
            log.warning("%s=%s replaces the strategy the script asked for (%s)", STRATEGY_ENV, chosen, strategy)
        strategy = chosen
    if os.environ.get(STRATEGY_OPTIONS_ENV):
        try:
            options = json.loads(os.environ[STRATEGY_OPTIONS_ENV])
        except ValueError as exc:
            raise ConfigError(f"{STRATEGY_OPTIONS_ENV}={os.environ[STRATEGY_OPTIONS_ENV]!r} is not JSON ({exc}): "
                              f"write it as '{{\"zero_stage\": 3}}'") from exc
        kwargs = {**kwargs, **options}
    return Session(strategy, **kwargs)
