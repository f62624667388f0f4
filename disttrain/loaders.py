"""Data loaders rebuilt for a data-parallel rank: each reads its own shard of every epoch, batches
arrive on the rank's device, and the position inside the epoch is saved and restored exactly
(at the same or another number of data-parallel ranks)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, TensorDataset, default_collate

from disttrain.errors import ConfigError


def shard_loader(
    loader: DataLoader,
    index: int,
    count: int,
    *,
    shuffle: bool | None = None,
    seed: int = 0,
    place: Callable[[Any], Any] | None = None,
    per_rank: bool = False,
) -> "ShardedLoader":
    """``loader`` rebuilt to read shard ``index`` of ``count``. The loader's ``batch_size`` is the
    global batch (each rank gets ``batch_size / count``) unless ``per_rank``, where it is each
    rank's (the global batch is ``batch_size * count``)."""
    batch = loader.batch_size
    if batch is None:
        raise ValueError("prepare() needs a DataLoader with batch_size set (a batch_sampler cannot be split)")
    if not per_rank and batch % count:
        raise ConfigError(
            f"batch size {batch} is not divisible by the {count} data-parallel ranks: use a multiple "
            f"of {count} (each rank gets batch_size / {count}), or setup(..., batch_size_per_rank=True) to keep "
            f"{batch} per rank"
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
        batch_size=batch if per_rank else batch // count,
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
    return ShardedLoader(new, sampler, seed=seed, place=place, dataset=loader.dataset)


class ShardedLoader:
    """A DataLoader over this rank's shard that calls ``sampler.set_epoch`` on every new epoch,
    so each epoch is shuffled differently and identically on every rank.

    Position: ``epoch`` is the epoch the next iteration runs and ``skip`` how many of its batches
    it skips. Every ``iter()`` starts a new epoch. ``state_dict()`` is the position as the loop
    sees it (inside a running epoch: that epoch and the batches yielded so far), in samples of
    the global batch, so it maps onto any number of data-parallel ranks."""

    def __init__(
        self,
        loader: DataLoader,
        sampler: "_ResumableSampler",
        seed: int = 0,
        place: Callable[[Any], Any] | None = None,
        dataset: Any = None,
    ) -> None:
        self.loader, self.sampler, self.place = loader, sampler, place
        self._dataset: Any = loader.dataset if dataset is None else dataset
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # batches of this rank to skip at the start of the next epoch (exact resume)
        self._running: tuple[int, int] | None = None  # (epoch, batches yielded) of an unfinished iteration

    def __iter__(self) -> Iterator[Any]:
        """One epoch. ``skip`` batches are skipped in the sampler (their samples are never
        loaded); the loader's generator is reseeded per epoch, so worker seeds are the same
        whether the epoch was started fresh or resumed. The position moves to this epoch when
        ``iter()`` is called (not at the first batch), so a loop that takes no batch of a
        resumed, already finished epoch still moves on."""
        epoch, skip = self.epoch, self.skip
        self.sampler.set_epoch(epoch)
        self.sampler.start = skip * (self.loader.batch_size or 1)
        if self.loader.generator is not None:
            self.loader.generator.manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        self.skip = 0
        self.epoch = epoch + 1
        self._running = (epoch, skip)
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[Any]:
        for batch in self.loader:
            if self._running is not None and self._running[0] == epoch:
                self._running = (epoch, self._running[1] + 1)
            yield batch if self.place is None else self.place(batch)
        if self._running is not None and self._running[0] == epoch:
            self.end_epoch()

    def end_epoch(self) -> None:
        """The running epoch is complete (called when it is exhausted; a loop that leaves an
        epoch early on purpose, e.g. to drop a partial accumulation group, calls it too)."""
        self._running = None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    @property
    def dataset(self) -> Any:
        """The user's dataset (not the batch-indexing view the loader may read it through)."""
        return self._dataset

    @property
    def global_batch_size(self) -> int:
        return (self.loader.batch_size or 1) * self.sampler.num_replicas

    # ------------------------------------------------------------------ position
    def position(self) -> tuple[int, int]:
        """``(epoch, batches of it done)`` as the loop sees it now."""
        return self._running if self._running is not None else (self.epoch, self.skip)

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.position()
        return {
            "epoch": epoch,
            "samples_in_epoch": batches * self.global_batch_size,
            "global_batch_size": self.global_batch_size,
            "dataset_size": len(self._dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved position: the next ``iter()`` runs the saved epoch from the
        first sample not yet done. Refuses (ConfigError) a position that is not a whole number of
        this loader's global batches, or a dataset of another size."""
        samples, gbs = int(state["samples_in_epoch"]), self.global_batch_size
        if int(state["dataset_size"]) != len(self._dataset):
            raise ConfigError(
                f"the checkpoint's loader read a dataset of {state['dataset_size']} samples, this one has "
                f"{len(self._dataset)}: resume with the same data, or start fresh"
            )
        if samples % gbs:
            raise ConfigError(
                f"the checkpoint stopped {samples} samples into epoch {state['epoch']}, which is not a whole number "
                f"of batches of this run's global batch {gbs}: resume with the global batch it was saved with "
                f"({state['global_batch_size']})"
            )
        self.epoch, self.skip, self._running = int(state["epoch"]), samples // gbs, None


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
