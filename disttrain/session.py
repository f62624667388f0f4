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
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, TensorDataset, default_collate

from disttrain import checkpoint as ckpt
from disttrain.env import DistEnv, configure_threads, destroy_process_group
from disttrain.errors import ConfigError
from disttrain.registry import build_strategy
from disttrain.strategies.base import RunOptions, Strategy
from disttrain.timing import StepTimer

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
        **strategy_options: Any,
    ) -> None:
        precision = str(precision)
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}: expected one of {list(PRECISIONS)}")
        if int(gradient_accumulation_steps) < 1:
            raise ConfigError(f"gradient_accumulation_steps={gradient_accumulation_steps}: must be >= 1")
        self.env = env or DistEnv.from_environ()
        self.strategy = build_strategy(strategy, **strategy_options)
        self.strategy.validate(self.env)  # before any process group: fails on every rank alike
        self.device = self.env.device(accelerator)
        self.precision = precision
        self.accumulate = int(gradient_accumulation_steps)
        self.grad_clip = grad_clip
        self.num_threads = configure_threads(self.device, num_threads)
        self.strategy.configure(RunOptions(precision, self.accumulate, grad_clip))
        if seed is not None:
            seed_everything(seed)
        self.strategy.setup(self.env, self.device, self.env.backend(self.device, backend), timeout_s)
        self.timer = StepTimer(self.device)
        self._micro = 0  # backward calls since the start of the run (plug-in face)
        self._stepped_at = 0  # value of _micro at the last applied step
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
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
    def data_shard(self) -> tuple[int, int]:
        """``(index, count)`` of this rank's data shard; ``count`` is the data-parallel size."""
        return self.strategy.data_shard(self.env)

    # ------------------------------------------------------------------ prepare
    def prepare(self, *objects: Any) -> Any:
        """Prepare a model, an optimizer and any number of DataLoaders (in any order); returns
        them in the same order. At most one model and one optimizer per call."""
        models = [o for o in objects if isinstance(o, nn.Module)]
        optims = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
        if len(models) > 1 or len(optims) > 1:
            raise ValueError(
                f"prepare() takes at most one model and one optimizer per call, got {len(models)} and "
                f"{len(optims)}: call prepare() once per model/optimizer pair"
            )
        model, optimizer = (models or [None])[0], (optims or [None])[0]
        if model is not None:
            model, optimizer = self.prepare_model(model, optimizer)
        out = []
        for o in objects:
            if isinstance(o, nn.Module):
                out.append(model)
            elif isinstance(o, torch.optim.Optimizer):
                out.append(_SessionOptimizer(self, optimizer) if optimizer is not None else o)
            elif isinstance(o, DataLoader):
                out.append(self.prepare_loader(o))
            else:
                raise TypeError(f"prepare() got a {type(o).__name__}: expected nn.Module, Optimizer or DataLoader")
        return out[0] if len(out) == 1 else tuple(out)

    def prepare_model(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Wrap ``model`` (and its optimizer) for the strategy; returns the raw wrapped pair."""
        model, optimizer = self.strategy.wrap(model, optimizer)
        model = self.strategy.apply_precision(model, self.precision)
        self.strategy.set_grad_sync(model, self.accumulate == 1)
        self._model, self._optimizer = model, optimizer
        return model, optimizer

    def prepare_loader(
        self, loader: DataLoader, shuffle: bool | None = None, seed: int = 0, device_placement: bool = True
    ) -> "ShardedLoader":
        """Rebuild ``loader`` so each data-parallel rank reads its own shard of every epoch.

        The loader's ``batch_size`` is the *global* batch: each of N data-parallel ranks gets
        ``batch_size / N`` samples, so a run gives the same result as one process on the
        gathered batch (Accelerate's ``split_batches=True``). With ``device_placement`` (the
        default, as in Accelerate) the tensors of every batch arrive on this rank's device; the
        strategy decides which (a single-process pipeline leaves them where its first stage
        moves them)."""
        index, count = self.data_shard
        batch = loader.batch_size
        if batch is None:
            raise ValueError("prepare() needs a DataLoader with batch_size set (a batch_sampler cannot be split)")
        if batch % count:
            raise ConfigError(
                f"batch size {batch} is not divisible by the {count} data-parallel ranks: use a multiple "
                f"of {count} (each rank gets batch_size / {count})"
            )
        if shuffle is None:
            shuffle = isinstance(loader.sampler, RandomSampler)
        sampler = _ResumableSampler(
            loader.dataset, num_replicas=count, rank=index, shuffle=shuffle, seed=seed, drop_last=loader.drop_last
        )
        dataset, collate = loader.dataset, loader.collate_fn
        if type(dataset) is TensorDataset and collate is default_collate:
            dataset, collate = _BatchIndexed(dataset), _batched  # same batches, one gather per tensor
        new = DataLoader(
            dataset,
            batch_size=batch // count,
            sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=collate,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            persistent_workers=loader.persistent_workers if loader.num_workers else False,
            # its own generator: creating an iterator then draws nothing from the global RNG, so
            # a resumed run's random stream (dropout, ...) matches an uninterrupted one
            generator=torch.Generator(),
        )
        return ShardedLoader(
            new, sampler, seed=seed, place=self.strategy.to_device if device_placement else None, dataset=loader.dataset
        )

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
        model, opt = self._require_model(), self._optimizer
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
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One whole optimizer step, owned by the strategy (the Trainer's path)."""
        optimizer = optimizer.inner if isinstance(optimizer, _SessionOptimizer) else optimizer
        return self.strategy.train_step(model, optimizer, micro_batches, loss_fn, self.grad_clip, self.timer)

    def eval_forward(self, model: nn.Module, inputs: Any) -> torch.Tensor | None:
        with torch.no_grad():
            return self.strategy.eval_forward(model, inputs)

    # ------------------------------------------------------------------ collectives
    def reduce(self, tensor: torch.Tensor | float, op: str = "mean") -> torch.Tensor:
        """Reduce over the training ranks: ``sum``, ``mean``, ``max`` or ``min``."""
        t = torch.as_tensor(tensor, device=self.device, dtype=torch.float64 if not torch.is_tensor(tensor) else None)
        return self.strategy.reduce(t, op)

    def barrier(self) -> None:
        self.strategy.barrier()

    def run(self, loop: Callable[[], T], logger: Any = None) -> T | None:
        """Run ``loop`` on training ranks; ranks with other roles (parameter servers) serve."""
        return self.strategy.run(loop, logger)

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
    def save(self, path: str | os.PathLike, keep_last: int | None = None, **extra: Any) -> Path:
        """Save model, optimizer and ``extra`` (tensors, numbers, strings, containers) to
        ``path`` atomically. Call on every rank; the strategy decides who writes. With
        ``keep_last``, older checkpoints in the same directory beyond that many are removed."""
        path = Path(path)
        extra = {**extra, "rng": self._gather_rng(), "meta": self.checkpoint_meta()}
        self.strategy.save_checkpoint(self._require_model(), self._optimizer, path, extra, keep_last=keep_last)
        self.barrier()
        return path

    def load(self, path: str | os.PathLike, restore_rng: bool = True) -> dict[str, Any]:
        """Load what ``save`` wrote into the prepared model and optimizer; returns ``extra``.
        Each rank gets back its own random states (Python, NumPy, torch) as they were at the
        save, so the run continues exactly. A rank the checkpoint has no state for (the world
        grew) takes the state of rank ``rank % saved_ranks``."""
        extra = self.strategy.load_checkpoint(self._require_model(), self._optimizer, Path(path))
        rng = extra.get("rng") or {}
        if restore_rng and rng:
            ranks = sorted(rng)
            ckpt.restore_rng(rng.get(self.rank, rng[ranks[self.rank % len(ranks)]]))
        return extra

    def checkpoint_meta(self) -> dict[str, Any]:
        """The run's layout, saved with every checkpoint and checked by ``Strategy.check_resume``."""
        return {
            "format": 2,
            "strategy": self.strategy.name,
            "world_size": self.world_size,
            "data_parallel_size": self.data_shard[1],
            **self.strategy.checkpoint_meta(),
        }

    def _gather_rng(self) -> dict[int, Any]:
        """Every checkpointing rank's random states, keyed by global rank (collective over the
        strategy's ``reduce_group``: the ranks that call ``save`` together)."""
        mine = ckpt.capture_rng()
        if not dist.is_initialized():
            return {self.rank: mine}
        group = self.strategy.reduce_group()
        if dist.get_rank(group) < 0:  # this rank does not take part (e.g. a server rank)
            return {self.rank: mine}
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (self.rank, mine), group=group)
        return {int(r): state for r, state in gathered}

    @contextlib.contextmanager
    def join(self) -> Iterator[None]:
        """Wrap a loop in which ranks may take different numbers of steps (uneven inputs: a
        user's own sampler, sharded files of different sizes, iterable data). Ranks that run out
        early shadow the others' collectives instead of hanging them; at the end every rank holds
        the same parameters. See ``Strategy.join``."""
        with self.strategy.join(self._require_model()):
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
        self._model = self._optimizer = None
        try:
            self.strategy.teardown()
        finally:
            destroy_process_group()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("call ds.prepare(model, optimizer, ...) before backward()/step()/save()")
        return self._model


