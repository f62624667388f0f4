"""The per-stage report of a pipeline, once, after the first steps: per pipeline rank the measured
bytes of parameters, gradients, optimizer state and the activation peak, and the measured compute
time, beside what the cost model predicted for them (``placement: auto``). Logged on rank 0,
written to TensorBoard (text and ``memory/rank{r}_*`` scalars) and kept for the run's summary."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from disttrain.strategies.model_parallel.stats import Meter, memory_table

if TYPE_CHECKING:
    from disttrain.strategies.model_parallel.pipeline import Pipeline

log = logging.getLogger("disttrain")

REPORT_STEP = 2  # the first step also traces and sizes the messages; the second is a plain step


class Reporter:
    """Measures at step ``REPORT_STEP`` and reports (see the module docstring)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.steps = 0
        self.logger: Any = None
        self.rows: list[dict[str, float]] | None = None  # per pipeline rank (data-parallel replica 0)
        self.predicted: list[dict[str, float]] | None = None
        self.stages: dict[int, tuple[float, float]] = {}  # stage -> (compute s per step, activation bytes per micro-batch)
        self._mine: dict[str, float] = {}
        self._stages: dict[int, tuple[float, float]] = {}

    def before_update(self, module: nn.Module | None, meter: Meter) -> None:
        """Called after backward, before the optimizer: gradients exist now."""
        self.steps += 1
        if not self.enabled or self.steps != REPORT_STEP or module is None:
            return
        params = list(module.parameters())
        self._mine = {
            "params": float(sum(p.numel() * p.element_size() for p in params)),
            "grads": float(sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)),
            "activations_peak": float(meter.peak),
            "busy_s": float(sum(meter.busy.values())),
        }
        self._stages = {s: (t, float(meter.act_per_mb.get(s, 0))) for s, t in meter.stage_busy.items()}

    def after_update(self, pipeline: "Pipeline") -> None:
        """Called after the optimizer step (its state exists now); collective at the report step."""
        if not self.enabled or self.steps != REPORT_STEP or pipeline.module is None or pipeline.optimizer is None:
            return
        mine = {id(p) for p in pipeline.module.parameters()}
        self._mine["optimizer"] = float(sum(v.numel() * v.element_size() for p, st in pipeline.optimizer.state.items()
                                            if id(p) in mine for v in st.values() if torch.is_tensor(v) and v.dim()))
        self._mine["total"] = sum(self._mine[k] for k in ("params", "grads", "optimizer", "activations_peak"))
        rows: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(rows, (pipeline.dp_rank, pipeline.pp_rank, self._mine, self._stages))
        self.rows = [r for _, r in sorted((pp, row) for dp, pp, row, _ in rows if dp == 0)]
        self.stages = {s: v for dp, _, _, st in rows if dp == 0 for s, v in st.items()}
        if pipeline.proposal is not None:
            pr = pipeline.proposal.prediction
            self.predicted = [{"total": pr.memory_bytes[r], "activations_peak": pr.act_peak_bytes[r],
                               "static": pr.static_bytes[r], "busy_s": pr.busy_s[r]} for r in range(pipeline.k)]
        if dist.get_rank() == 0:
            self._log(pipeline)

    def _log(self, pipeline: "Pipeline") -> None:
        assert self.rows is not None
        title = (f"model_parallel memory and time per pipeline rank ({pipeline.spec.name}, M={pipeline.m}, "
                 f"{pipeline.k} ranks x {pipeline.v} stage(s), data-parallel {pipeline.d}), measured at step {REPORT_STEP}:")
        text = memory_table(self.rows, self.predicted, title) + "\n" + self._stage_lines(pipeline)
        log.info(text)
        if self.logger is not None:
            self.logger.text("model_parallel/memory", text.replace("\n", "  \n"))
            self.logger.scalars(0, {f"memory/rank{r}_{k}_bytes": v for r, row in enumerate(self.rows)
                                    for k, v in row.items() if k != "busy_s"})

    def _stage_lines(self, pipeline: "Pipeline") -> str:
        """Per stage: compute per micro-batch and activation bytes per micro-batch, measured
        (and predicted by the cost model for placement: auto)."""
        from disttrain.strategies.model_parallel.stats import mib

        costs = pipeline.proposal.costs if pipeline.proposal is not None else None
        cuts = pipeline.proposal.cuts if pipeline.proposal is not None else None
        lines = []
        for s in sorted(self.stages):
            busy, act = self.stages[s]
            names = ", ".join(pipeline.names[s]) if pipeline.names else ""
            line = (f"  stage {s} [{names}] on rank {pipeline.stage_ranks[s]}: forward+backward "
                    f"{1e3 * busy / pipeline.m:.2f} ms per micro-batch, activations {mib(act)} per micro-batch")
            if costs is not None and cuts is not None:
                units = costs[cuts[s]:cuts[s + 1]]
                line += (f" (predicted {1e3 * sum(u.fwd_s + u.bwd_s for u in units):.2f} ms, "
                         f"{mib(sum(u.act_bytes for u in units))})")
            lines.append(line)
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        if not self.rows:
            return {}
        out: dict[str, Any] = {
            "rank_params_bytes": [int(r["params"]) for r in self.rows],
            "rank_activation_peak_bytes": [int(r["activations_peak"]) for r in self.rows],
            "rank_memory_bytes": [int(r["total"]) for r in self.rows],
        }
        if self.predicted:
            out["rank_memory_predicted_bytes"] = [int(p["total"]) for p in self.predicted]
        return out
