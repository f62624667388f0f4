"""Pipeline schedules, measured: disttrain's pipelines against their formulas, against a plain
torch.distributed.pipelining script, and against data parallelism.

One run (``python -m benchmarks.pipeline_bubble``, or ``mode=pipeline`` of ``python -m benchmarks``):

1. **Schedules.** For K in ``stages`` (one process per pipeline rank, gloo on CPU) and every
   schedule (gpipe, 1f1b, interleaved_1f1b, interleaved_zero_bubble, zbv; V = 2 stages per rank for
   the last three), M in {K, 2K, 4K}: a chain of ``layers`` x (Linear width x width + Tanh) split
   into K x V equal stages by module names, a fixed batch. In the same processes, for the same
   stages, a *plain* script: ``PipelineStage`` over ``nn.Sequential`` slices and the torch schedule
   class, nothing else. Every round runs one step of every configuration, disttrain's and the
   plain one back to back (a barrier before each), so a change in machine load hits both alike;
   medians over the rounds after warm-up. Per configuration: measured bubble (disttrain's metric,
   1 - busy / step per rank, averaged over ranks) beside the schedule's formula, step time
   beside the plain script's (target ratio <= 1.05), and per pipeline rank the memory disttrain
   measured (parameters, gradients, SGD momentum, activation peak) beside the cost model's
   prediction from a one-off profile of the unsplit model (target within 15 %).
2. **DP x PP.** At N = ``scaling_world`` processes, the same model and global batch as DP2 x PP2
   (``pipeline_size=2``), DP4 (``strategy=ddp``) and PP4 (``pipeline_size=4``), alternated per
   step: samples/s.

Writes ``benchmarks/results/pipeline_bubble.{json,md}``; ``run(**kwargs) -> dict`` is the same
from Python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv")


# ---------------------------------------------------------------------- pure parts (tested)
def stages_per_rank(schedule: str) -> int:
    return 1 if schedule in ("gpipe", "1f1b") else 2


def equal_cuts(units: int, n_stages: int) -> list[int]:
    """Boundaries of ``n_stages`` contiguous, equal (to one unit) slices of ``units`` modules."""
    return [round(i * units / n_stages) for i in range(n_stages + 1)]


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians, ratios and targets from the workers' raw per-step records."""
    from disttrain.strategies.model_parallel import schedules

    rows = []
    for r in raw["schedules"]:
        k, v, m = r["k"], stages_per_rank(r["schedule"]), r["m"]
        ours, plain = statistics.median(r["ours_ms"]), statistics.median(r["plain_ms"])
        mem = [{"rank": i, "measured": meas, "predicted": pred, "ratio": meas / pred if pred else float("nan")}
               for i, (meas, pred) in enumerate(zip(r["memory_measured"], r["memory_predicted"]))]
        rows.append({
            "k": k, "schedule": r["schedule"], "v": v, "m": m,
            "bubble_measured": statistics.median(r["bubble"]), "bubble_formula": schedules.get(r["schedule"]).bubble(k, v, m),
            "bubble_simulated": r.get("bubble_simulated"),
            "step_ms": ours, "plain_ms": plain, "ratio": ours / plain, "predicted_step_ms": r.get("predicted_step_ms"),
            "loss_sync_ms": statistics.median(r["sync_ms"]) if r.get("sync_ms") else None,
            "memory": mem,
        })
    scaling = {name: {"step_ms": statistics.median(t), "samples_per_sec": raw["scaling_batch"] / statistics.median(t) * 1e3}
               for name, t in raw.get("scaling", {}).items()}
    mem_ratios = [m["ratio"] for r in rows for m in r["memory"]]
    return {
        "rows": rows,
        "scaling": scaling,
        "targets": {
            "step_ratio_le_1.05": sum(r["ratio"] <= 1.05 for r in rows),
            "configs": len(rows),
            "memory_within_15pct": sum(abs(x - 1) <= 0.15 for x in mem_ratios),
            "memory_rows": len(mem_ratios),
        },
    }


