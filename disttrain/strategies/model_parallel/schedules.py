"""How micro-batches flow: disttrain's schedule names mapped onto torch.distributed.pipelining's
schedule classes, with what disttrain needs to know about each before anything runs (how many
stages a rank holds, which rank holds which stage, the constraints on M, the bubble formula,
and every rank's order of operations for the cost model).

=========================  =====================================  ==========  =================
``strategy.schedule``      torch class                            stages/rank  stage -> rank
=========================  =====================================  ==========  =================
``gpipe``                  ``ScheduleGPipe``                      1           stage k on rank k
``1f1b``                   ``Schedule1F1B``                       1           stage k on rank k
``interleaved_1f1b``       ``ScheduleInterleaved1F1B``            V >= 2      loop: s on s % K
``interleaved_zero_bubble````ScheduleInterleavedZeroBubble``      V >= 2      loop: s on s % K
``zbv``                    ``ScheduleZBVZeroBubble``              2           V: 0..K-1, then back
=========================  =====================================  ==========  =================
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

from disttrain.errors import ConfigError


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule: its torch class and the facts disttrain checks and predicts with."""

    name: str
    torch_class: str
    min_v: int
    max_v: int | None
    style: str  # "loop" or "v": torch's stage-to-rank mapping
    split_backward: bool  # zero bubble: backward for inputs (I) and for weights (W) apart
    needs_m_ge_k: bool = False

    @property
    def default_v(self) -> int:
        return self.min_v

    @property
    def multi(self) -> bool:
        """Several stages per rank: torch's PipelineScheduleMulti family."""
        return self.max_v is None or self.max_v > 1

    def check(self, k: int, v: int, m: int) -> None:
        """ConfigError unless ``k`` ranks x ``v`` stages each can run ``m`` micro-batches."""
        if v < self.min_v or (self.max_v is not None and v > self.max_v):
            allowed = f"exactly {self.min_v}" if self.max_v == self.min_v else f"at least {self.min_v}"
            raise ConfigError(
                f"strategy.stages_per_rank={v}: schedule={self.name} runs {allowed} stage(s) per rank; set "
                f"strategy.stages_per_rank={self.min_v}" + ("" if self.multi else " (or schedule=interleaved_1f1b for several)")
            )
        if self.needs_m_ge_k and m < k * v:
            raise ConfigError(
                f"strategy.microbatches={m} is fewer than the {k * v} pipeline stages, which schedule={self.name} "
                f"needs: set strategy.microbatches>={k * v} (or schedule=gpipe)"
            )
        if self.multi:
            rounds = max(1, m // k)
            if m % rounds:
                good = sorted({k * r for r in range(1, 5)} | {x for x in range(1, k + 1)})
                raise ConfigError(
                    f"strategy.microbatches={m}: schedule={self.name} over {k} pipeline ranks runs micro-batches in "
                    f"rounds of {k}, so M must be at most {k} or a multiple of its rounds ({rounds}); e.g. {good[:6]}"
                )

    def stage_ranks(self, k: int, v: int) -> list[int]:
        """``out[s]``: the pipeline rank that holds stage ``s`` (torch's own mapping)."""
        from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

        mapping = generate_stage_to_rank_mapping(k, k * v, style=self.style)
        return [mapping[s] for s in range(k * v)]

    def bubble(self, k: int, v: int, m: int) -> float:
        """The idle share of the step the schedule's formula predicts for equal stages: GPipe and
        1F1B (K-1)/(M+K-1); interleaved 1F1B (K-1)/(V*M+K-1) (Narayanan et al. 2021);
        zero bubble (K-1)/(3*V*M+K-1), ZB-H1's third of 1F1B's bubble when forward, input-backward
        and weight-backward take equal time (Qi et al. 2024)."""
        units = 3 * v if self.split_backward else v
        return (k - 1) / (units * m + k - 1)

    def build(self, stages: list[Any], m: int, loss_fn: Callable | None) -> Any:
        """The torch schedule over this rank's ``stages``. Losses are weighted by the caller
        (``scale_grads=False``), so the gradients equal the whole batch's mean loss."""
        import torch.distributed.pipelining as pipelining

        cls = getattr(pipelining, self.torch_class)
        return cls(stages if self.multi else stages[0], m, loss_fn=loss_fn, scale_grads=False)

    def build_forward_only(self, stages: list[Any], m: int) -> Any:
        """The same schedule without a loss: forwards only (evaluation). torch's schedules for
        several stages per rank still walk their backward actions then, and hand gradients between
        two stages of one rank (a V-shaped mapping) even without a backward; those actions are
        replaced by no-ops."""
        sched = self.build(stages, m, None)
        if self.multi:
            from torch.distributed.pipelining.schedules import BACKWARD_INPUT, BACKWARD_WEIGHT, FULL_BACKWARD

            for kind in (FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT):
                sched.register_custom_function(kind, lambda action, ctx: None)
        return sched

    def rank_orders(self, k: int, v: int, m: int) -> dict[int, list[tuple[str, int, int]]]:
        """Every rank's compute operations in the order torch's schedule issues them:
        ``(op, stage, microbatch)`` with op ``F``, ``B`` (whole backward), ``I`` (input
        gradients) or ``W`` (weight gradients). Several stages per rank: read from the schedule
        class itself, built on stand-in stages (it only reads their indices). One stage per rank:
        the loops of ``ScheduleGPipe`` / ``Schedule1F1B._step_microbatches`` (1F1B: ``min(M, K-s)``
        forwards first, then one backward / one forward)."""
        if not self.multi:
            return {s: _single_order(self.name, k, s, m) for s in range(k)}
        stage_ranks = self.stage_ranks(k, v)
        out = {}
        for r in range(k):
            fakes = [
                SimpleNamespace(num_stages=k * v, group_size=k, group_rank=r, stage_index=s, is_first=s == 0,
                                is_last=s == k * v - 1, submod=None, stage_index_to_group_rank=None)
                for s in range(k * v) if stage_ranks[s] == r
            ]
            sched = self.build(fakes, m, None)
            out[r] = [op for a in sched.pipeline_order[r] if a is not None and (op := _op(a)) is not None]
        return out


def _single_order(name: str, k: int, s: int, m: int) -> list[tuple[str, int, int]]:
    if name == "gpipe":
        return [("F", s, i) for i in range(m)] + [("B", s, i) for i in range(m)]
    warm = min(m, k - s)
    order = [("F", s, i) for i in range(warm)]
    f = warm
    for b in range(m):
        order.append(("B", s, b))
        if f < m:
            order.append(("F", s, f))
            f += 1
    return order


def _op(action: Any) -> tuple[str, int, int] | None:
    code = getattr(action.computation_type, "value", str(action.computation_type))
    if code not in ("F", "B", "I", "W"):  # communication, REDUCE_GRAD, ...
        return None
    return code, int(action.stage_index), int(action.microbatch_index)


SCHEDULES: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        ScheduleSpec("gpipe", "ScheduleGPipe", 1, 1, "loop", False),
        ScheduleSpec("1f1b", "Schedule1F1B", 1, 1, "loop", False, needs_m_ge_k=True),
        ScheduleSpec("interleaved_1f1b", "ScheduleInterleaved1F1B", 2, None, "loop", False),
        ScheduleSpec("interleaved_zero_bubble", "ScheduleInterleavedZeroBubble", 2, None, "loop", True),
        ScheduleSpec("zbv", "ScheduleZBVZeroBubble", 2, 2, "v", True),
    )
}


def get(name: str) -> ScheduleSpec:
    """The spec for ``strategy.schedule=name``, or ConfigError listing the names."""
    if name not in SCHEDULES:
        raise ConfigError(f"strategy.schedule={name!r}: expected one of {list(SCHEDULES)}")
    return SCHEDULES[name]
