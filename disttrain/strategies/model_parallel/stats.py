"""What a pipeline reports: compute time and activation memory measured inside torch's schedule,
the bubble, and the per-stage memory table.

:class:`Meter` instruments this rank's ``PipelineStage`` objects: their ``forward_one_chunk``,
``backward_one_chunk`` and ``backward_weight_one_chunk`` are timed (the schedule's waits for
point-to-point messages happen outside them), and the bytes each micro-batch's forward saves for
backward are counted while they are alive (``saved_tensors_hooks``, parameters excluded).
:class:`StepStats` shares one small vector per rank per step within the pipeline.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable

import torch
import torch.distributed as dist


class Meter:
    """Per-step busy time of this rank's stages, and their activation memory during the first
    ``count_steps`` steps (what the report needs; the hooks cost a little on every tensor saved)."""

    def __init__(self, device: torch.device, count_steps: int = 2) -> None:
        self.device = device
        self.count_steps, self.steps = count_steps, 0
        self.busy = {"F": 0.0, "B": 0.0, "W": 0.0}
        self.stage_busy: dict[int, float] = {}  # stage -> compute seconds this step
        self.live = 0
        self.peak = 0
        self.act: dict[tuple[int, int], int] = {}  # (stage, micro-batch) -> bytes alive
        self.act_per_mb: dict[int, int] = {}  # stage -> bytes saved by one micro-batch's forward
        self._params: set[int] = set()

    def instrument(self, stage: Any) -> None:
        """Wrap ``stage``'s compute methods (instance attributes: torch's schedule calls them)."""
        self._params |= {p.untyped_storage().data_ptr() for p in stage.submod.parameters()}
        s = stage.stage_index
        stage.forward_one_chunk = self._forward(s, stage.forward_one_chunk)
        stage.backward_one_chunk = self._timed("B", s, stage.backward_one_chunk, release=lambda kw: kw.get("full_backward", True))
        stage.backward_weight_one_chunk = self._timed("W", s, stage.backward_weight_one_chunk, release=lambda kw: True)

    def start_step(self) -> None:
        self.busy = {"F": 0.0, "B": 0.0, "W": 0.0}
        self.stage_busy = {}
        self.steps += 1
        if self.counting:
            self.live, self.peak, self.act = 0, 0, {}

    @property
    def counting(self) -> bool:
        return self.steps <= self.count_steps

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _add(self, kind: str, stage: int, seconds: float) -> None:
        self.busy[kind] += seconds
        self.stage_busy[stage] = self.stage_busy.get(stage, 0.0) + seconds

    def _forward(self, s: int, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(mb: int, *args: Any, **kwargs: Any) -> Any:
            if not self.counting:
                t0 = self._now()
                out = fn(mb, *args, **kwargs)
                self._add("F", s, self._now() - t0)
                return out
            saved = [0]

            def pack(t: torch.Tensor) -> torch.Tensor:
                try:
                    if t.untyped_storage().data_ptr() not in self._params:
                        saved[0] += t.numel() * t.element_size()
                except (RuntimeError, NotImplementedError):
                    pass
                return t

            t0 = self._now()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fn(mb, *args, **kwargs)
            self._add("F", s, self._now() - t0)
            self.act[(s, mb)] = saved[0]
            self.act_per_mb[s] = saved[0]
            self.live += saved[0]
            self.peak = max(self.peak, self.live)
            return out

        return run

    def _timed(self, kind: str, s: int, fn: Callable, release: Callable[[dict], bool]) -> Callable:
        @functools.wraps(fn)
        def run(mb: int, *args: Any, **kwargs: Any) -> Any:
            t0 = self._now()
            out = fn(mb, *args, **kwargs)
            self._add(kind, s, self._now() - t0)
            if release(kwargs):
                self.live -= self.act.pop((s, mb), 0)
            return out

        return run


class StepStats:
    """One small ``all_gather`` per step within the pipeline (the ranks of one ``pp`` row): the
    loss, computed on the last stage, for every rank of the pipeline, and each rank's busy and
    wall time for the bubble metrics (kept locally: reading them needs no collective)."""

    def __init__(self, device: torch.device, group: Any, last_rank: int) -> None:
        self.device, self.group, self.last_rank = device, group, last_rank
        self.window = _new_window()
        self.total = _new_window()

    def start(self, loss: float | None, busy: float, wall: float) -> tuple[Any, list[torch.Tensor]]:
        """Start sharing this step's figures within the pipeline (asynchronously: the optimizer
        step runs meanwhile); ``finish`` waits and returns the pipeline's loss."""
        row = torch.tensor([math.nan if loss is None else loss, busy, wall], dtype=torch.float64, device=self.device)
        rows = [torch.empty_like(row) for _ in range(dist.get_world_size(self.group))]
        return dist.all_gather(rows, row, group=self.group, async_op=True), rows

    def finish(self, pending: tuple[Any, list[torch.Tensor]]) -> float:
        work, rows = pending
        work.wait()
        table = [r.cpu().tolist() for r in rows]
        for w in (self.window, self.total):
            w["steps"] += 1
            w["span"] += max(r[2] for r in table)
            for k, r in enumerate(table):
                w["busy"][k] = w["busy"].get(k, 0.0) + r[1]
        return table[self.last_rank][0]

    def metrics(self) -> dict[str, float]:
        """Bubble and busy time per pipeline rank over the window since the last call."""
        out = _bubble(self.window)
        self.window = _new_window()
        return out

    def run_bubble(self) -> float:
        return _bubble(self.total).get("pipeline/bubble_fraction", float("nan"))


def _new_window() -> dict[str, Any]:
    return {"steps": 0, "span": 0.0, "busy": {}}


def _bubble(w: dict[str, Any]) -> dict[str, float]:
    if not w["steps"] or w["span"] <= 0:
        return {}
    out: dict[str, float] = {}
    fracs = []
    for k in sorted(w["busy"]):
        busy = w["busy"][k]
        frac = max(0.0, 1.0 - busy / w["span"])
        fracs.append(frac)
        out[f"pipeline/rank{k}_busy_ms"] = 1e3 * busy / w["steps"]
        out[f"pipeline/rank{k}_bubble_fraction"] = frac
    out["pipeline/bubble_fraction"] = sum(fracs) / len(fracs)
    out["pipeline/step_ms"] = 1e3 * w["span"] / w["steps"]
    return out


def mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def memory_table(measured: list[dict[str, float]], predicted: list[dict[str, float]] | None, title: str) -> str:
    """Per pipeline rank: measured bytes (and the prediction, with the ratio) of parameters,
    gradients, optimizer state and the activation peak."""
    lines = [title]
    for r, m in enumerate(measured):
        parts = [f"{k} {mib(m[k])}" for k in ("params", "grads", "optimizer", "activations_peak")]
        line = f"  rank {r}: " + ", ".join(parts) + f"; total {mib(m['total'])}"
        if predicted is not None:
            p = predicted[r]
            ratio = m["total"] / p["total"] if p["total"] else float("nan")
            line += (f" | predicted total {mib(p['total'])} (activations {mib(p['activations_peak'])}), measured/"
                     f"predicted {ratio:.2f}; busy {1e3 * m['busy_s']:.1f} ms vs predicted {1e3 * p['busy_s']:.1f} ms")
        lines.append(line)
    return "\n".join(lines)
