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


def _model(width: int, layers: int, compute: str = "matmul", sleep_ms_per_sample: float = 0.05):
    """``layers`` x (Linear + Tanh), or with ``compute="sleep"`` x (Linear + a layer that holds
    the stage for a time proportional to the micro-batch, 2x as long backward): a stage whose
    work does not need the host CPU, as a GPU's does not. That isolates the schedule and the
    messages from CPU contention on a shared machine (labelled as such in the results)."""
    from torch import nn

    mods: list = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), _SleepLayer(sleep_ms_per_sample) if compute == "sleep" else nn.Tanh()]
    return nn.Sequential(*mods)


def _sleep_fn():
    import torch

    class Sleep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, ms):
            ctx.ms = ms * x.shape[0]
            time.sleep(ctx.ms / 1e3)
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            time.sleep(2 * ctx.ms / 1e3)
            return g, None

    return Sleep


class _SleepLayer:  # made an nn.Module lazily (torch is imported in the workers only)
    def __new__(cls, ms: float):
        from torch import nn

        class SleepLayer(nn.Module):
            def __init__(self, ms: float) -> None:
                super().__init__()
                self.ms = ms

            def forward(self, x):
                return _sleep_fn().apply(x, self.ms)

        return SleepLayer(ms)


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
    runs = {}
    for m in cfg["microbatches"]:
        st = ModelParallelStrategy(placement=placement, microbatches=m, schedule=cfg["schedule"], report=False)
        st.validate(env)
        st.setup(env, device, "nccl" if use_cuda else "gloo", 120)
        torch.manual_seed(0)
        model = st.build_model(
            lambda: _model(cfg["width"], cfg["layers_per_stage"] * world, cfg["compute"], cfg["sleep_ms_per_sample"])
        )
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        runs[m] = (st, model, opt, {"step": [], "bubble": [], "busy": []})
    timer = StepTimer(device)
    # interleaved rounds (every M once per round), so a change in machine load hits every M alike;
    # per-step figures, medians reported (robust to a step slowed by another process)
    for rnd in range(cfg["warmup"] + cfg["steps"]):
        for m, (st, model, opt, rec) in runs.items():
            t0 = time.perf_counter()
            st.train_step(model, opt, [(x, y)], nn.MSELoss(), None, timer)
            dt = time.perf_counter() - t0
            metrics = st.log_metrics()  # this step's window
            if rnd >= cfg["warmup"]:
                rec["step"].append(dt)
                rec["bubble"].append(metrics["pipeline/bubble_fraction"])
                rec["busy"].append([metrics[f"pipeline/stage{k}_busy_ms"] for k in range(world)])
    results = []
    for m, (st, model, opt, rec) in runs.items():
        results.append({
            "microbatches": m,
            "bubble_measured": statistics.median(rec["bubble"]),
            "bubble_all": rec["bubble"],
            "step_ms_median": 1e3 * statistics.median(rec["step"]),
            "step_ms_all": [1e3 * v for v in rec["step"]],
            "stage_busy_ms_median": [statistics.median(b[k] for b in rec["busy"]) for k in range(world)],
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
    steps: int = 10,
    warmup: int = 2,
    schedule: str = "gpipe",
    device: str = "cpu",
    threads: int = 1,
    compute: str = "matmul",
    sleep_ms_per_sample: float = 0.05,
    timeout_s: float = 900,
    write: bool = True,
) -> dict[str, Any]:
    """Measure; returns (and with ``write`` saves) the figures with the formula beside them."""
    import socket

    import torch
    import torch.multiprocessing as mp

    cfg = dict(microbatches=list(microbatches), batch=batch, width=width, layers_per_stage=layers_per_stage,
               steps=steps, warmup=warmup, schedule=schedule, device=device, threads=threads,
               compute=compute, sleep_ms_per_sample=sleep_ms_per_sample)
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
    c = result["config"]
    stem = "pipeline_bubble" + ("_sleep" if c["compute"] == "sleep" else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Pipeline bubble (K={c['stages']} stages, {c['schedule']}, {c['device']}, compute={c['compute']}, batch {c['batch']}, "
        f"width {c['width']}, {c['layers_per_stage']} layers/stage, {c['steps']} interleaved rounds after {c['warmup']} "
        f"warm-up; medians of per-step figures)",
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
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers-per-stage", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--schedule", default="gpipe", choices=["gpipe", "1f1b"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compute", default="matmul", choices=["matmul", "sleep"],
                    help="matmul: real compute-bound stages; sleep: stages that hold without using the host CPU")
    ap.add_argument("--sleep-ms-per-sample", type=float, default=0.05)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    res = run(stages=a.stages, microbatches=a.microbatches, batch=a.batch, width=a.width,
              layers_per_stage=a.layers_per_stage, steps=a.steps, warmup=a.warmup, schedule=a.schedule,
              device=a.device, compute=a.compute, sleep_ms_per_sample=a.sleep_ms_per_sample, write=not a.no_write)
    print(json.dumps({"rows": [{k: v for k, v in r.items() if not k.endswith("_all")} for r in res["rows"]],
                      "targets": res["targets"]}, indent=1))


if __name__ == "__main__":
    main()
