"""``python -m benchmarks mode=[memory]``: what sharding saves and costs. Per-rank memory of the
model states (parameters + gradients + optimizer state) and samples/s of ddp, fsdp and DeepSpeed
ZeRO-3, and activation checkpointing's memory/time trade, at N = 2 and 4 on a model of repeated
residual blocks (``disttrain.models.ResidualMLP``, 25 M parameters by default), Adam.

Every point is a real ``torchrun -m disttrain`` launch with the probe (``benchmarks/probe.py``,
``probe_memory``) recording the bytes allocated (glibc ``mallinfo2`` on CPU,
``torch.cuda.memory_allocated`` on GPU) at four moments of one rank's run:

* ``base``: the model is about to be built (data loaded, nothing of the model yet);
* ``step_start``: the second optimizer step begins (parameters and optimizer state exist,
  gradients were zeroed to None);
* ``before_backward``: its forward is done (plus what the forward saved for backward);
* ``after_step``: the optimizer stepped, gradients not yet zeroed.

Model states = ``after_step - base`` (whatever each engine keeps: DDP's gradient buckets,
FSDP's sharded DTensors, ZeRO's flat partitions and fp32 copies); forward-held memory =
``before_backward - step_start`` (saved activations, and parameters a forward leaves gathered).
The largest rank is reported. The variants run one launch each, in an order that reverses from
one world size to the next, so slow drift of a shared machine does not favour one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

from benchmarks import stats, sweep

log = logging.getLogger("benchmarks")

TARGET = 1.15  # fsdp's model states per rank should be at most TARGET / N of ddp's


def residual_mlp_params(in_features: int, hidden: int, depth: int, expansion: int = 4, out_features: int = 1) -> int:
    """Parameters of ``disttrain.models.ResidualMLP``: embed, ``depth`` blocks (LayerNorm, two
    Linears), final LayerNorm and head."""
    wide = expansion * hidden
    block = 2 * hidden + (hidden * wide + wide) + (wide * hidden + hidden)
    return (in_features * hidden + hidden) + depth * block + 2 * hidden + (hidden * out_features + out_features)


def plan(labels: Sequence[str], worlds: Sequence[int]) -> list[tuple[str, int]]:
    """Every variant at every world size, the order of variants reversed at every other size."""
    return [(v, w) for i, w in enumerate(worlds) for v in (labels if i % 2 == 0 else labels[::-1])]


def rank_memory(record: dict[str, Any]) -> dict[str, float]:
    """One rank's model-state and forward-held MB from its probe record (NaN where missing)."""
    m = record.get("memory_bytes") or {}

    def diff(a: str, b: str) -> float:
        return (m[a] - m[b]) / 2**20 if a in m and b in m else math.nan

    return {"model_states_mb": diff("after_step", "base"), "forward_mb": diff("before_backward", "step_start")}


