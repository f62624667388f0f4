"""Straggler benchmark: asynchronous parameter server vs synchronous DDP with one slow worker.

Two data-parallel workers train the same MLP on digits with the same global batch, through the
Trainer (the same code path as ``python -m disttrain``): ``ddp`` on 2 ranks, and
``parameter_server`` with 1 server + 2 workers (3 ranks) at ``max_staleness`` null and 4. One
worker is slowed by ``factor`` with the Trainer's straggler knob (``trainer.slowdown``: extra
busy work, not sleep). Configurations are run alternately, ``reps`` times each, and once more
without a straggler (ddp vs parameter_server s=null: the cost of the extra process and messages).

Measured per run, from every worker's per-batch records (monotonic clock, shared by processes):

* samples/s: samples processed by all workers while *all* were still training (from the latest
  worker's 10th batch to the earliest worker's last one) / that time. Both PS workers train the
  same number of steps, so the fast one finishes first; the window excludes the tail where the
  slow one trains alone.
* samples-to-target: total samples processed (all workers, in time order) when the training loss
  (mean of the last 10 global batches' worth of records) first falls to the target, and the time
  to get there. The target is the loss the no-straggler ddp run reaches halfway through.

With one of two workers slowed 2x the ideal async speedup is (1 + 1/2) / (2 * 1/2) = 1.5; the
bounded runs cannot keep it forever: a worker may be only ``s`` steps ahead of the slowest, so a
*persistent* straggler eventually paces everyone (bounded staleness absorbs transient ones).

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
        curve.append((total, t - start, sum(l for _, l, _ in last) / len(last)))
    hit = next(((smp, sec) for smp, sec, l in curve if target is not None and l <= target), (None, None))
    return {
        "samples_per_sec": window / max(t1 - t0, 1e-9),
        "per_worker_steps": [len(rs) for rs in recs],
        "samples_to_target": hit[0],
        "seconds_to_target": hit[1],
        "final_loss": curve[-1][2],
        "curve": curve,
        "summary": next((r["summary"] for r in ranks if r["rank"] == 0), {}),
    }


def run(
    reps: int = 2,
    steps: int = 80,
    batch: int = 256,
    hidden: int = 512,
    lr: float = 1e-3,
    factor: float = 2.0,
    staleness: tuple = (None, 4),
    smooth_batches: int = 10,
    timeout: float = 600.0,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the comparison; returns (and writes) the figures. See the module docstring."""
    slow_ddp = {"rank": 1, "factor": factor}
    slow_ps = {"rank": 2, "factor": factor}  # rank 0 serves; workers are ranks 1 and 2
    base = {"steps": steps, "batch": batch, "hidden": hidden, "lr": lr}
    configs = [("ddp", {"_target_": DDP}, 2, slow_ddp)]
    for s in staleness:
        configs.append((f"ps_s={'null' if s is None else s}", {"_target_": PS, "num_servers": 1, "max_staleness": s}, 3, slow_ps))
    clean = [("ddp_no_straggler", {"_target_": DDP}, 2, None),
             ("ps_s=null_no_straggler", {"_target_": PS, "num_servers": 1, "max_staleness": None}, 3, None)]
    raw: dict[str, list[list[dict]]] = {}
    t_start = time.time()
    for rep in range(reps):
        for name, strat, world, slow in (clean + configs) if rep == 0 else (configs + clean):  # alternate order
            cfg = {**base, "name": name, "strategy": strat, "slowdown": slow}
            raw.setdefault(name, []).append(_launch(cfg, world, timeout))
    # target: the loss the no-straggler ddp run reaches halfway through (first repetition)
    ref = _analyse(raw["ddp_no_straggler"][0], None, smooth_batches)["curve"]
    target = ref[len(ref) // 2][2]
    runs = {name: [_analyse(r, target, smooth_batches) for r in rs] for name, rs in raw.items()}

    def med(name: str, key: str) -> float | None:
        vals = [r[key] for r in runs[name] if r[key] is not None]
        return statistics.median(vals) if vals else None

    table = {}
    for name in runs:
        table[name] = {
            "samples_per_sec": med(name, "samples_per_sec"),
            "samples_per_sec_runs": [round(r["samples_per_sec"], 1) for r in runs[name]],
            "samples_to_target": med(name, "samples_to_target"),
            "seconds_to_target": med(name, "seconds_to_target"),
            "final_loss": med(name, "final_loss"),
            "per_worker_steps": runs[name][0]["per_worker_steps"],
            "staleness_hist": runs[name][0]["summary"].get("ps_staleness_hist"),
            "worker_wait_s": runs[name][0]["summary"].get("ps_worker_wait_s"),
        }
    ddp = table["ddp"]
    for name, row in table.items():
        if name.startswith("ps_"):
            ref_row = table["ddp_no_straggler"] if name.endswith("no_straggler") else ddp
            row["throughput_vs_ddp"] = row["samples_per_sec"] / ref_row["samples_per_sec"]
            if row["samples_to_target"] and ref_row["samples_to_target"]:
                row["samples_to_target_vs_ddp"] = row["samples_to_target"] / ref_row["samples_to_target"]
            if row["seconds_to_target"] and ref_row["seconds_to_target"]:
                row["time_to_target_speedup"] = ref_row["seconds_to_target"] / row["seconds_to_target"]
    result = {
        "benchmark": "straggler",
        "config": {**base, "reps": reps, "factor": factor, "staleness": list(staleness), "target_loss": target,
                   "smooth_batches": smooth_batches, "model": f"MLP 64-{hidden}-{hidden}-10", "data": "digits",
                   "optimizer": "Adam", "device": "cpu", "threads_per_process": 1},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "wall_s": time.time() - t_start,
        "results": table,
        "ideal_speedup": (1 + 1 / factor) / (2 / factor),
    }
    _write(result, Path(out_dir) if out_dir else RESULTS)
    return result


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "straggler.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    c = result["config"]
    lines = [
        "# Straggler: parameter_server vs ddp",
        "",
        f"{c['model']} on digits, Adam lr {c['lr']}, global batch {c['batch']}, {c['steps']} steps per worker, "
        f"{c['reps']} alternating repetitions (median shown); one of two workers slowed {c['factor']}x with "
        f"trainer.slowdown. CPU, {result['machine']['cpus']} cores, 1 thread per process "
        f"(ddp: 2 processes; parameter_server: 1 server + 2 workers = 3 processes). Target loss "
        f"{c['target_loss']:.4f} (no-straggler ddp, halfway). Ideal async speedup {result['ideal_speedup']:.2f}.",
        "",
        "| run | samples/s | vs ddp | samples to target | vs ddp | time to target (s) | speedup | staleness hist |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["results"].items():
        lines.append(
            f"| {name} | {_fmt(r['samples_per_sec'], '.0f')} | {_fmt(r.get('throughput_vs_ddp'))} | "
            f"{_fmt(r['samples_to_target'], '.0f')} | {_fmt(r.get('samples_to_target_vs_ddp'))} | "
            f"{_fmt(r['seconds_to_target'])} | {_fmt(r.get('time_to_target_speedup'))} | {r.get('staleness_hist') or '-'} |"
        )
    lines.append("")
    (out / "straggler.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args()
    res = run(reps=a.reps, steps=a.steps, batch=a.batch, hidden=a.hidden, factor=a.factor, out_dir=a.out_dir)
    print(Path(a.out_dir or RESULTS, "straggler.md").read_text())
    print(f"wall {res['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
