"""Sync or async, from measurement: ``python -m benchmarks advise [--nproc N] <the job's overrides>``.

1. **Probe.** The user's job runs a few steps under ``ddp`` on N ranks with the benchmark probe
   (``benchmarks/probe.py``: every rank's step records and the time it launches its last gradient
   bucket). Each rank's *own* time per step is its wall time minus its exposed wait in backward
   (``stats._ddp_split``): what the rank would take if nobody waited for anybody. The
   communication a step pays is the exposed wait minus the idle part (waiting on the slowest).
2. **Predict** the time to train ``--target-steps`` global steps:

   * ddp: every step waits for the slowest rank, ``sum_k (max_r own_r[k] + comm[k])``;
   * parameter_server at ``max_staleness`` s in (0, 1, 4, null), ``N`` workers (plus a server
     process): each worker steps at its own pace, paying ``comm`` per step for its push and
     pull, and may start step k only when every worker has finished step k - s - 1 (the
     servers' clock rule); the run needs ``target_steps x N x penalty[s]`` worker steps (each
     worker step is a 1/N share of the global batch). At s = 0 this is the ddp model exactly.
   * ``penalty[s]``: samples-to-target relative to ddp. Measured by the straggler benchmark
     (``benchmarks/results/straggler.json``: samples to the target loss of ps at s = 4 and null
     over ddp's), taken as at least 1 (staleness is not assumed to help); s = 1 takes s = 4's
     (its bound is tighter). ``--penalty s=value`` replaces them with the user's own.
3. **Recommend** the fastest, with every prediction printed.

The per-rank times cycle over the measured steps, so a transient straggler (one slow step in
several) and a persistent one (one slow rank) are both what the probe saw.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

from benchmarks import stats, sweep

RESULTS = Path(__file__).resolve().parent / "results"
DDP = "disttrain.strategies.ddp.DDPStrategy"
STALENESS: tuple[int | None, ...] = (0, 1, 4, None)


# ---------------------------------------------------------------------- the model (pure)
def ddp_time(own: Sequence[Sequence[float]], comm: float, steps: int) -> float:
    """Seconds for ``steps`` synchronous steps: each waits for the slowest rank, then communicates."""
    n = min(len(r) for r in own)
    return sum(max(r[k % n] for r in own) + comm for k in range(steps))


def ps_finish_times(own: Sequence[Sequence[float]], comm: float, staleness: int | None, steps: int) -> list[list[float]]:
    """When each worker finishes each of its first ``steps`` steps under the clock rule: worker r
    starts step k when it finished step k-1 and every worker finished step k-s-1."""
    n = min(len(r) for r in own)
    w = len(own)
    fin = [[0.0] * steps for _ in range(w)]
    for k in range(steps):
        gate = 0.0
        if staleness is not None and k - staleness - 1 >= 0:
            gate = max(fin[j][k - staleness - 1] for j in range(w))
        for r in range(w):
            start = max(fin[r][k - 1] if k else 0.0, gate)
            fin[r][k] = start + own[r][k % n] + comm
    return fin


def ps_time(own: Sequence[Sequence[float]], comm: float, staleness: int | None, steps: int, penalty: float = 1.0) -> float:
    """Seconds until the workers together finish ``steps x W x penalty`` worker steps."""
    w = len(own)
    need = math.ceil(steps * w * penalty)
    fin = ps_finish_times(own, comm, staleness, need)
    return sorted(t for row in fin for t in row)[need - 1]


def predict(own: Sequence[Sequence[float]], comm: float, steps: int, penalty: dict[Any, float]) -> dict[str, float]:
    """Predicted seconds to train ``steps`` global steps under ddp and ps at each staleness."""
    out = {"ddp": ddp_time(own, comm, steps)}
    for s in STALENESS:
        out[label(s)] = ps_time(own, comm, s, steps, penalty.get(s, 1.0))
    return out


def label(s: int | None) -> str:
    return f"parameter_server s={'null' if s is None else s}"


def recommend(pred: dict[str, float], margin: float = 0.05) -> str:
    """ddp unless a parameter-server setting is faster by more than ``margin`` (it costs an
    extra process and gives up exact synchronous SGD)."""
    best = min(pred, key=lambda k: pred[k])
    return best if best != "ddp" and pred[best] < pred["ddp"] * (1 - margin) else "ddp"


# ---------------------------------------------------------------------- from the probe's records
def own_times(records: Sequence[dict[str, Any]], warmup: int) -> tuple[list[list[float]], float, list[float]]:
    """Per rank, its own seconds per measured step (wall minus exposed wait); the median
    communication per step; the measured ddp step walls (rank 0)."""
    by_rank = {int(r["rank"]): r["steps"] for r in records if r.get("steps")}
    own: list[list[float]] = []
    comm: list[float] = []
    for rank in sorted(by_rank):
        walls = stats.step_walls(by_rank[rank], warmup)
        mine = []
        for j, wall in enumerate(walls):
            exposed, idle = stats._ddp_split(by_rank, rank, j + max(warmup, 1))
            mine.append(max(wall - exposed, 0.0))
            comm.append(exposed - idle)
        own.append(mine)
    measured = stats.step_walls(by_rank[min(by_rank)], warmup)
    return own, statistics.median(comm) if comm else 0.0, measured


def penalties(path: Path = RESULTS / "straggler.json", given: dict[Any, float] | None = None) -> dict[Any, float]:
    """Samples-to-target of ps over ddp, from the straggler benchmark's results (at least 1)."""
    out: dict[Any, float] = {0: 1.0, 1: 1.0, 4: 1.0, None: 1.0}
    try:
        res = json.loads(path.read_text())["results"]
        ddp = float(res["ddp"]["samples_to_target"])
        for s, key in ((4, "ps_s=4"), (None, "ps_s=null")):
            out[s] = max(1.0, float(res[key]["samples_to_target"]) / ddp)
        out[1] = out[4]
    except (OSError, KeyError, ValueError, TypeError, ZeroDivisionError):
        pass
    out.update(given or {})
    return out