def markdown(result: dict[str, Any]) -> str:
    """The tables of ``result`` (``run``'s return value) in Markdown."""
    c = result["config"]
    lines = [
        f"# Pipelines on torch.distributed.pipelining (width {c['width']}, {c['layers']} x Linear+Tanh, batch "
        f"{c['batch']}, {c['device']}, {c['steps']} alternated rounds after {c['warmup']} warm-up; medians)",
        "",
        "| K | schedule | V | M | bubble measured | formula | step ms | plain torch ms | ratio | of which loss sync ms | predicted step ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        pred = f"{r['predicted_step_ms']:.1f}" if r.get("predicted_step_ms") else ""
        sync = f"{r['loss_sync_ms']:.1f}" if r.get("loss_sync_ms") is not None else ""
        lines.append(f"| {r['k']} | {r['schedule']} | {r['v']} | {r['m']} | {r['bubble_measured']:.3f} | "
                     f"{r['bubble_formula']:.3f} | {r['step_ms']:.1f} | {r['plain_ms']:.1f} | {r['ratio']:.2f} | {sync} | {pred} |")
    lines += ["", "Per pipeline rank, memory measured by disttrain / predicted by the cost model (MiB):", "",
              "| K | schedule | M | " + " | ".join(f"rank {i}" for i in range(max(r["k"] for r in result["rows"]))) + " |",
              "|---|---|---|" + "---|" * max(r["k"] for r in result["rows"])]
    for r in result["rows"]:
        cells = [f"{m['measured'] / 2**20:.2f} / {m['predicted'] / 2**20:.2f} ({m['ratio']:.2f})" for m in r["memory"]]
        lines.append(f"| {r['k']} | {r['schedule']} | {r['m']} | " + " | ".join(cells) + " |")
    if result.get("scaling"):
        lines += ["", f"N = {c['scaling_world']} processes, global batch {c['scaling_batch']}:", "",
                  "| layout | step ms | samples/s |", "|---|---|---|"]
        for name, s in result["scaling"].items():
            lines.append(f"| {name} | {s['step_ms']:.1f} | {s['samples_per_sec']:.0f} |")
    t = result["targets"]
    lines += ["", f"Targets: step time <= 1.05 x the plain script in {t['step_ratio_le_1.05']} of {t['configs']} "
              f"configurations; memory within 15 % of the prediction in {t['memory_within_15pct']} of "
              f"{t['memory_rows']} (configuration, rank) pairs.", "", f"Machine: {result['machine']}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- workers
def _model(width: int, layers: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    mods: list = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods)


def _env(rank: int, world: int, port: int, cfg: dict) -> tuple[Any, Any, str]:
    """Environment of a spawned rank: ``(DistEnv, device, backend)`` (a GPU per rank with
    ``device="cuda"``, NCCL; else CPU and gloo)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    from disttrain.env import DistEnv

    torch.set_num_threads(1)
    if cfg["device"] == "cuda" and torch.cuda.is_available():
        return DistEnv.from_environ(), torch.device("cuda", rank % torch.cuda.device_count()), "nccl"
    return DistEnv.from_environ(), torch.device("cpu"), "gloo"


def _now(device: Any) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _ours(schedule: str, m: int, cfg: dict, env: Any, device: Any, backend: str, pipeline_size: int | None = None):
    import torch

    from disttrain.strategies.model_parallel import ModelParallelStrategy

    k = pipeline_size or env.world_size
    n = k * stages_per_rank(schedule)
    cuts = [2 * c for c in equal_cuts(cfg["layers"], n)]  # whole Linear+Tanh layers per stage
    placement = [{"modules": [f"{cuts[s]}-{cuts[s + 1] - 1}"]} for s in range(n)]
    st = ModelParallelStrategy(placement=placement, schedule=schedule, microbatches=m, pipeline_size=k)
    st.validate(env)
    st.setup(env, device, backend, 300)
    model = st.build_model(lambda: _model(cfg["width"], cfg["layers"]))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model, opt = st.wrap(model, opt)
    return st, model, opt, cuts


def _plain(schedule: str, m: int, cuts: list[int], cfg: dict, rank: int, world: int, device: Any):
    """The plain torch script: PipelineStage over Sequential slices, torch's schedule class."""
    import torch
    import torch.distributed.pipelining as pipelining
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
    from torch.nn import functional as F

    n = len(cuts) - 1
    mapping = generate_stage_to_rank_mapping(world, n, style="v" if schedule == "zbv" else "loop")
    full = _model(cfg["width"], cfg["layers"]).to(device)
    stages = [pipelining.PipelineStage(full[cuts[s]:cuts[s + 1]], s, n, device) for s in range(n) if mapping[s] == rank]
    cls = {"gpipe": pipelining.ScheduleGPipe, "1f1b": pipelining.Schedule1F1B,
           "interleaved_1f1b": pipelining.ScheduleInterleaved1F1B,
           "interleaved_zero_bubble": pipelining.ScheduleInterleavedZeroBubble,
           "zbv": pipelining.ScheduleZBVZeroBubble}[schedule]
    sched = cls(stages[0] if schedule in ("gpipe", "1f1b") else stages, m, loss_fn=F.mse_loss)
    params = [p for st in stages for p in st.submod.parameters()]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    return sched, stages, opt


def _plain_step(sched: Any, stages: list, opt: Any, x: Any, y: Any) -> None:
    first, last = any(s.is_first for s in stages), any(s.is_last for s in stages)
    sched.step(*((x,) if first else ()), **({"target": y, "losses": []} if last else {}))
    opt.step()
    opt.zero_grad(set_to_none=True)


def _predict(cfg: dict, schedule: str, k: int, m: int, cuts: list[int], profiles: dict, device: Any) -> dict:
    """The cost model's prediction for these stages (rank 0 profiles the unsplit model once per
    micro-batch size)."""
    import torch
    from torch.nn import functional as F

    from disttrain.strategies.model_parallel import cost, schedules
    from disttrain.strategies.model_parallel import placement as pl

    mb = cfg["batch"] // m
    if mb not in profiles:
        model = _model(cfg["width"], cfg["layers"]).to(device)
        x, y = torch.randn(mb, cfg["width"], device=device), torch.randn(mb, cfg["width"], device=device)
        profiles[mb] = cost.profile(model, pl.units(model), (x,), lambda out: F.mse_loss(out, y), optim_ratio=1.0)
    spec = schedules.get(schedule)
    v = stages_per_rank(schedule)
    orders = spec.rank_orders(k, v, m)
    p = cost.predict(profiles[mb], cuts, spec.stage_ranks(k, v), orders)
    return {"memory": p.memory_bytes, "step_ms": 1e3 * p.step_s,
            "bubble": 1 - sum(p.busy_s) / len(p.busy_s) / p.step_s if p.step_s else None}


def _schedules_worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    env, device, backend = _env(rank, world, port, cfg)
    import torch
    import torch.distributed as dist
    from torch.nn import functional as F

    from disttrain.env import destroy_process_group
    from disttrain.timing import StepTimer

    entries = []
    for schedule in cfg["schedules"]:
        for f in cfg["m_factors"]:
            m = world * f
            if cfg["layers"] < world * stages_per_rank(schedule) or cfg["batch"] % m:
                continue
            st, model, opt, cuts = _ours(schedule, m, cfg, env, device, backend)
            plain = _plain(schedule, m, cuts, cfg, rank, world, device)
            entries.append({"schedule": schedule, "m": m, "ours": (st, model, opt), "plain": plain, "cuts": cuts,
                            "ours_ms": [], "plain_ms": [], "sync_ms": [], "bubble": []})
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(cfg["batch"], cfg["width"], generator=g).to(device) for _ in range(2))
    timer = StepTimer(device)
    for rnd in range(cfg["warmup"] + cfg["steps"]):
        for e in entries:
            st, model, opt = e["ours"]
            dist.barrier()
            t0 = _now(device)
            st.train_step(model, opt, [(x, y)], F.mse_loss, None, timer)
            t_ours = _now(device) - t0
            sync = timer.step.get("loss_sync", 0.0)
            bubble = st.log_metrics().get("pipeline/bubble_fraction")
            dist.barrier()
            t0 = _now(device)
            _plain_step(*e["plain"], x, y)
            t_plain = _now(device) - t0
            timer.end_step()
            if rnd >= cfg["warmup"]:
                e["ours_ms"].append(1e3 * t_ours)
                e["plain_ms"].append(1e3 * t_plain)
                e["sync_ms"].append(1e3 * sync)
                e["bubble"].append(bubble)
    mine = [{"ours_ms": e["ours_ms"], "plain_ms": e["plain_ms"], "sync_ms": e["sync_ms"]} for e in entries]
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    profiles: dict = {}
    out = []
    for i, e in enumerate(entries):
        rows = e["ours"][0].memory_report() or []
        pred = _predict(cfg, e["schedule"], world, e["m"], e["cuts"], profiles, device) if rank == 0 else {}
        out.append({
            "k": world, "schedule": e["schedule"], "m": e["m"], "bubble": e["bubble"],
            "ours_ms": [max(r[i]["ours_ms"][j] for r in every) for j in range(len(e["ours_ms"]))],
            "plain_ms": [max(r[i]["plain_ms"][j] for r in every) for j in range(len(e["plain_ms"]))],
            "sync_ms": [statistics.mean(r[i]["sync_ms"][j] for r in every) for j in range(len(e["sync_ms"]))],
            "memory_measured": [row["total"] for row in rows], "memory_predicted": pred.get("memory", []),
            "predicted_step_ms": pred.get("step_ms"), "bubble_simulated": pred.get("bubble"),
        })
    for e in entries:
        e["ours"][0].teardown()
    entries.clear()
    destroy_process_group()
    if rank == 0:
        Path(out_dir, "schedules.json").write_text(json.dumps(out))


def _scaling_worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    """DP x PP vs DP vs PP on the same model and global batch, one step of each per round."""
    env, device, backend = _env(rank, world, port, cfg)
    import torch
    import torch.distributed as dist
    from torch.nn import functional as F

    from disttrain.env import destroy_process_group
    from disttrain.strategies.ddp import DDPStrategy
    from disttrain.timing import StepTimer

    b, mb = cfg["scaling_batch"], cfg["scaling_batch"] // (2 * world)
    setups = {}
    for name, k in ((f"DP{world // 2} x PP2", 2), (f"PP{world}", world)):
        st, model, opt, _ = _ours("1f1b", b // (world // k) // mb, cfg, env, device, backend, pipeline_size=k)
        setups[name] = (st, model, opt)
    ddp = DDPStrategy()
    ddp.validate(env)
    ddp.setup(env, device, backend, 300)
    model = _model(cfg["width"], cfg["layers"])
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    setups[f"DP{world}"] = (ddp, *ddp.wrap(model, opt))
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(b, cfg["width"], generator=g).to(device) for _ in range(2))
    times: dict[str, list[float]] = {name: [] for name in setups}
    timer = StepTimer(device)
    for rnd in range(cfg["warmup"] + cfg["steps"]):
        for name, (st, model, opt) in setups.items():
            index, count = st.data_shard(env)
            xs, ys = x.chunk(count)[index], y.chunk(count)[index]
            dist.barrier()
            t0 = _now(device)
            st.train_step(model, opt, [(xs, ys)], F.mse_loss, None, timer)
            dist.barrier()
            if rnd >= cfg["warmup"]:
                times[name].append(1e3 * (_now(device) - t0))
            timer.end_step()
    for st, _, _ in setups.values():
        st.teardown()
    setups.clear()
    destroy_process_group()
    if rank == 0:
        Path(out_dir, "scaling.json").write_text(json.dumps(times))


def _spawn(target: Any, world: int, cfg: dict, out_dir: str, timeout_s: float) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, port, cfg, out_dir), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"pipeline benchmark ranks exited with {[p.exitcode for p in procs]}")