def summarize(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per launch: the largest rank's memory, and ratios against the row of ``ddp`` (the
    model-state baseline) and of the variant without ``+ac`` (activation checkpointing's trade)
    at the same N."""
    rows = []
    for p in points:
        ranks = [rank_memory(r) for r in p.get("records", [])]
        row = {k: v for k, v in p.items() if k != "records"}
        for key in ("model_states_mb", "forward_mb"):
            vals = [r[key] for r in ranks if math.isfinite(r[key])]
            row[key] = max(vals) if vals else math.nan
        rows.append(row)
    at = {(r["variant"], r["world_size"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        n = r["world_size"]
        ddp = at.get(("ddp", n))
        r["states_vs_ddp"] = r["model_states_mb"] / ddp["model_states_mb"] if ddp else math.nan
        r["states_target"] = TARGET / n if r["strategy"] == "fsdp" else math.nan
        plain = at.get((r["variant"].removesuffix("+ac"), n)) if r["variant"].endswith("+ac") else None
        r["forward_vs_plain"] = r["forward_mb"] / plain["forward_mb"] if plain else math.nan
        r["step_time_vs_plain"] = r["step_ms_median"] / plain["step_ms_median"] if plain else math.nan
    return rows


def markdown(res: dict[str, Any]) -> str:
    """The tables of ``res`` (``run``'s result) for report.md and memory.md."""
    rows = res["rows"]
    lines = [
        f"Model: `ResidualMLP` {res['params']:,} parameters ({res['model']}), Adam, fp32, per-rank batch "
        f"{res['model']['per_rank_batch']}. Model states analytically: 16 bytes/parameter = "
        f"{16 * res['params'] / 2**20:.0f} MB whole (4 weights, 4 gradients, 8 Adam moments). Model states: bytes "
        f"allocated (glibc mallinfo2; torch.cuda.memory_allocated on GPU) after the second optimizer step, gradients "
        f"still alive, minus before the model was built; forward-held: after that step's forward minus at its start; "
        f"the largest rank. One launch per row; see benchmarks/memory.py.\n",
        "| variant | N | model states MB per rank | / ddp's | target | forward-held MB | samples/s | step ms median |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["world_size"], r["variant"])):
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['world_size']} | failed: {str(r.get('error', ''))[:80]} | | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['world_size']} | {_f(r['model_states_mb'], '{:.0f}')} | {_f(r['states_vs_ddp'], '{:.3f}')} "
            f"| {_f(r['states_target'], '<= {:.3f}')} | {_f(r['forward_mb'], '{:.1f}')} | {_f(r['samples_per_sec'], '{:.1f}')} "
            f"| {_f(r['step_ms_median'], '{:.0f}')} |"
        )
    trade = [r for r in rows if r["status"] == "ok" and r["forward_vs_plain"] is not None
             and math.isfinite(r["forward_vs_plain"])]  # NaN: no plain twin (None once read back from results.json)
    if trade:
        lines += ["", "Activation checkpointing (each `+ac` row against the same strategy without it, same N):", "",
                  "| variant | N | forward-held memory x | step time x |", "|---|---|---|---|"]
        for r in sorted(trade, key=lambda r: (r["world_size"], r["variant"])):
            lines.append(f"| {r['variant']} | {r['world_size']} | {_f(r['forward_vs_plain'], '{:.2f}')} "
                         f"| {_f(r['step_time_vs_plain'], '{:.2f}')} |")
    if res.get("ac_trade"):
        lines += ["", "Activation checkpointing per Block in one process (one thread, no other rank), forward + "
                  "backward alternated A B over rounds; memory held after the forward:", "",
                  "| per-rank batch | held MB plain | held MB checkpointed | x | ms plain | ms checkpointed "
                  "| time x median [p10, p90] |", "|---|---|---|---|---|---|---|"]
        for t in res["ac_trade"]:
            lines.append(f"| {t['batch']} | {_f(t['held_mb_plain'], '{:.1f}')} | {_f(t['held_mb_ac'], '{:.1f}')} "
                         f"| {_f(t['held_ratio'], '{:.2f}')} | {_f(t['ms_plain'], '{:.0f}')} | {_f(t['ms_ac'], '{:.0f}')} "
                         f"| {_f(t['time_ratio'], '{:.2f}')} [{_f(t['time_ratio_p10'], '{:.2f}')}, "
                         f"{_f(t['time_ratio_p90'], '{:.2f}')}] |")
    return "\n".join(lines) + "\n"


def ac_trade(model: dict[str, Any], batches: Sequence[int], rounds: int) -> list[dict[str, Any]]:
    """Activation checkpointing's trade without other ranks or launches in the way: in this
    process (one thread), the ``ResidualMLP`` of ``model`` with and without checkpointing per
    Block, alternated A B A B for ``rounds`` rounds per batch size (drift cancels in each pair's
    ratio). Memory held after the forward (``allocated_bytes`` before/after it) and the time of
    forward + backward."""
    import copy
    import time

    import torch

    from benchmarks.probe import allocated_bytes
    from disttrain import activation_checkpointing
    from disttrain.models import ResidualMLP

    torch.set_num_threads(1)
    torch.manual_seed(0)
    plain = ResidualMLP(int(model["in_features"]), int(model["hidden"]), 1, int(model["depth"]),
                        expansion=int(model["expansion"]))
    checkpointed = copy.deepcopy(plain)
    activation_checkpointing.apply(checkpointed, ["Block"])
    cpu = torch.device("cpu")
    out = []
    for batch in batches:
        x = torch.randn(int(batch), int(model["in_features"]))
        held: dict[str, float] = {}
        times: dict[str, list[float]] = {"plain": [], "ac": []}
        for r in range(int(rounds) + 1):  # round 0 warms up, unmeasured
            pair = [("plain", plain), ("ac", checkpointed)]
            for label, net in pair if r % 2 else pair[::-1]:
                net.zero_grad(set_to_none=True)
                t0, m0 = time.perf_counter(), allocated_bytes(cpu)
                loss = net(x).pow(2).mean()
                held_now = (allocated_bytes(cpu) - m0) / 2**20
                loss.backward()
                if r:
                    times[label].append(time.perf_counter() - t0)
                    held[label] = held_now  # the same every round once warm
        out.append(trade_row(int(batch), held, times))
    return out


