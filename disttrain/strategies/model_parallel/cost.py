"""The cost model behind ``placement: auto``: measure each placeable module once, predict a
placement's step time and per-rank memory under the chosen schedule, and pick the split.

* :func:`profile` runs the whole model on one micro-batch a few times with hooks on every unit
  (``placement.units``: ``tok_emb``, ``blocks.0``, ...): forward time per unit, in call order;
  the measured backward time of the whole model shared out in proportion to forward time; bytes
  of parameters, gradients and optimizer state; bytes each unit saves for backward (activations)
  per micro-batch, counted by ``saved_tensors_hooks`` (parameters excluded).
* :func:`simulate` plays every rank's operations in the order torch's schedule issues them
  (``ScheduleSpec.rank_orders``): a forward waits for the previous stage's, a backward for the
  next stage's; from it come the step time, each rank's busy time, and each rank's activation peak
  (a micro-batch's activations live from its forward to its last backward on that stage).
* :func:`partition` splits the units into the schedule's stages, contiguous in call order,
  minimising the slowest stage (which sets the step time of every schedule here) subject to the
  memory cap, by an exact linear-partition search.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from disttrain.errors import ConfigError


@dataclass(frozen=True)
class UnitCost:
    """One placeable module's measured cost per micro-batch."""

    name: str
    fwd_s: float
    bwd_s: float
    param_bytes: int
    grad_bytes: int
    optim_bytes: int
    act_bytes: int

    @property
    def static_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optim_bytes


@dataclass(frozen=True)
class Prediction:
    """What a placement costs under a schedule (per rank: index = pipeline rank)."""

    step_s: float
    busy_s: list[float]
    memory_bytes: list[float]
    static_bytes: list[float]
    act_peak_bytes: list[float]
    stage_s: list[float]  # forward + backward per micro-batch, per stage