def run(
    stages: Sequence[int] = (2, 4),
    schedules: Sequence[str] = SCHEDULES,
    m_factors: Sequence[int] = (1, 2, 4),
    batch: int = 256,
    width: int = 256,
    layers: int = 16,
    steps: int = 6,
    warmup: int = 2,
    scaling: bool = True,
    scaling_world: int = 4,
    scaling_batch: int = 256,
    device: str = "cpu",
    timeout_s: float = 3000,
    write: bool = True,
) -> dict[str, Any]:
    """Measure (see the module docstring); returns (and with ``write`` saves) the figures."""
    import torch

    cfg = dict(stages=list(stages), schedules=list(schedules), m_factors=list(m_factors), batch=batch, width=width,
               layers=layers, steps=steps, warmup=warmup, device=device, scaling_world=scaling_world,
               scaling_batch=scaling_batch)
    t0 = time.perf_counter()
    raw: dict[str, Any] = {"schedules": [], "scaling_batch": scaling_batch}
    with tempfile.TemporaryDirectory() as out:
        for k in stages:
            _spawn(_schedules_worker, k, cfg, out, timeout_s)
            raw["schedules"] += json.loads(Path(out, "schedules.json").read_text())
        if scaling:
            _spawn(_scaling_worker, scaling_world, cfg, out, timeout_s)
            raw["scaling"] = json.loads(Path(out, "scaling.json").read_text())
    result = {
        "config": cfg, **summarise(raw), "raw": raw,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "wall_s": time.perf_counter() - t0,
    }
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "pipeline_bubble.json").write_text(json.dumps(result, indent=1))
        (RESULTS / "pipeline_bubble.md").write_text(markdown(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    ap.add_argument("--m-factors", type=int, nargs="+", default=[1, 2, 4], help="M = factor x K")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per rank, NCCL")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    res = run(stages=a.stages, schedules=a.schedules, m_factors=a.m_factors, batch=a.batch, width=a.width,
              layers=a.layers, steps=a.steps, warmup=a.warmup, scaling=not a.no_scaling, device=a.device,
              write=not a.no_write)
    print(markdown(res))


if __name__ == "__main__":
    main()
