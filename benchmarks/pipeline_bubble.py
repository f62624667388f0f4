"""Pipeline bubble: measured against GPipe's formula, and the speedup micro-batching buys.

K balanced stages (one process each, gloo on CPU or NCCL on GPUs), a fixed global batch split
into M micro-batches, M in {1, 2, 4, 8}. For each M the strategy's own metrics give the measured
bubble fraction (mean over stages of 1 - busy / step time; busy = forward + backward compute,
timed on each rank) and the step time; compared with

    bubble(M) = (K - 1) / (M + K - 1)          ideal speedup over M=1 = K * M / (M + K - 1)

Stages are stacks of width x width Linear+Tanh layers, wide enough that compute dominates the
point-to-point sends. ``python -m benchmarks.pipeline_bubble`` writes
benchmarks/results/pipeline_bubble.json and .md; ``run(**kwargs) -> dict`` is the same from Python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _model(width: int, layers: int):
    from torch import nn

    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods)


def _worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(cfg["threads"]))
    import torch
    from torch import nn

    from disttrain.env import DistEnv, destroy_process_group
    from disttrain.strategies.model_parallel import ModelParallelStrategy
    from disttrain.timing import StepTimer

    torch.set_num_threads(cfg["threads"])
    env = DistEnv.from_environ()
    use_cuda = cfg["device"] == "cuda" and torch.cuda.is_available()
    device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    per = 2 * cfg["layers_per_stage"]  # Linear + Tanh per layer
    placement = [{"modules": [f"{k * per}-{(k + 1) * per - 1}"], "rank": k} for k in range(world)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], cfg["width"], generator=g)
    y = torch.randn(cfg["batch"], cfg["width"], generator=g)
    results = []
    for m in cfg["microbatches"]:
        st = ModelParallelStrategy(placement=placement, microbatches=m, schedule=cfg["schedule"], report=False)
        st.validate(env)
        st.setup(env, device, "nccl" if use_cuda else "gloo", 120)
        torch.manual_seed(0)
        model = st.build_model(lambda: _model(cfg["width"], cfg["layers_per_stage"] * world))
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        timer = StepTimer(device)
        for _ in range(cfg["warmup"]):
            st.train_step(model, opt, [(x, y)], nn.MSELoss(), None, timer)
        st._run_totals = st._new_window()
        steps = []
        for _ in range(cfg["steps"]):
            t0 = time.perf_counter()
            st.train_step(model, opt, [(x, y)], nn.MSELoss(), None, timer)
            steps.append(time.perf_counter() - t0)
        w = st._run_totals
        results.append({
            "microbatches": m,
            "bubble_measured": st.bubble_fraction(),
            "step_ms_median": 1e3 * statistics.median(steps),
            "step_ms_all": [1e3 * s for s in steps],
            "pipeline_ms_mean": 1e3 * w["span"] / w["steps"],
            "stage_busy_ms": [1e3 * w["busy"][k] / w["steps"] for k in sorted(w["busy"])],
        })
    destroy_process_group()
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(results, f)


def run(
    stages: int = 2,
    microbatches: tuple[int, ...] | list[int] = (1, 2, 4, 8),
    batch: int = 256,
    width: int = 512,
    layers_per_stage: int = 4,
    steps: int = 6,
    warmup: int = 2,
    schedule: str = "gpipe",
    device: str = "cpu",
    threads: int = 1,
    timeout_s: float = 900,
    write: bool = True,
) -> dict[str, Any]:
    """Measure; returns (and with ``write`` saves) the figures with the formula beside them."""
    import socket

    import torch
    import torch.multiprocessing as mp

    cfg = dict(microbatches=list(microbatches), batch=batch, width=width, layers_per_stage=layers_per_stage,
               steps=steps, warmup=warmup, schedule=schedule, device=device, threads=threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, stages, port, cfg, out), daemon=True) for r in range(stages)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        for p in procs:
            if p.is_alive():
                p.kill()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"pipeline benchmark ranks exited with {[p.exitcode for p in procs]}")
        rows = json.loads(Path(out, "result.json").read_text())
    k = stages
    base = next((r["step_ms_median"] for r in rows if r["microbatches"] == 1), None)
    for r in rows:
        m = r["microbatches"]
        r["bubble_formula"] = (k - 1) / (m + k - 1)
        r["bubble_error"] = r["bubble_measured"] - r["bubble_formula"]
        r["speedup"] = base / r["step_ms_median"] if base else None
        r["speedup_ideal"] = k * m / (m + k - 1)
        r["speedup_ratio"] = r["speedup"] / r["speedup_ideal"] if base else None
    at4 = next((r for r in rows if r["microbatches"] == 4), None)
    result = {
        "config": {"stages": k, **cfg},
        "rows": rows,
        "targets": {
            "bubble_within_0.05": all(abs(r["bubble_error"]) <= 0.05 for r in rows),
            "speedup_at_M4_ge_0.85_ideal": bool(at4 and at4["speedup_ratio"] and at4["speedup_ratio"] >= 0.85),
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "wall_s": time.perf_counter() - t0,
    }
    if write:
        _write(result)
    return result


def _write(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline_bubble.json").write_text(json.dumps(result, indent=2))
    c = result["config"]
    lines = [
        f"# Pipeline bubble (K={c['stages']} stages, {c['schedule']}, {c['device']}, batch {c['batch']}, "
        f"width {c['width']}, {c['layers_per_stage']} layers/stage, {c['steps']} steps after {c['warmup']} warm-up)",
        "",
        "| M | bubble measured | formula (K-1)/(M+K-1) | diff | step ms (median) | speedup vs M=1 | ideal K*M/(M+K-1) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['microbatches']} | {r['bubble_measured']:.3f} | {r['bubble_formula']:.3f} | {r['bubble_error']:+.3f} | "
            f"{r['step_ms_median']:.1f} | {r['speedup']:.2f} | {r['speedup_ideal']:.2f} | {r['speedup_ratio']:.2f} |"
        )
    t = result["targets"]
    lines += ["", f"Targets: bubble within 0.05 of the formula: {t['bubble_within_0.05']}; speedup at M=4 >= 0.85 x "
              f"ideal: {t['speedup_at_M4_ge_0.85_ideal']}.", "",
              f"Machine: {result['machine']}"]
    (RESULTS / "pipeline_bubble.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers-per-stage", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--schedule", default="gpipe", choices=["gpipe", "1f1b"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    res = run(stages=a.stages, microbatches=a.microbatches, batch=a.batch, width=a.width,
              layers_per_stage=a.layers_per_stage, steps=a.steps, warmup=a.warmup, schedule=a.schedule,
              device=a.device, write=not a.no_write)
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k != "step_ms_all"} for r in res["rows"]],
                      "targets": res["targets"]}, indent=1))


if __name__ == "__main__":
    main()