class ShardedLoader:
    """A DataLoader over this rank's shard that calls ``sampler.set_epoch`` on every new epoch,
    so each epoch is shuffled differently and identically on every rank."""

    def __init__(
        self,
        loader: DataLoader,
        sampler: "_ResumableSampler",
        seed: int = 0,
        place: Callable[[Any], Any] | None = None,
        dataset: Any = None,
    ) -> None:
        self.loader, self.sampler, self.place = loader, sampler, place
        self._dataset = loader.dataset if dataset is None else dataset
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # batches of this rank to skip at the start of the next epoch (exact resume)

    def __iter__(self) -> Iterator[Any]:
        """One epoch. ``skip`` batches are skipped in the sampler (their samples are never
        loaded); the loader's generator is reseeded per epoch, so worker seeds are the same
        whether the epoch was started fresh or resumed."""
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.skip * (self.loader.batch_size or 1)
        if self.loader.generator is not None:
            self.loader.generator.manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        self.skip = 0
        self.epoch += 1
        if self.place is None:
            yield from self.loader
        else:
            for batch in self.loader:
                yield self.place(batch)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    @property
    def dataset(self) -> Any:
        """The user's dataset (not the batch-indexing view the loader may read it through)."""
        return self._dataset


class _BatchIndexed(Dataset):
    """A TensorDataset read a batch at a time. The default path indexes every sample and stacks
    them in ``default_collate`` (for 4096 samples of 1024 floats: 48 ms a batch, most of an H100
    step; benchmarks/results/h100/); ``__getitems__`` (which DataLoader calls with a batch's
    indices) gathers each tensor once. The batches are the same tensors, in the same
    ``[inputs, targets]`` list that ``default_collate`` makes."""

    def __init__(self, base: TensorDataset) -> None:
        self.tensors = base.tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [t.index_select(0, idx) for t in self.tensors]  # 6x faster than t[idx] on CPU