# ---------------------------------------------------------------------- measure
def profile(model: nn.Module, units: Sequence[str], args: tuple, loss: Callable[[Any], torch.Tensor],
            optim_ratio: float, repeats: int = 3) -> list[UnitCost]:
    """Costs of ``units`` of ``model`` on the micro-batch ``args`` (``loss(output)`` -> scalar),
    in the order forward first calls them; ``optim_ratio``: optimizer-state bytes per parameter byte.
    A model on the meta device gives every byte figure (times are then meaningless)."""
    mods = {n: model.get_submodule(n) for n in units}
    order: list[str] = []
    fwd: dict[str, list[float]] = {n: [] for n in units}
    act: dict[str, int] = dict.fromkeys(units, 0)
    current: list[str | None] = [None]
    # storages by identity, not address: on the meta device (python -m disttrain.estimate) every address is 0
    params = {t.untyped_storage()._cdata for t in model.parameters()}
    sync = _sync_fn(next(model.parameters()).device)
    t_enter: dict[str, float] = {}

    def pre(name: str) -> Callable:
        def hook(*_: Any) -> None:
            if name not in order:
                order.append(name)
            sync()
            current[0], t_enter[name] = name, time.perf_counter()
        return hook

    def post(name: str) -> Callable:
        def hook(*_: Any) -> None:
            sync()
            fwd[name].append(time.perf_counter() - t_enter[name])
            current[0] = None
        return hook

    def pack(t: torch.Tensor) -> torch.Tensor:
        name = current[0]
        if name is not None and counting[0] and t.untyped_storage()._cdata not in params:
            act[name] += t.numel() * t.element_size()
        return t

    handles = [h for n, m in mods.items() for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
    counting = [True]
    bwd: list[float] = []
    try:
        for i in range(repeats + 1):  # the first run warms up and counts the activations
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(*args)
            counting[0] = False
            value = loss(out)
            sync()
            t0 = time.perf_counter()
            value.backward()
            sync()
            if i:
                bwd.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    f_med = {n: statistics.median(fwd[n][1:] or fwd[n] or [0.0]) for n in units}
    total_f = sum(f_med.values()) or 1.0
    b_total = statistics.median(bwd) if bwd else 2 * total_f
    out_costs = []
    for n in order + [u for u in units if u not in order]:
        pb = sum(p.numel() * p.element_size() for p in mods[n].parameters())
        gb = sum(p.numel() * p.element_size() for p in mods[n].parameters() if p.requires_grad)
        out_costs.append(UnitCost(n, f_med[n], b_total * f_med[n] / total_f, pb, gb, int(gb * optim_ratio), act[n]))
    return out_costs


def optimizer_state_ratio(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state per byte of parameter for the user's optimizer class and its
    first group's options, measured on a one-element stand-in (SGD with momentum: 1, Adam: 2)."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    accepted = inspect.signature(type(optimizer).__init__).parameters
    options = {k: v for k, v in group.items() if k in accepted and k != "params"}
    probe = nn.Parameter(torch.zeros(64))
    try:
        opt = type(optimizer)([probe], **options)
        probe.grad = torch.ones_like(probe)
        opt.step()
    except Exception:  # an optimizer the probe cannot build: assume Adam-like state
        return 2.0
    state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                if torch.is_tensor(v) and v.numel() == probe.numel())
    return state / (probe.numel() * probe.element_size())


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# ---------------------------------------------------------------------- predict
def simulate(orders: dict[int, list[tuple[str, int, int]]], fwd: Sequence[float], bwd: Sequence[float],
             act: Sequence[float]) -> tuple[float, list[float], list[float]]:
    """``(step time, busy time per rank, activation peak per rank)`` of every rank running its
    ``orders`` (from ``ScheduleSpec.rank_orders``) with stage ``s`` taking ``fwd[s]`` forward,
    ``bwd[s]`` backward (a split backward: half for inputs, half for weights; stage 0 has no input
    gradient, so all of it in the weight pass) and saving ``act[s]`` bytes per micro-batch."""
    last = len(fwd) - 1
    done: dict[tuple[str, int, int], float] = {}
    clock = dict.fromkeys(orders, 0.0)
    busy = dict.fromkeys(orders, 0.0)
    pos = dict.fromkeys(orders, 0)
    while any(pos[r] < len(orders[r]) for r in orders):
        progressed = False
        for r in orders:
            while pos[r] < len(orders[r]):
                op, s, mb = orders[r][pos[r]]
                deps = _deps(op, s, mb, last)
                if any(d not in done for d in deps):
                    break
                start = max([clock[r]] + [done[d] for d in deps])
                dur = {"F": fwd[s], "B": bwd[s], "I": 0.0 if s == 0 else bwd[s] / 2,
                       "W": bwd[s] if s == 0 else bwd[s] / 2}[op]
                done[(op, s, mb)] = clock[r] = start + dur
                busy[r] += dur
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule simulation deadlocked: the rank orders are inconsistent")
    peaks = [_act_peak(orders[r], act) for r in sorted(orders)]
    return max(clock.values()), [busy[r] for r in sorted(orders)], peaks


def _deps(op: str, s: int, mb: int, last: int) -> list[tuple[str, int, int]]:
    if op == "F":
        return [("F", s - 1, mb)] if s > 0 else []
    if op == "W":
        return [("I", s, mb)]
    deps = [("F", s, mb)]
    if s < last:
        deps.append((op, s + 1, mb))  # the gradient from the next stage: its B, or its I under zero bubble
    return deps


def _act_peak(order: list[tuple[str, int, int]], act: Sequence[float]) -> float:
    live = peak = 0.0
    for op, s, _ in order:
        if op == "F":
            live += act[s]
            peak = max(peak, live)
        elif op in ("B", "W"):
            live -= act[s]
    return peak


def predict(costs: Sequence[UnitCost], cuts: Sequence[int], stage_ranks: Sequence[int],
            orders: dict[int, list[tuple[str, int, int]]]) -> Prediction:
    """The step time and per-rank memory of stages ``costs[cuts[s]:cuts[s+1]]``."""
    stages = [costs[cuts[s]:cuts[s + 1]] for s in range(len(cuts) - 1)]
    fwd = [sum(u.fwd_s for u in st) for st in stages]
    bwd = [sum(u.bwd_s for u in st) for st in stages]
    act = [float(sum(u.act_bytes for u in st)) for st in stages]
    step, busy, peaks = simulate(orders, fwd, bwd, act)
    k = len(orders)
    static = [float(sum(u.static_bytes for s, st in enumerate(stages) if stage_ranks[s] == r for u in st)) for r in range(k)]
    return Prediction(step, busy, [a + b for a, b in zip(static, peaks)], static, peaks, [f + b for f, b in zip(fwd, bwd)])


# ---------------------------------------------------------------------- choose
def partition(costs: Sequence[UnitCost], stage_ranks: Sequence[int], orders: dict[int, list[tuple[str, int, int]]],
              cap_bytes: float | None) -> list[int]:
    """Cut points (``cuts[s]:cuts[s+1]`` are stage ``s``'s units) minimising the slowest stage's
    forward + backward time, each stage within its share of ``cap_bytes`` (its rank's cap split
    over the rank's stages) counting its activations at the schedule's in-flight depth."""
    n_stages = len(stage_ranks)
    if len(costs) < n_stages:
        raise ConfigError(
            f"placement: auto needs at least {n_stages} modules to make {n_stages} stages; the model has "
            f"{len(costs)} ({[u.name for u in costs]}): use fewer stages (strategy.pipeline_size / stages_per_rank)"
        )
    depth = _inflight(orders, n_stages)
    per_rank = {r: stage_ranks.count(r) for r in set(stage_ranks)}
    limit = [cap_bytes / per_rank[stage_ranks[s]] if cap_bytes else float("inf") for s in range(n_stages)]
    times = [u.fwd_s + u.bwd_s for u in costs]

    def mem(s: int, a: int, b: int) -> float:
        return sum(u.static_bytes for u in costs[a:b]) + depth[s] * sum(u.act_bytes for u in costs[a:b])

    cuts = linear_partition(times, n_stages, feasible=lambda s, a, b: mem(s, a, b) <= limit[s])
    if cuts is None:
        smallest = min(max(u.static_bytes + depth[0] * u.act_bytes for u in costs), float("inf"))
        assert cap_bytes is not None  # no split fails only under a cap
        raise ConfigError(
            f"strategy.memory_cap_gb={cap_bytes / 2**30:.3g}: no split of the model into {n_stages} stages fits (its "
            f"largest module alone needs {smallest / 2**30:.3g} GiB with this schedule's activations in flight): raise "
            f"the cap, add pipeline ranks, or use fewer micro-batches in flight (schedule=1f1b)"
        )
    return cuts


def _inflight(orders: dict[int, list[tuple[str, int, int]]], n_stages: int) -> list[int]:
    """Per stage: the most micro-batches whose activations are alive at once under the schedule."""
    out = [0] * n_stages
    for order in orders.values():
        live = [0] * n_stages
        for op, s, _ in order:
            live[s] += 1 if op == "F" else -1 if op in ("B", "W") else 0
            out[s] = max(out[s], live[s])
    return out


def linear_partition(w: Sequence[float], k: int,
                     feasible: Callable[[int, int, int], bool] | None = None) -> list[int] | None:
    """Boundaries of ``k`` non-empty contiguous parts of ``w`` minimising the largest sum, every
    part ``s`` over ``w[a:b]`` allowed by ``feasible(s, a, b)``; ``None`` if none is."""
    n = len(w)
    pre = [0.0]
    for x in w:
        pre.append(pre[-1] + x)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    arg = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for c in range(j - 1, i):
                if best[j - 1][c] == inf or (feasible is not None and not feasible(j - 1, c, i)):
                    continue
                v = max(best[j - 1][c], pre[i] - pre[c])
                if v < best[j][i]:
                    best[j][i], arg[j][i] = v, c
    if best[k][n] == inf:
        return None
    cuts = [n]
    for j in range(k, 0, -1):
        cuts.append(arg[j][cuts[-1]])
    return cuts[::-1]