def trade_row(batch: int, held_mb: dict[str, float], times: dict[str, list[float]]) -> dict[str, Any]:
    """One batch size's trade: memory held after the forward and forward+backward ms, plain and
    checkpointed, and their ratios (time: median and spread of the per-round ratios)."""
    ratios = [a / p for p, a in zip(times["plain"], times["ac"])]
    q = stats.quantiles(ratios)
    return {"batch": batch, "held_mb_plain": held_mb["plain"], "held_mb_ac": held_mb["ac"],
            "held_ratio": held_mb["ac"] / held_mb["plain"] if held_mb["plain"] else math.nan,
            "ms_plain": stats.quantiles(times["plain"])["median"] * 1e3, "ms_ac": stats.quantiles(times["ac"])["median"] * 1e3,
            "time_ratio": q["median"], "time_ratio_p10": q["p10"], "time_ratio_p90": q["p90"], "rounds": len(ratios)}


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def run(cfg: Any, work: Path, res: dict[str, Any], worlds: Sequence[int]) -> None:
    """Launch every variant of ``cfg.memory`` at every world size of ``worlds``; summarise into
    ``res["memory"]``."""
    m = cfg.memory
    model = dict(m.model)
    spec = sweep.ModelSpec("residual_mlp", int(model["in_features"]), int(model["hidden"]), int(model["depth"]),
                           int(model["per_rank_batch"]))
    params = residual_mlp_params(spec.in_features, spec.hidden, spec.depth, int(model["expansion"]))
    variants = {label: list(v) for label, v in m.variants.items()}
    avail = sweep.strategy_status(sorted({v[0] for v in variants.values()}))
    points = []
    for label, world in plan(list(variants), list(worlds)):
        strategy, *overrides = variants[label]
        if not avail[strategy]["available"]:
            res["skipped"].append(f"memory: {label} ({avail[strategy]['reason']})")
            continue
        tag = f"memory/{label.replace('+', '_')}_n{world}"
        log.info("memory: %s N=%d (%s parameters)", label, world, f"{params:,}")
        extra = ["model._target_=disttrain.models.ResidualMLP", f"+model.expansion={int(model['expansion'])}",
                 "+strategy.probe_memory=true", *overrides]
        p = sweep.run_disttrain(spec, strategy, avail[strategy]["target"], world, int(m.steps), int(m.warmup), work, tag,
                                float(cfg.timeout_s), probe_comm=False, accelerator=cfg.accelerator, extra=extra,
                                kind="memory")
        records = sweep.load_records(work / tag / "records") if p.status == "ok" else []
        points.append({"variant": label, "strategy": strategy, "world_size": world, "status": p.status,
                       "error": p.error, "samples_per_sec": p.samples_per_sec,
                       "step_ms_median": (p.step_ms or {}).get("median", math.nan), "wall_s": p.wall_s,
                       "records": records})
        log.info("  -> %s", "ok" if p.status == "ok" else f"failed: {p.error}")
    log.info("memory: activation checkpointing in one process, batches %s", list(m.ac_batches))
    res["memory"] = {"model": model, "params": params, "steps": int(m.steps), "warmup": int(m.warmup),
                     "rows": summarize(points), "ac_trade": ac_trade(model, list(m.ac_batches), int(m.ac_rounds))}
