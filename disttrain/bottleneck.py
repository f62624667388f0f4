"""Is data loading the bottleneck? The share of each step's wall time a rank spends waiting on
its loader (the StepTimer's ``data`` phase), checked over a window of steps after a warm-up; when
it exceeds ``trainer.data_wait_warn_fraction`` the rank says so once, with the measured share and
the fixes to try (``python -m benchmarks.loader <same overrides>`` measures each on the dataset)."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("disttrain")

FIXES = (
    "data.num_workers=2 (or more: loader worker processes prepare batches while the model trains)",
    "pin_memory and a larger prefetch_factor (host-to-GPU copies overlap the step; CUDA only)",
    "a TensorDataset or a dataset with __getitems__ (one gather per batch instead of one __getitem__ per sample)",
    "move per-sample decoding/augmentation out of __getitem__ (precompute it once)",
)


class DataWaitCheck:
    """Feed it each step's phases (``observe``); it warns once when the data wait's share of the
    wall time between steps exceeds ``fraction`` over ``window`` steps after ``warmup`` steps."""

    def __init__(self, fraction: float | None, warmup: int = 2, window: int = 5, rank: int = 0) -> None:
        self.fraction, self.warmup, self.window, self.rank = fraction, warmup, window, rank
        self._last: float | None = None
        self._seen = 0
        self._data = self._wall = 0.0  # over the current window
        self._total_data = self._total_wall = 0.0  # over every measured step
        self.warned_share: float | None = None

    def observe(self, phases: dict[str, float], now: float | None = None) -> str | None:
        """Record one finished step; returns the warning when it is given (once per run)."""
        now = time.perf_counter() if now is None else now
        last, self._last = self._last, now
        self._seen += 1
        if last is None or self._seen <= self.warmup or self.fraction is None:
            return None
        data, wall = float(phases.get("data", 0.0)), now - last
        self._data, self._wall = self._data + data, self._wall + wall
        self._total_data, self._total_wall = self._total_data + data, self._total_wall + wall
        if (self._seen - self.warmup) % self.window:
            return None
        share = self._data / max(self._wall, 1e-12)
        self._data = self._wall = 0.0
        if share <= self.fraction or self.warned_share is not None:
            return None
        self.warned_share = share
        msg = (f"data loading is the bottleneck on rank {self.rank}: waiting for batches took {share:.0%} of the step "
               f"time over the last {self.window} steps (trainer.data_wait_warn_fraction={self.fraction}). Try: "
               + "; ".join(FIXES) + ". `python -m benchmarks.loader <the same overrides>` measures each on this dataset")
        log.warning(msg)
        return msg

    @property
    def share(self) -> float | None:
        """The data wait's share of the wall time over every measured step (None before any)."""
        return self._total_data / self._total_wall if self._total_wall > 0 else None

    def summary(self) -> dict[str, Any]:
        """For the run summary: the measured share and whether the warning was given."""
        if self.share is None:
            return {}
        return {"data_wait_share": round(self.share, 4), "data_bottleneck": self.warned_share is not None}
