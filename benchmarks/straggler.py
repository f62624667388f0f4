"""Straggler benchmark: asynchronous parameter server vs synchronous DDP with one slow worker.

Two data-parallel workers train the same MLP on digits with the same global batch, through the
Trainer (the same code path as ``python -m disttrain``): ``ddp`` on 2 ranks, and
``parameter_server`` with colocated servers (each of the 2 ranks trains and serves one shard:
the same 2 processes on the same cores as ddp) at ``max_staleness`` null. One worker is slowed
by ``factor`` with the Trainer's straggler knob (``trainer.slowdown``) under two models, both
reported:

* ``idle``: the straggler holds for the extra time without using the CPU (``time.sleep``), as a
  separate slower device would (on a cluster each worker has its own GPU and a slow one steals
  nothing from the others);
* ``busy``: the extra time is compute on the shared cores, so the straggler also slows the fast
  worker (on 2 cores with 2 processes it takes CPU the other needs).

And once without a straggler (the cost of the messages and the server threads). Every
configuration runs ``reps`` times, alternating (the order reverses every repetition); ratios to
ddp are taken per repetition (each PS run against the ddp run next to it) and reported as median
and [min, max].

Measured per run, from every worker's per-batch records (monotonic clock, shared by processes):

* samples/s: samples processed by all workers while *all* were still training (from the latest
  worker's 10th batch to the earliest worker's last one) / that time. Both PS workers train the
  same number of steps, so the fast one finishes first; the window excludes the tail where the
  slow one trains alone.
* time-to-target: seconds until the training loss (mean of the last 10 global batches' worth of
  records, in time order) first falls to the target: the loss the no-straggler ddp run reaches
  halfway through (first repetition).
* per phase: every rank's mean step time per phase (forward, backward, straggle, wait, push,
  pull, ...), and each server's time handling messages (of which the optimizer and the replies).

With one of two workers slowed 2x the ideal async speedup is (1 + 1/2) / (2 * 1/2) = 1.5.

``python -m benchmarks.straggler`` writes benchmarks/results/straggler.json and straggler.md;
``run(**kwargs) -> dict`` is the same from Python.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PS = "disttrain.strategies.parameter_server.ParameterServerStrategy"
DDP = "disttrain.strategies.ddp.DDPStrategy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.nn.functional as F

    from disttrain.data import digits
    from disttrain.models import MLP
    from disttrain.session import Session
    from disttrain.trainer import Trainer, TrainerConfig

    torch.set_num_threads(1)
    records: list[tuple[float, float, int]] = []

    def loss_fn(out, y):
        loss = F.cross_entropy(out, y)
        records.append((time.perf_counter(), float(loss.detach()), len(y)))
        return loss

    s = Session(cfg["strategy"], accelerator="cpu", seed=0)
    try:
        model = MLP(64, cfg["hidden"], 10, depth=2)
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        train, _ = digits()
        tc = TrainerConfig(max_epochs=10_000, max_steps=cfg["steps"], log_every_n_steps=10**9, progress_bar=False,
                           slowdown=cfg["slowdown"], check_in_sync=False)
        trainer = Trainer(s, model, opt, loss_fn, train, batch_size=cfg["batch"], config=tc)
        summary = trainer.fit()
        trains = not getattr(s.strategy, "is_server", False)
        out = {"rank": rank, "trains": trains, "records": records if trains else [], "summary": summary}
        del trainer
    finally:
        s.close()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)


def _launch(cfg: dict, world: int, timeout: float) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, d), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
        out = []
        for r in range(world):
            path = Path(d, f"rank{r}.pkl")
            if not path.exists():
                raise RuntimeError(f"rank {r} of {cfg['name']} left no result (exit code {procs[r].exitcode})")
            out.append(pickle.loads(path.read_bytes()))
        return out


def _analyse(ranks: list[dict], target: float | None, smooth_batches: int) -> dict[str, Any]:
    workers = [r for r in ranks if r["trains"]]
    recs = [r["records"] for r in workers]
    # warm-up: the first 10 batches of each worker (a quarter of them in short runs) are not timed
    t0 = max(rs[min(10, len(rs) // 4)][0] for rs in recs)
    t1 = min(rs[-1][0] for rs in recs)
    window = sum(n for rs in recs for t, _, n in rs if t0 < t <= t1)
    merged = sorted(rec for rs in recs for rec in rs)
    start = min(rs[0][0] for rs in recs)
    k = smooth_batches * len(workers)
    curve, total = [], 0
    for i, (t, _, n) in enumerate(merged):
        total += n
        last = merged[max(0, i - k + 1) : i + 1]
        curve.append((total, t - start, sum(loss for _, loss, _ in last) / len(last)))
    hit = next(((smp, sec) for smp, sec, loss in curve if target is not None and loss <= target), (None, None))
    return {
        "samples_per_sec": window / max(t1 - t0, 1e-9),
        "per_worker_steps": [len(rs) for rs in recs],
        "samples_to_target": hit[0],
        "seconds_to_target": hit[1],
        "final_loss": curve[-1][2],
        "curve": curve,
        "summary": next((r["summary"] for r in ranks if r["rank"] == 0), {}),
        "phases_ms": {r["rank"]: r["summary"].get("step_time_ms", {}) for r in ranks},
        "elapsed_s": max(r["summary"].get("elapsed_s", 0.0) for r in ranks),
    }


TARGETS = {  # issue 18: PS against ddp, per straggler model (factor 2)
    "idle": {"time_to_target_speedup": 1.35, "throughput_vs_ddp": 1.35},
    "busy": {"time_to_target_speedup": 1.0, "throughput_vs_ddp": 1.0},
    "none": {"throughput_vs_ddp": 0.9},
}


def _configs(models: tuple, staleness: tuple, servers: str, factor: float) -> list[tuple[str, str, dict, int, Any]]:
    """(name, straggler model, strategy, world size, slowdown) of every run in one repetition."""
    ps_world = 2 if servers == "colocated" else 3
    out = []
    for model in ("none", *models):
        slow_ddp = None if model == "none" else {"rank": 1, "factor": factor, "model": model}
        slow_ps = None if model == "none" else {"rank": ps_world - 1, "factor": factor, "model": model}
        out.append((f"ddp/{model}", model, {"_target_": DDP}, 2, slow_ddp))
        for st in staleness:
            strat = {"_target_": PS, "servers": servers, "max_staleness": st}
            if servers == "dedicated":
                strat["num_servers"] = 1
            out.append((f"ps_s={'null' if st is None else st}/{model}", model, strat, ps_world, slow_ps))
    return out


def _spread(vals: list[float]) -> dict[str, float] | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def run(
    reps: int = 3,
    steps: int = 80,
    batch: int = 256,
    hidden: int = 512,
    lr: float = 1e-3,
    factor: float = 2.0,
    models: tuple = ("idle", "busy"),
    staleness: tuple = (None,),
    servers: str = "colocated",
    smooth_batches: int = 10,
    timeout: float = 600.0,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the comparison; returns (and writes) the figures. See the module docstring."""
    base = {"steps": steps, "batch": batch, "hidden": hidden, "lr": lr}
    configs = _configs(tuple(models), tuple(staleness), servers, factor)
    raw: dict[str, list[list[dict]]] = {}
    load: list[float] = []
    t_start = time.time()
    for rep in range(reps):
        for name, _, strat, world, slow in (configs if rep % 2 == 0 else configs[::-1]):  # alternate order
            cfg = {**base, "name": name, "strategy": strat, "slowdown": slow}
            load.append(os.getloadavg()[0])
            raw.setdefault(name, []).append(_launch(cfg, world, timeout))
    ref = _analyse(raw["ddp/none"][0], None, smooth_batches)["curve"]
    target = ref[len(ref) // 2][2]
    runs = {name: [_analyse(r, target, smooth_batches) for r in rs] for name, rs in raw.items()}

    table: dict[str, dict[str, Any]] = {}
    for name, model, _, _, _ in configs:
        rs = runs[name]
        row: dict[str, Any] = {
            "straggler": model,
            "samples_per_sec": _spread([r["samples_per_sec"] for r in rs]),
            "seconds_to_target": _spread([r["seconds_to_target"] for r in rs]),
            "samples_to_target": _spread([r["samples_to_target"] for r in rs]),
            "final_loss": _spread([r["final_loss"] for r in rs]),
            "per_worker_steps": rs[0]["per_worker_steps"],
            "phases_ms": rs[0]["phases_ms"],
            "staleness_hist": rs[0]["summary"].get("ps_staleness_hist"),
            "worker_wait_s": rs[0]["summary"].get("ps_worker_wait_s"),
            "server_busy_s": rs[0]["summary"].get("ps_server_busy_s"),
            "server_apply_s": rs[0]["summary"].get("ps_server_apply_s"),
            "server_reply_s": rs[0]["summary"].get("ps_server_reply_s"),
            "elapsed_s": _spread([r["elapsed_s"] for r in rs]),
        }
        if name.startswith("ps_"):  # paired with the ddp run of the same repetition and model
            ddp = runs[f"ddp/{model}"]
            row["throughput_vs_ddp"] = _spread([r["samples_per_sec"] / d["samples_per_sec"] for r, d in zip(rs, ddp)])
            row["time_to_target_speedup"] = _spread([
                d["seconds_to_target"] / r["seconds_to_target"] for r, d in zip(rs, ddp)
                if r["seconds_to_target"] and d["seconds_to_target"]])
        table[name] = row
    checks = []
    for model, wants in TARGETS.items():
        for st in staleness:
            name = f"ps_s={'null' if st is None else st}/{model}"
            if name not in table:
                continue
            for key, want in wants.items():
                got = table[name].get(key) or {}
                checks.append({"run": name, "figure": key, "target": want, "median": got.get("median"),
                               "min": got.get("min"), "max": got.get("max"),
                               "met": bool(got) and got["median"] >= want})
    result = {
        "benchmark": "straggler",
        "config": {**base, "reps": reps, "factor": factor, "models": list(models), "staleness": list(staleness),
                   "servers": servers, "target_loss": target, "smooth_batches": smooth_batches,
                   "model": f"MLP 64-{hidden}-{hidden}-10", "data": "digits", "optimizer": "Adam", "device": "cpu",
                   "threads_per_process": 1},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_1min_at_launches": _spread(load)},
        "wall_s": time.time() - t_start,
        "results": table,
        "targets": checks,
        "ideal_speedup": (1 + 1 / factor) / (2 / factor),
    }
    _write(result, Path(out_dir) if out_dir else RESULTS)
    return result


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _fs(v: dict | None, spec: str = ".2f") -> str:
    """A spread as ``median [min-max]``."""
    if not v:
        return "-"
    return f"{format(v['median'], spec)} [{format(v['min'], spec)}-{format(v['max'], spec)}]"


def markdown(result: dict) -> str:
    c = result["config"]
    procs = "2 processes (each trains and serves one shard)" if c["servers"] == "colocated" else "1 server + 2 workers"
    ld = result["machine"].get("load_avg_1min_at_launches")
    lines = [
        "# Straggler: parameter_server vs ddp",
        "",
        f"{c['model']} on digits, Adam lr {c['lr']}, global batch {c['batch']}, {c['steps']} steps per worker, "
        f"{c['reps']} alternating repetitions: median [min-max]; ratios paired per repetition. One of two workers "
        f"slowed {c['factor']}x with trainer.slowdown: `idle` (sleeps: a separate slower device) or `busy` (extra "
        f"compute on the shared cores). CPU, {result['machine']['cpus']} cores, 1 thread per process "
        f"(ddp: 2 processes; parameter_server, servers={c['servers']}: {procs}). Target loss "
        f"{c['target_loss']:.4f} (no-straggler ddp, halfway). Ideal async speedup {result['ideal_speedup']:.2f}."
        + (f" 1-min load average at the launches: {_fs(ld, '.1f')}." if ld else ""),
        "",
        "| run | samples/s | vs ddp | time to target (s) | speedup | final loss | staleness hist |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["results"].items():
        lines.append(
            f"| {name} | {_fs(r['samples_per_sec'], '.0f')} | {_fs(r.get('throughput_vs_ddp'))} | "
            f"{_fs(r['seconds_to_target'])} | {_fs(r.get('time_to_target_speedup'))} | {_fs(r['final_loss'], '.3f')} | "
            f"{r.get('staleness_hist') or '-'} |"
        )
    lines += ["", "Targets (median of the paired ratios):", "", "| run | figure | target | measured | met |",
              "|---|---|---|---|---|"]
    for t in result.get("targets", []):
        lines.append(f"| {t['run']} | {t['figure']} | >= {t['target']} | {_fmt(t['median'])} "
                     f"[{_fmt(t['min'])}-{_fmt(t['max'])}] | {'yes' if t['met'] else 'no'} |")
    lines += ["", "Where the time goes (first repetition): mean ms per step and phase on each rank; servers' "
              "seconds handling messages (of which optimizer / replies):", ""]
    for name, r in result["results"].items():
        ph = "; ".join(f"rank {rk}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(p.items()))
                       for rk, p in sorted(r["phases_ms"].items()))
        srv = ""
        if r.get("server_busy_s"):
            srv = f" | servers busy {r['server_busy_s']} s (optimizer {r['server_apply_s']}, replies {r['server_reply_s']})"
        lines.append(f"- {name} (elapsed {_fs(r['elapsed_s'], '.1f')} s): {ph}{srv}")
    lines.append("")
    return "\n".join(lines) + "\n"


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "straggler.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "straggler.md").write_text(markdown(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--models", default="idle,busy", help="straggler models, comma-separated: idle,busy")
    ap.add_argument("--servers", default="colocated", choices=["colocated", "dedicated"])
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args()
    res = run(reps=a.reps, steps=a.steps, batch=a.batch, hidden=a.hidden, factor=a.factor,
              models=tuple(m for m in a.models.split(",") if m), servers=a.servers, out_dir=a.out_dir)
    print(Path(a.out_dir or RESULTS, "straggler.md").read_text())
    print(f"wall {res['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
