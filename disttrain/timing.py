"""Per-step wall-clock breakdown: where a step's time goes (data wait, forward, backward,
optimizer/communication, waiting on others). Strategies add their own phases by name."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch


class StepTimer:
    """Accumulates seconds per named phase for the current step, and totals over the run.

    On CUDA, phases synchronise the device at their edges when ``cuda_sync`` is set, so the
    numbers are device time rather than launch time (the benchmarks set it; training does not).
    """

    def __init__(self, device: torch.device | None = None, cuda_sync: bool = False) -> None:
        self._sync = cuda_sync and device is not None and device.type == "cuda"
        self.step: dict[str, float] = defaultdict(float)
        self.total: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.ended: dict[str, float] = {}  # perf_counter at the end of each phase's last run this step

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.ended[name] = time.perf_counter()
            self.add(name, self.ended[name] - t0)

    def add(self, name: str, seconds: float) -> None:
        self.step[name] += seconds

    def end_step(self) -> dict[str, float]:
        """Close the current step; returns its phases."""
        done = dict(self.step)
        for k, v in done.items():
            self.total[k] += v
        self.steps += 1
        self.step.clear()
        self.ended.clear()
        return done

    def mean(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.total.items()}
