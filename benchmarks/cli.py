"""``python -m benchmarks [overrides]``: the scaling benchmarks (a Hydra app, config in
benchmarks/conf/). Modes: scaling, overhead, comm, batch, straggler, pipeline, memory (``mode=all``).

Results: ``benchmarks/results/<name>/`` with results.json (everything), points.csv (one row per
launch), comm.csv, PNG plots and report.md (machine, versions, command, noise floor, method)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from benchmarks import stats, sweep

log = logging.getLogger("benchmarks")
MODES = ("scaling", "overhead", "comm", "batch", "straggler", "pipeline", "memory")
EXTERNAL = {"straggler": "benchmarks.straggler", "pipeline": "benchmarks.pipeline_bubble"}


def modes(cfg: DictConfig) -> list[str]:
    m = cfg.mode
    chosen = list(MODES) if m == "all" else ([m] if isinstance(m, str) else list(m))
    bad = [x for x in chosen if x not in MODES]
    if bad:
        raise SystemExit(f"mode={bad}: expected any of {list(MODES)} or all")
    return chosen


def _gpu_cap(cfg: DictConfig, sizes: list[int], skipped: list[str], what: str) -> list[int]:
    """On GPUs one process per device: world sizes above the device count are skipped."""
    import torch

    if cfg.accelerator == "cpu" or not torch.cuda.is_available():
        return sizes
    n = torch.cuda.device_count()
    for w in sizes:
        if w > n:
            skipped.append(f"{what}: world size {w} skipped, only {n} GPU(s) visible")
    return [w for w in sizes if w <= n]


# ---------------------------------------------------------------------- modes
def run_scaling(cfg: DictConfig, work: Path, res: dict) -> None:
    avail = sweep.strategy_status(list(cfg.strategies))
    res["strategies"] = avail
    names = [n for n, s in avail.items() if s["available"]]
    for n, s in avail.items():
        if not s["available"]:
            log.info("scaling: %s not available yet (%s)", n, s["reason"])
    worlds = _gpu_cap(cfg, list(cfg.world_sizes), res["skipped"], "scaling")
    specs = [sweep.model_spec(m, cfg.models[m]) for m in cfg.scaling_models]
    plan = [(s, m, w) for m in specs for w in worlds for s in names]
    refused = {(s, w): why for s in names for w in worlds if (why := sweep.cannot_run(s, w))}
    res["skipped"] += [f"scaling: {s} at N={w} ({why})" for (s, w), why in refused.items()]
    points: list[sweep.Point] = []
    for rep in range(int(cfg.repeats)):
        order = plan if rep % 2 == 0 else plan[::-1]  # alternate the order: drift cancels
        for strat, spec, world in order:
            if (strat, world) in refused:
                continue
            if rep > 0 and not any(p.status == "ok" for p in points if (p.strategy, p.model, p.world_size) == (strat, spec.name, world)):
                continue  # failed in the first repeat (e.g. needs more ranks): do not pay for it again
            tag = f"scaling/{strat}_{spec.name}_n{world}_r{rep}"
            log.info("scaling: %s model=%s (%d params) N=%d repeat %d", strat, spec.name, spec.params, world, rep)
            p = sweep.run_disttrain(spec, strat, avail[strat]["target"], world, int(cfg.steps), int(cfg.warmup), work,
                                    tag, float(cfg.timeout_s), bool(cfg.probe_comm), cfg.accelerator,
                                    list(cfg.strategy_overrides.get(strat, []) or []))
            p.repeat = rep  # type: ignore[attr-defined]
            _log_point(p)
            points.append(p)
    res["scaling"] = combine(points)
    res["scaling_launches"] = [p.as_dict() for p in points]


def combine(points: list[sweep.Point]) -> list[dict[str, Any]]:
    """One row per (strategy, model, N) over its repeats: median samples/s across launches,
    pooled step-time spread, mean breakdown; then E_N against the single-process baseline of
    the same model (ddp at N=1, else the strategy's own N=1)."""
    groups: dict[tuple, list[sweep.Point]] = {}
    for p in points:
        groups.setdefault((p.strategy, p.model, p.world_size), []).append(p)
    rows = []
    for (strat, model, world), ps in groups.items():
        ok = [p for p in ps if p.status == "ok"]
        row = {k: v for k, v in ps[0].as_dict().items() if k not in ("step_ms", "breakdown_ms", "repeat", "wall_s")}
        row["launches"], row["ok_launches"] = len(ps), len(ok)
        if not ok:
            row.update(status="failed", error=ps[-1].error)
            rows.append(row)
            continue
        row["status"], row["error"] = "ok", ""
        rates = [p.samples_per_sec for p in ok]
        row["samples_per_sec"] = float(np.median(rates))
        row["samples_per_sec_launches"] = rates
        row["step_ms"] = {k: float(np.median([p.step_ms[k] for p in ok])) for k in ("median", "p10", "p90", "iqr")}
        row["breakdown_ms"] = {k: float(np.mean([p.breakdown_ms[k] for p in ok])) for k in stats.CATEGORIES}
        row["peak_rss_mb"] = max(ok, key=lambda p: max(p.peak_rss_mb or [0])).peak_rss_mb
        row["peak_gpu_mb"] = ok[0].peak_gpu_mb
        rows.append(row)
    for row in rows:
        base = _baseline(rows, row["model"], row["strategy"])
        row["efficiency"] = stats.scaling_efficiency(row["samples_per_sec"], row["world_size"], base) if base else math.nan
        row["speedup"] = stats.speedup(row["samples_per_sec"], base) if base else math.nan
    return rows


def _baseline(rows: list[dict], model: str, strategy: str) -> float | None:
    for strat in ("ddp", strategy):
        for r in rows:
            if r["model"] == model and r["strategy"] == strat and r["world_size"] == 1 and r["status"] == "ok":
                return r["samples_per_sec"]
    return None


def run_overhead(cfg: DictConfig, work: Path, res: dict) -> None:
    """One torchrun job (benchmarks/overhead_pair.py): raw torch DDP replicas A1, A2 and a
    disttrain ddp replica B of the same model in the same processes, one step of each per round
    in alternating order; the median of the per-round ratios B/A1 and A2/A1 (the noise floor)."""
    o = cfg.overhead
    spec = sweep.model_spec(o.model, cfg.models[o.model])
    world = (_gpu_cap(cfg, [int(o.world_size)], res["skipped"], "overhead") or [1])[0]
    out = work / "overhead" / "pairs.json"
    args = [str(sweep.ROOT / "benchmarks" / "overhead_pair.py"), "--out", str(out), "--in-features", str(spec.in_features),
            "--hidden", str(spec.hidden), "--depth", str(spec.depth), "--batch", str(spec.per_rank_batch * world),
            "--rounds", str(int(o.rounds)), "--warmup", str(int(cfg.warmup)), *(["--loaders"] if o.get("loaders") else [])]
    log.info("overhead: raw DDP x2 and disttrain ddp in one job, N=%d, %d alternated rounds", world, int(o.rounds))
    rc, tail = sweep.torchrun(args, world, work / "overhead" / "launch.log", float(cfg.timeout_s))
    if rc != 0 or not out.is_file():
        res["overhead"] = {"failed": [f"exit {rc}: " + sweep._last_error(tail)], "world_size": world, "model": spec.name}
        log.warning("overhead failed: %s", res["overhead"]["failed"][0])
        return
    res["overhead"] = overhead_summary(json.loads(out.read_text()))
    res["overhead"].update(model=spec.name, params=spec.params, world_size=world, per_rank_batch=spec.per_rank_batch)
    log.info("  -> disttrain/raw %.3f (A/A %.3f), median of %d per-round ratios",
             res["overhead"]["ratio"]["median"], res["overhead"]["aa"]["median"], res["overhead"]["ratio"]["n"])


def overhead_summary(pairs: dict[str, Any]) -> dict[str, Any]:
    """Quantiles of the per-round ratios B/A1 (disttrain over raw) and A2/A1 (raw over raw)."""
    return {
        "method": "one job; per round one step each of raw DDP A1, disttrain ddp B and raw DDP A2 in the same "
                  "processes, order A1 B A2 / A2 B A1 alternating; ratio = median over rounds of B/A1, "
                  "aa = median over rounds of A2/A1 (noise floor)",
        "ratio_b_over_a": pairs["ratio_b_over_a"], "ratio_a_over_a": pairs["ratio_a_over_a"],
        "ratio": stats.quantiles(pairs["ratio_b_over_a"]), "aa": stats.quantiles(pairs["ratio_a_over_a"]),
        "step_ms": pairs["median_step_ms"], "rounds": pairs["rounds"], "loaders": pairs.get("loaders", False),
        "target": 1.03, "failed": [],
    }


def run_comm(cfg: DictConfig, work: Path, res: dict) -> None:
    from benchmarks.comm import memcpy_bandwidth

    c = cfg.comm
    import torch

    dev = "cuda" if cfg.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        torch.set_num_threads(1)  # the ceiling one process (one thread, as in training) can reach
    res["memcpy"] = memcpy_bandwidth(int(c.memcpy_bytes), 20, dev)
    out = []
    for world in _gpu_cap(cfg, list(c.world_sizes), res["skipped"], "comm"):
        log.info("comm: allreduce sweep and gradient sync at N=%d", world)
        r = sweep.run_comm(world, list(c.sizes), int(c.iters), int(c.warmup), c.grad, work, float(cfg.timeout_s))
        if r["status"] == "ok":
            r.update(comm_summary(r))
        else:
            log.warning("comm N=%d failed: %s", world, r["error"])
        out.append(r)
    res["comm"] = out


def comm_summary(r: dict) -> dict[str, Any]:
    n = int(r["world_size"])
    rows, sizes, meds = [], [], []
    for size, times in r["allreduce"].items():
        q = stats.quantiles(times)
        s = int(size)
        rows.append({"world_size": n, "bytes": s, "time_us": q["median"] * 1e6, "time_us_p10": q["p10"] * 1e6,
                     "time_us_p90": q["p90"] * 1e6, "algbw_GBps": stats.algbw(s, q["median"]) / 1e9,
                     "busbw_GBps": stats.busbw(s, q["median"], n) / 1e9,
                     "busbw_GBps_p10": stats.busbw(s, q["p90"], n) / 1e9, "busbw_GBps_p90": stats.busbw(s, q["p10"], n) / 1e9})
        sizes.append(s)
        meds.append(q["median"])
    fit = stats.fit_ring(sizes, meds, n)
    for row in rows:
        row["ring_model_us"] = stats.ring_time(row["bytes"], n, fit["alpha_s"], fit["bandwidth"]) * 1e6
    g = r["grad_sync"]
    gq = {m: stats.quantiles(t) for m, t in g["times"].items()}
    base = gq["no_sync"]["median"]
    return {
        "rows": rows, "ring_fit": fit,
        "grad": {**{k: v for k, v in g.items() if k != "times"},
                 "step_ms": {m: {k: q[k] * 1e3 for k in ("median", "p10", "p90")} for m, q in gq.items()},
                 "sync_ms_bucketed": (gq["ddp_bucketed"]["median"] - base) * 1e3,
                 "sync_ms_per_tensor": (gq["per_tensor"]["median"] - base) * 1e3},
    }


def run_batch(cfg: DictConfig, work: Path, res: dict) -> None:
    bc = cfg.batch
    world = (_gpu_cap(cfg, [int(bc.world_size)], res["skipped"], "batch") or [1])[0]
    target = sweep.strategy_status(["ddp"])["ddp"]["target"]
    rows = []
    for b in bc.per_rank_batches:
        spec_cfg = OmegaConf.merge(cfg.models[bc.model], {"per_rank_batch": int(b)})
        spec = sweep.model_spec(bc.model, spec_cfg)
        log.info("batch: per-rank batch %d at N=%d", b, world)
        p = sweep.run_disttrain(spec, "ddp", target, world, int(cfg.steps), int(cfg.warmup), work, f"batch/b{b}",
                                float(cfg.timeout_s), probe_comm=False, accelerator=cfg.accelerator, kind="batch")
        _log_point(p)
        rows.append(p.as_dict())
    ok = [r for r in rows if r["status"] == "ok"]
    res["batch"] = {"world_size": world, "model": bc.model, "points": rows,
                    "knee": stats.knee([r["per_rank_batch"] for r in ok], [r["samples_per_sec"] for r in ok], float(bc.min_gain)),
                    "min_gain": float(bc.min_gain)}


def run_memory(cfg: DictConfig, work: Path, res: dict) -> None:
    """Model-state memory and speed of ddp, fsdp and ZeRO-3, activation checkpointing's trade
    (benchmarks/memory.py)."""
    from benchmarks import memory

    memory.run(cfg, work, res, _gpu_cap(cfg, list(cfg.memory.world_sizes), res["skipped"], "memory"))


def run_external(mode: str, cfg: DictConfig, res: dict) -> None:
    """benchmarks/straggler.py and benchmarks/pipeline_bubble.py (other engineers' work): each
    exposes ``run(**kwargs) -> dict``; imported only when asked for."""
    module = EXTERNAL[mode]
    if importlib.util.find_spec(module) is None:
        log.info("%s: not available yet (%s.py does not exist)", mode, module.replace(".", "/"))
        res[mode] = {"status": "not available yet", "module": module}
        return
    try:
        fn = importlib.import_module(module).run
        node = cfg.get(mode)
        kwargs = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        out = fn(**kwargs)
        res[mode] = {"status": "ok", "module": module, "result": out}
    except Exception as exc:  # someone else's tool: record, do not lose the sweep
        log.warning("%s failed: %s: %s", mode, type(exc).__name__, exc)
        res[mode] = {"status": "failed", "module": module, "error": f"{type(exc).__name__}: {exc}"}


def _log_point(p: sweep.Point) -> None:
    if p.status == "ok":
        log.info("  -> %.0f samples/s, median step %.2f ms (p10 %.2f, p90 %.2f), launch %.0fs",
                 p.samples_per_sec, p.step_ms["median"], p.step_ms["p10"], p.step_ms["p90"], p.wall_s)
    else:
        log.warning("  -> failed: %s", p.error)


# ---------------------------------------------------------------------- the app
def command_line() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return "python -m benchmarks " + " ".join(HydraConfig.get().overrides.task)
    except Exception:
        return "python -m benchmarks " + " ".join(sys.argv[1:])


def run(cfg: DictConfig) -> dict[str, Any]:
    from benchmarks import report

    out = Path(cfg.out_dir)
    if not out.is_absolute():
        out = sweep.ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="disttrain-bench-"))
    res: dict[str, Any] = {"name": cfg.name, "command": command_line(), "config": OmegaConf.to_container(cfg, resolve=True),
                           "machine_start": report.machine(), "skipped": [], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    try:
        for mode in modes(cfg):
            if mode in EXTERNAL:
                run_external(mode, cfg, res)
            else:
                globals()[f"run_{mode}"](cfg, work, res)
        res["load_end"] = os.getloadavg()
        res["duration_s"] = time.perf_counter() - t0
        report.write_all(res, out)
        log.info("wrote %s", out)
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return res


def _hydra_entry(cfg: DictConfig) -> None:
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def stop(signum: int, _frame: Any) -> None:
        sweep.kill_running()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        run(cfg)
    finally:
        sweep.kill_running()


def main() -> None:
    import hydra

    hydra.main(config_path=str(Path(__file__).resolve().parent / "conf"), config_name="config", version_base="1.3")(_hydra_entry)()
