"""Memory before launch for ``strategy=model_parallel`` (``python -m disttrain.estimate``): each
pipeline rank's parameters, gradients, optimizer state and activations under the chosen schedule
and micro-batch count, from the cost model the strategy itself predicts with (``cost.profile``,
``cost.predict``): no second memory model.

* A placement of module names, or ``split_points``: the model is profiled on the meta device
  (its skeleton: bytes only, nothing allocated); the stages are the placement's.
* ``placement: auto``: the split depends on measured times, so the model is profiled as the run
  profiles it: a real-valued stand-in of the model on the CPU, allocated once in this process
  (``autoplace._stand_in``), then split by ``cost.partition`` under the schedule and
  ``memory_cap_gb``. A run measures again on its own device and may choose another split.

Per pipeline rank: parameters, gradients and optimizer state of its stages' modules (optimizer
state = gradient bytes x the user's optimizer's state per parameter byte, measured by
``cost.optimizer_state_ratio``: Adam 2, SGD with momentum 1; per-tensor scalars such as Adam's
``step`` are not counted), the bytes one micro-batch saves for backward in its stages, and the
schedule's in-flight count from the order torch's schedule issues (``cost._inflight``; the peak
from ``cost.predict`` when a rank holds several stages). The D data-parallel replicas of a
pipeline rank (world = K x D, rank = dp x K + pp) hold the same bytes. Not counted: parameters
held by the model's root module itself (the trace places them), work outside the placed modules
(e.g. the loss), and the messages between stages.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from disttrain import forward
from disttrain.errors import ConfigError
from disttrain.footprint import RankEstimate
from disttrain.strategies.model_parallel import autoplace, cost
from disttrain.strategies.model_parallel import placement as pl
from disttrain.strategies.model_parallel.options import Options


def stages(opts: Options, skeleton: nn.Module, inputs: Any, targets: Any, loss_fn: Callable | None,
           optimizer: torch.optim.Optimizer | None) -> tuple[list[cost.UnitCost], list[int]]:
    """``(unit costs in stage order, cuts)``: stage ``s`` is ``costs[cuts[s]:cuts[s + 1]]``, for
    the meta ``skeleton`` on one micro-batch ``inputs``/``targets`` (real tensors) and ``optimizer``
    (the user's, over the skeleton's parameters)."""
    to_meta = lambda x: x.to("meta") if torch.is_tensor(x) else x  # noqa: E731
    example, loss = _example(inputs, targets, loss_fn, to_meta)
    ratio = cost.optimizer_state_ratio(optimizer) if optimizer is not None else 0.0
    k, v, m = opts.pipeline_size, opts.stages_per_rank, opts.microbatches
    if opts.specs is not None:
        names = pl.resolve(skeleton, opts.specs, root_tensors_free=True)
        units = [n for stage in names for n in stage]
        by_name = {u.name: u for u in cost.profile(skeleton, units, example, loss, ratio, repeats=0)}
        cuts = [0]
        for stage in names:
            cuts.append(cuts[-1] + len(stage))
        return [by_name[n] for n in units], cuts
    units = pl.units(skeleton)
    if opts.split_points is not None:
        costs = cost.profile(skeleton, units, example, loss, ratio, repeats=0)  # in call order
        order = [u.name for u in costs]
        cuts = [0]
        for sp in opts.split_points:
            at = next((i for i, n in enumerate(order) if n == sp or n.startswith(sp + ".")), None)
            if at is None or at <= cuts[-1]:
                raise ConfigError(
                    f"strategy.split_points: {sp!r} is not where a placeable module begins, in call order after the "
                    f"previous split point ({order}); the estimate needs split points at these modules (or a placement)"
                )
            cuts.append(at)
        if len(cuts) != k * v:
            raise ConfigError(f"strategy.split_points make {len(cuts)} stages; pipeline_size x stages_per_rank = {k * v}")
        return costs, cuts + [len(costs)]
    subject = autoplace._stand_in(skeleton, torch.device("cpu"))
    example, loss = _example(inputs, targets, loss_fn, lambda x: x)
    costs = cost.profile(subject, units, example, loss, ratio)
    spec = opts.spec
    cuts = cost.partition(costs, spec.stage_ranks(k, v), spec.rank_orders(k, v, m),
                          opts.memory_cap_gb * 2**30 if opts.memory_cap_gb else None)
    return costs, cuts


def rank_estimates(opts: Options, costs: Sequence[cost.UnitCost], cuts: Sequence[int], world: int) -> list[RankEstimate]:
    """One row per pipeline rank (its data-parallel replicas share it)."""
    k, v, m, spec = opts.pipeline_size, opts.stages_per_rank, opts.microbatches, opts.spec
    stage_ranks, orders = spec.stage_ranks(k, v), spec.rank_orders(k, v, m)
    pred = cost.predict(costs, cuts, stage_ranks, orders)
    depth = cost._inflight(orders, k * v)
    per_stage = [costs[cuts[s]:cuts[s + 1]] for s in range(k * v)]
    rows = []
    for r in range(k):
        mine = [s for s in range(k * v) if stage_ranks[s] == r]
        units = [u for s in mine for u in per_stage[s]]
        act = [float(sum(u.act_bytes for u in per_stage[s])) for s in mine]
        one = len(mine) == 1
        rows.append(RankEstimate(
            role=f"stage {mine[0]}" if one else f"stages {','.join(map(str, mine))}",
            ranks=(r, r + (world // k - 1) * k), step=k,
            params=float(sum(u.param_bytes for u in units)), grads=float(sum(u.grad_bytes for u in units)),
            optimizer=float(sum(u.optim_bytes for u in units)), activations=sum(act),
            in_flight=depth[mine[0]] if one else max(depth[s] for s in mine),
            activations_peak=None if one else pred.act_peak_bytes[r],
            note=f"{', '.join(pl.compress([u.name for u in units]))}"
                 + ("" if one else f"; activations' peak {pred.act_peak_bytes[r] / 2**20:.3f} MiB"),
        ))
        assert abs(rows[-1].total - pred.memory_bytes[r]) <= 1e-6 * max(1.0, pred.memory_bytes[r])  # the cost model's own
    return rows


def _example(inputs: Any, targets: Any, loss_fn: Callable | None,
             move: Callable[[Any], Any]) -> tuple[tuple[Any, ...], Callable[[Any], torch.Tensor]]:
    """The micro-batch as the pipeline calls its stages (positional arguments), and the loss the
    run profiles with (``StageBuilder._propose``)."""
    args = tuple(move(a) for a in (inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
    y = move(targets)
    if loss_fn is not None and y is not None:
        return args, lambda out: forward.loss_of(out, y, loss_fn)
    return args, lambda out: forward.prediction_of(out).float().mean()
