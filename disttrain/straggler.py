"""The slow rank, named in every run: each rank's data, compute, communication-wait and optimizer
time per step, gathered with one small ``all_gather_object`` every ``log_every_n_steps``.

Synchronous data parallelism evens out the ranks' step times: a fast rank waits inside its
backward for the slow rank's gradients, so its "backward" is as long as the straggler's. Compute
is therefore timed only up to the moment the rank is ready to communicate: a post-accumulate-grad
hook on every parameter stamps when the last gradient of the backward became ready on this rank
(DDP's allreduces are launched from the same hooks and awaited at the end of the backward). The
rest of the backward phase is communication wait. Phases a strategy measures as waits itself
(the parameter server's ``wait``/``push``/``pull``, a pipeline's ``pipeline_wait``) count as
communication. A strategy whose gradients do not pass through ``.grad`` accumulation (FSDP2's
sharded parameters) has no stamp: its backward counts as compute, waits included.

The slowest rank is the one with the largest data + compute per step; it is named when that
exceeds the median over the ranks by more than ``margin`` (a fraction), with the cause (data or
compute) that exceeds its own median most.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

log = logging.getLogger("disttrain")

CATEGORIES = ("data", "compute", "comm", "optimizer")
_PHASES = {
    "data": "data",
    "forward": "compute", "backward": "compute", "compute": "compute", "straggle": "compute",
    "wait": "comm", "push": "comm", "pull": "comm", "pipeline_wait": "comm", "dp_allreduce": "comm",
    "loss_sync": "comm",
    "optimizer": "optimizer",
}


class ReadyClock:
    """When the last gradient of the current backward became ready on this rank."""

    def __init__(self, model: nn.Module) -> None:
        self.ready_at: float | None = None
        self._handles = [
            p.register_post_accumulate_grad_hook(self._stamp) for p in model.parameters() if p.requires_grad
        ]

    def _stamp(self, _param: torch.Tensor) -> None:
        self.ready_at = time.perf_counter()

    def take(self) -> float | None:
        """The stamp of the step just ended (None if no gradient was accumulated), and reset."""
        ready, self.ready_at = self.ready_at, None
        return ready

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def split_step(phases: Mapping[str, float], backward_end: float | None, ready_at: float | None) -> dict[str, float]:
    """One step's phases (seconds) as data / compute / comm / optimizer: the part of the backward
    after the last gradient was ready (``backward_end - ready_at``) is communication wait.
    Phases of unknown name count as compute."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for name, seconds in phases.items():
        out[_PHASES.get(name, "compute")] += seconds
    if backward_end is not None and ready_at is not None and ready_at <= backward_end:
        wait = min(backward_end - ready_at, phases.get("backward", 0.0))
        out["compute"] -= wait
        out["comm"] += wait
    return out


@dataclass
class Verdict:
    """Who is slowest in one window (or the whole run), by how much, and why."""

    per_rank_ms: list[dict[str, float]]  # median ms per step, per category, one per training rank
    ranks: list[int]  # their global ranks
    rank: int  # the slowest rank's global rank (largest data + compute)
    excess_ms: float  # its data + compute above the median
    excess_frac: float  # the same, as a fraction of the median
    cause: str  # "data" or "compute"
    flagged: bool  # excess_frac > margin

    def message(self) -> str:
        ms = self.per_rank_ms[self.ranks.index(self.rank)]
        return (
            f"rank {self.rank} is the slowest: data {ms['data']:.1f} ms + compute {ms['compute']:.1f} ms per step, "
            f"{self.excess_ms:.1f} ms ({100 * self.excess_frac:.0f}%) over the median of the ranks, mostly {self.cause}; "
            f"the others wait for it in communication"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank if self.flagged else None, "slowest_rank": self.rank, "cause": self.cause,
            "excess_ms": self.excess_ms, "excess_frac": self.excess_frac,
            "per_rank_ms": dict(zip(self.ranks, self.per_rank_ms)),
        }


def judge(per_rank: Sequence[Mapping[str, float]], margin: float, ranks: Sequence[int] | None = None) -> Verdict:
    """The verdict on per-rank times per step, in ms (``ranks``: their global ranks, if not 0..n-1)."""
    ranks = list(ranks) if ranks is not None else list(range(len(per_rank)))
    busy = [r["data"] + r["compute"] for r in per_rank]
    slow = max(range(len(busy)), key=lambda i: busy[i])
    median = statistics.median(busy)
    excess = busy[slow] - median
    frac = excess / median if median > 0 else 0.0
    over = {c: per_rank[slow][c] - statistics.median(r[c] for r in per_rank) for c in ("data", "compute")}
    cause = max(over, key=lambda c: over[c])
    return Verdict([dict(r) for r in per_rank], ranks, ranks[slow], excess, frac, cause, frac > margin)


@dataclass
class RankTimes:
    """This rank's window of per-step times, and the per-rank medians of every gathered window.

    Medians, not means: a rank's first steps (lazy initialisation, DDP rebuilding its buckets
    in the second forward, which waits for every rank) would otherwise dominate a short window."""

    margin: float = 0.2
    ranks: list[int] | None = None  # global ranks of the training ranks, in gather order
    window: list[dict[str, float]] = field(default_factory=list)  # this rank's steps since the last gather
    history: list[list[dict[str, float]]] = field(default_factory=list)  # per window: per-rank medians (ms)
    clock: ReadyClock | None = None

    def attach(self, model: nn.Module) -> None:
        """Stamp gradient readiness on ``model``'s parameters (the user's module, unwrapped)."""
        self.detach()
        self.clock = ReadyClock(model)

    def detach(self) -> None:
        """Remove the stamps from the parameters (the end of a run)."""
        if self.clock is not None:
            self.clock.remove()
            self.clock = None

    def add(self, phases: Mapping[str, float], backward_end: float | None) -> None:
        """One finished step of this rank (the StepTimer's phases and the backward's end)."""
        ready = self.clock.take() if self.clock is not None else None
        self.window.append({k: round(1e3 * v, 3) for k, v in split_step(phases, backward_end, ready).items()})

    def gather(self, all_gather: Callable[[Any], list[Any]]) -> Verdict | None:
        """Exchange this window's medians (one ``all_gather_object`` of four numbers per rank),
        start a new window, and judge it. Collective over the training ranks: call it on all of
        them at the same step."""
        mine = _medians(self.window) if self.window else None
        self.window = []
        medians = all_gather(mine)
        if any(m is None for m in medians):
            return None
        self.history.append(medians)
        return judge(medians, self.margin, self.ranks)

    def run_verdict(self) -> Verdict | None:
        """The verdict over the run: per rank, the median of its windows' medians."""
        if not self.history:
            return None
        ranks = len(self.history[0])
        return judge([_medians([w[r] for w in self.history]) for r in range(ranks)], self.margin, self.ranks)


def _medians(steps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {c: statistics.median(s[c] for s in steps) for c in CATEGORIES}


def scalars(verdict: Verdict) -> dict[str, float]:
    """TensorBoard scalars: one series per rank and category, and the slowest rank."""
    out = {f"ranks/{c}_ms/rank{r}": ms[c] for r, ms in zip(verdict.ranks, verdict.per_rank_ms) for c in CATEGORIES}
    out["straggler/rank"] = float(verdict.rank)
    out["straggler/excess_ms"] = verdict.excess_ms
    return out