# ---------------------------------------------------------------------- the probe launch
def probe(overrides: Sequence[str], nproc: int, steps: int, warmup: int, work: Path, timeout: float) -> list[dict[str, Any]]:
    """Run the job under ddp with the probe for ``warmup + steps`` steps; the ranks' records."""
    rec = work / "records"
    args = ["-m", "disttrain", *overrides, "strategy=ddp", "strategy._target_=benchmarks.probe.probed",
            f"+strategy.base={DDP}", f"+strategy.record_dir={rec}", "+strategy.probe_comm=true",
            f"trainer.max_steps={warmup + steps}", "trainer.progress_bar=false", "trainer.check_in_sync=false",
            f"trainer.log_every_n_steps={warmup + steps + 1}", f"hydra.run.dir={work / 'run'}"]
    rc, tail = sweep.torchrun(args, nproc, work / "probe.log", timeout)
    if rc != 0:
        raise RuntimeError(f"the probe run failed (exit {rc}):\n{tail}")
    return sweep.load_records(rec)


def run(overrides: Sequence[str], nproc: int = 2, steps: int = 12, warmup: int = 3, target_steps: int = 1000,
        penalty: dict[Any, float] | None = None, timeout: float = 300.0, work: Path | None = None) -> dict[str, Any]:
    """Probe, predict, recommend (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="disttrain-advise-") as tmp:
        records = probe(overrides, nproc, steps, warmup, Path(work or tmp), timeout)
    own, comm, measured = own_times(records, warmup)
    pen = penalties(given=penalty)
    pred = predict(own, comm, target_steps, pen)
    n = min(len(r) for r in own)
    return {
        "overrides": list(overrides), "nproc": nproc, "probe_steps": n, "target_steps": target_steps,
        "own_ms_median": [statistics.median(r) * 1e3 for r in own], "comm_ms": comm * 1e3,
        "own_ms": [[round(x * 1e3, 3) for x in r] for r in own],
        "ddp_step_ms_measured": statistics.median(measured) * 1e3,
        "ddp_step_ms_predicted": statistics.median(max(r[k] for r in own) + comm for k in range(n)) * 1e3,
        "penalty": {("null" if k is None else str(k)): v for k, v in pen.items()},
        "predicted_s": pred, "recommendation": recommend(pred),
    }


def markdown(res: dict[str, Any]) -> str:
    ddp = res["predicted_s"]["ddp"]
    lines = [
        f"probe: {res['nproc']} ranks under ddp, {res['probe_steps']} measured steps; own step time per rank (ms, median): "
        + ", ".join(f"{x:.1f}" for x in res["own_ms_median"]) + f"; communication {res['comm_ms']:.1f} ms/step; ddp "
        f"step (median) measured {res['ddp_step_ms_measured']:.1f} ms, modelled {res['ddp_step_ms_predicted']:.1f} ms",
        f"predicted time for {res['target_steps']} global steps (x samples-to-target penalty):", "",
        "| setting | penalty | predicted s | vs ddp |", "|---|---|---|---|",
    ]
    for name, sec in res["predicted_s"].items():
        key = name.rsplit("=", 1)[-1] if name != "ddp" else "0"
        lines.append(f"| {name} | {res['penalty'].get(key, 1.0):.2f} | {sec:.2f} | {ddp / sec:.2f}x |")
    lines += ["", f"recommendation: {res['recommendation']}"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks advise", description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the probe (the job's data-parallel size)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--target-steps", type=int, default=1000, help="global steps the job needs under ddp")
    ap.add_argument("--penalty", action="append", default=[], metavar="S=X",
                    help="samples-to-target of ps at staleness S over ddp (S: 1, 4 or null), e.g. --penalty 4=1.2")
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    given = {(None if k == "null" else int(k)): float(v) for k, v in (p.split("=", 1) for p in args.penalty)}
    res = run(args.overrides, args.nproc, args.steps, args.warmup, args.target_steps, given)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    print(markdown(res))
