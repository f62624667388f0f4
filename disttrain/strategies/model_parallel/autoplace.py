"""``placement: auto`` over pipeline ranks: global rank 0 measures the model once on the first
micro-batch (``cost.profile``), every rank receives the measurements and computes the same split
(``cost.partition``), and rank 0 prints it in config syntax with the predicted per-rank time and
memory, to pin in the config (a pinned placement skips the measurement)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from disttrain.strategies.model_parallel import cost
from disttrain.strategies.model_parallel import placement as pl
from disttrain.strategies.model_parallel.schedules import ScheduleSpec

log = logging.getLogger("disttrain")


@dataclass
class Proposal:
    names: list[list[str]]  # module names per stage
    costs: list[cost.UnitCost]
    cuts: list[int]
    prediction: cost.Prediction

    def specs(self) -> list[pl.StageSpec]:
        return [pl.StageSpec(s, tuple(pl.compress(n))) for s, n in enumerate(self.names)]


def propose(model: nn.Module, on_meta: bool, skeleton: nn.Module, units: list[str], example: tuple[Any, ...],
            loss: Callable[[Any], torch.Tensor], optimizer: torch.optim.Optimizer | None, spec: ScheduleSpec,
            k: int, v: int, m: int, cap_gb: float | None, device: torch.device) -> Proposal:
    """Collective over every rank: the measured split for ``k`` ranks x ``v`` stages, ``m`` micro-batches."""
    costs: list[Any] = [None]
    if dist.get_rank() == 0:
        ratio = cost.optimizer_state_ratio(optimizer) if optimizer is not None else 0.0
        subject = _stand_in(skeleton, device) if on_meta else model
        with _untouched(subject):
            costs[0] = cost.profile(subject, units, example, loss, ratio)
    dist.broadcast_object_list(costs, src=0)
    orders = spec.rank_orders(k, v, m)
    stage_ranks = spec.stage_ranks(k, v)
    cuts = cost.partition(costs[0], stage_ranks, orders, cap_gb * 2**30 if cap_gb else None)
    names = [[u.name for u in costs[0][cuts[s]:cuts[s + 1]]] for s in range(len(cuts) - 1)]
    proposal = Proposal(names, costs[0], cuts, cost.predict(costs[0], cuts, stage_ranks, orders))
    if dist.get_rank() == 0:
        log.info("model_parallel: placement: auto proposes (pin it in your config):\n%s\n%s",
                 pl.to_yaml(proposal.specs()), describe(proposal, spec.name, m))
    return proposal


def describe(p: Proposal, schedule: str, m: int) -> str:
    """The prediction, per pipeline rank, in words."""
    from disttrain.strategies.model_parallel.stats import mib

    pr = p.prediction
    lines = [f"predicted with {schedule}, M={m}: step {1e3 * pr.step_s:.1f} ms"]
    for r, (busy, mem, act) in enumerate(zip(pr.busy_s, pr.memory_bytes, pr.act_peak_bytes)):
        lines.append(f"  rank {r}: busy {1e3 * busy:.1f} ms, memory {mib(mem)} (activations peak {mib(act)})")
    return "\n".join(lines)


def _stand_in(skeleton: nn.Module, device: torch.device) -> nn.Module:
    """A real-valued copy of a meta model to time (the values do not matter, only the work)."""
    model = copy.deepcopy(skeleton).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for b in model.buffers():
            if b.is_floating_point():
                b.zero_()
    return model


class _untouched:
    """Measure without changing the model: buffers (running statistics), gradients and the RNG
    are as before afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self.rng = torch.random.fork_rng(devices=[])
        self.rng.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.rng.__exit__(*exc)
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(self.buffers[n])
        self.model.zero_grad(set_to_none=True)
