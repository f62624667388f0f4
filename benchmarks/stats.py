"""The arithmetic of the benchmarks, kept pure (no processes, no clocks) so tests check it
against hand-computed numbers.

Conventions: times in seconds inside, milliseconds in reports; sizes in bytes; bandwidths in
bytes/s inside, GB/s (1e9) in reports.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Step-time categories, in the order they are stacked in plots and tables.
CATEGORIES = ("data", "compute", "communication", "optimizer", "idle", "other")

# Strategy-specific phase names -> category (substring match, first hit wins). The built-in
# trainer phases are data / forward / backward / optimizer; strategies add their own by name.
_PHASE_RULES = (
    ("data", "data"),
    ("wait", "idle"), ("idle", "idle"), ("bubble", "idle"), ("barrier", "idle"), ("stall", "idle"),
    ("comm", "communication"), ("allreduce", "communication"), ("all_reduce", "communication"),
    ("push", "communication"), ("pull", "communication"), ("send", "communication"),
    ("recv", "communication"), ("sync", "communication"), ("broadcast", "communication"),
    ("gather", "communication"), ("scatter", "communication"), ("p2p", "communication"),
    ("optim", "optimizer"), ("update", "optimizer"), ("step", "optimizer"),
    ("forward", "compute"), ("backward", "compute"), ("compute", "compute"), ("straggle", "compute"),
)


def phase_category(name: str) -> str:
    low = name.lower()
    for key, cat in _PHASE_RULES:
        if key in low:
            return cat
    return "other"


# ---------------------------------------------------------------------- spread
def quantiles(values: Sequence[float]) -> dict[str, float]:
    """median, p10, p90, IQR and mean of ``values`` (linear interpolation, numpy's default)."""
    if len(values) == 0:
        return {"median": math.nan, "p10": math.nan, "p90": math.nan, "iqr": math.nan, "mean": math.nan, "n": 0}
    a = np.asarray(values, dtype=float)
    p10, p25, p50, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {"median": float(p50), "p10": float(p10), "p90": float(p90), "iqr": float(p75 - p25),
            "mean": float(a.mean()), "n": int(a.size)}


# ---------------------------------------------------------------------- scaling
def scaling_efficiency(throughput_n: float, n: int, throughput_1: float) -> float:
    """E_N = throughput_N / (N x throughput_1): 1.0 is perfect linear scaling."""
    if not throughput_1 or n < 1:
        return math.nan
    return throughput_n / (n * throughput_1)


def speedup(throughput_n: float, throughput_1: float) -> float:
    return throughput_n / throughput_1 if throughput_1 else math.nan


# ---------------------------------------------------------------------- collectives
def algbw(size_bytes: float, seconds: float) -> float:
    """Algorithm bandwidth (nccl-tests): bytes of the buffer / time."""
    return size_bytes / seconds if seconds > 0 else math.nan


def busbw(size_bytes: float, seconds: float, n: int) -> float:
    """Bus bandwidth of an allreduce (nccl-tests): algbw x 2(N-1)/N, the per-link rate a ring
    would need; comparable across N and against the hardware's bandwidth."""
    if n < 2:
        return math.nan
    return algbw(size_bytes, seconds) * 2 * (n - 1) / n


def ring_time(size_bytes: float, n: int, alpha_s: float, bandwidth: float) -> float:
    """The ring allreduce model T = 2(N-1) a + 2(N-1)/N x S / B."""
    return 2 * (n - 1) * alpha_s + 2 * (n - 1) / n * size_bytes / bandwidth


def fit_ring(sizes: Sequence[float], times: Sequence[float], n: int) -> dict[str, float]:
    """Fit ``a`` (per-step latency, s) and ``B`` (link bandwidth, bytes/s) of the ring model to
    measured allreduce times at one world size ``n``. Least squares on the *relative* error
    (each row weighted by 1/T), so small messages (latency) count as much as large ones
    (bandwidth). Returns alpha_s, bandwidth, and the median |relative error| of the fit."""
    s = np.asarray(sizes, dtype=float)
    t = np.asarray(times, dtype=float)
    if n < 2 or s.size < 2:
        return {"alpha_s": math.nan, "bandwidth": math.nan, "rel_err_median": math.nan}
    x = np.stack([np.full_like(s, 2 * (n - 1)), 2 * (n - 1) / n * s], axis=1)
    w = 1.0 / t
    coef, *_ = np.linalg.lstsq(x * w[:, None], t * w, rcond=None)
    alpha, inv_b = float(coef[0]), float(coef[1])
    bandwidth = 1.0 / inv_b if inv_b > 0 else math.inf
    pred = x @ coef
    return {"alpha_s": alpha, "bandwidth": bandwidth, "rel_err_median": float(np.median(np.abs(pred - t) / t))}


# ---------------------------------------------------------------------- one launch's records
def step_walls(steps: Sequence[Mapping[str, Any]], warmup: int) -> list[float]:
    """Wall time of each measured step: the time between the ends of consecutive steps, so it
    includes everything the loop does between steps (data wait, logging, ``loss.item()``).
    The first ``warmup`` steps are dropped (the first one has no predecessor, so at least 1)."""
    warmup = max(int(warmup), 1)
    ends = [float(s["t_end"]) for s in steps]
    return [ends[i] - ends[i - 1] for i in range(warmup, len(ends))]


def _ddp_split(rank_steps: Mapping[int, Sequence[Mapping[str, Any]]], rank: int, i: int) -> tuple[float, float]:
    """(exposed communication, idle) seconds of step ``i`` on ``rank`` from the DDP comm probe.

    The last gradient bucket is launched when this rank's backward compute ends; backward then
    waits for the allreduces. That wait is exposed communication, of which the part until the
    *slowest* rank launched its last bucket is waiting on others (idle): no allreduce can finish
    before every rank has joined it. Clocks: ``time.perf_counter`` (CLOCK_MONOTONIC), shared by
    every process on one host."""
    step = rank_steps[rank][i]
    launches = step.get("bucket_launch") or []
    bwd_end = step.get("bwd_end")
    if not launches or bwd_end is None:
        return 0.0, 0.0
    own = max(launches)
    exposed = min(max(bwd_end - own, 0.0), float(step["phases"].get("backward", 0.0)))
    slowest = own
    for r, steps in rank_steps.items():
        if i < len(steps) and steps[i].get("bucket_launch"):
            slowest = max(slowest, max(steps[i]["bucket_launch"]))
    idle = min(max(slowest - own, 0.0), exposed)
    return exposed, idle


def breakdown(rank_steps: Mapping[int, Sequence[Mapping[str, Any]]], warmup: int) -> dict[str, float]:
    """Mean seconds per measured step in each of CATEGORIES, averaged over ranks. ``other`` is
    the step's wall time not covered by a named phase (loop overhead, logging)."""
    warmup = max(int(warmup), 1)
    per_rank = []
    for rank, steps in rank_steps.items():
        if len(steps) <= warmup:
            continue
        walls = step_walls(steps, warmup)
        sums = dict.fromkeys(CATEGORIES, 0.0)
        for i in range(warmup, len(steps)):
            phases = steps[i]["phases"]
            for name, sec in phases.items():
                sums[phase_category(name)] += float(sec)
            exposed, idle = _ddp_split(rank_steps, rank, i)
            sums["compute"] -= exposed
            sums["communication"] += exposed - idle
            sums["idle"] += idle
        m = len(walls)
        mean = {k: v / m for k, v in sums.items()}
        # the wall time no named category covers (includes phases with unknown names)
        mean["other"] = max(float(np.mean(walls)) - sum(v for k, v in mean.items() if k != "other"), 0.0)
        per_rank.append(mean)
    if not per_rank:
        return dict.fromkeys(CATEGORIES, math.nan)
    return {k: float(np.mean([r[k] for r in per_rank])) for k in CATEGORIES}


def throughput(ranks: Iterable[Mapping[str, Any]], global_batch: int, warmup: int) -> tuple[float, dict[str, float]]:
    """Samples/s of one launch and the spread of its step times (seconds).

    Each data shard ``(index, count)`` processes ``global_batch / count`` samples per step; a
    shard's step time is the median measured step of the slowest rank holding it (pipeline
    stages share a shard: they process the same samples). Shards add up (asynchronous workers
    progress independently; synchronous ones have equal step times anyway). Ranks that ran no
    steps (servers) count for nothing."""
    by_shard: dict[int, tuple[int, float]] = {}
    pooled: list[float] = []
    for r in ranks:
        walls = step_walls(r["steps"], warmup)
        if not walls:
            continue
        pooled += walls
        index, count = r.get("shard", (r["rank"], r["world_size"]))
        med = float(np.median(walls))
        prev = by_shard.get(int(index))
        if prev is None or med > prev[1]:
            by_shard[int(index)] = (int(count), med)
    rate = sum(global_batch / count / med for count, med in by_shard.values() if med > 0)
    return rate, quantiles(pooled)


def knee(batch_sizes: Sequence[int], samples_per_sec: Sequence[float], min_gain: float = 0.10) -> int | None:
    """The first batch size after which doubling-or-more the batch gains less than ``min_gain``
    (relative) in samples/s: where a bigger batch stops paying. None if it never stops."""
    pairs = sorted(zip(batch_sizes, samples_per_sec))
    for (b0, r0), (_, r1) in zip(pairs, pairs[1:]):
        if r0 > 0 and (r1 - r0) / r0 < min_gain:
            return int(b0)
    return None