def _batched(batch: Any) -> Any:
    """collate_fn for ``_BatchIndexed``: the batch is already whole."""
    return batch


class _ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: ``start`` indices of this rank's
    share are dropped (once, for the next epoch). Which samples form global batch ``k`` of an
    epoch does not depend on the number of replicas (positions ``k*B .. (k+1)*B-1`` of the
    epoch's permutation, dealt round-robin), so a position saved at one world size maps exactly
    to another: ``start = samples_done / num_replicas``."""

    start = 0

    def __iter__(self) -> Iterator[Any]:
        start, self.start = self.start, 0
        it = super().__iter__()
        for _ in range(start):
            next(it, None)
        return it


class _SessionOptimizer(torch.optim.Optimizer):
    """The user's optimizer, seen through the Session: ``step()`` applies only at the end of an
    accumulation cycle (with clipping), ``zero_grad()`` only between cycles. Everything else
    (param_groups, state, state_dict) is the wrapped optimizer's, so LR schedulers work."""

    def __init__(self, session: Session, optimizer: torch.optim.Optimizer) -> None:  # noqa: D401
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


def setup(strategy: Strategy | str | dict = "ddp", **kwargs: Any) -> Session:
    """Start a distributed session: ``ds = disttrain.setup(strategy="ddp")``. Reads rank and
    world size from torchrun/SLURM/Kubeflow (or runs as one process), starts the process group,
    and returns the Session. Keyword arguments are Session's, then the strategy's options."""
    return Session(strategy, **kwargs)
