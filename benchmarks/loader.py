"""Data loading: what ``Session.prepare_loader`` reads a TensorDataset with, against DataLoader's
per-sample path, side by side in one process.

The per-sample path (``default_collate``) indexes every sample and stacks them; disttrain's fast
path (``_BatchIndexed``) gathers each tensor once per batch with ``index_select``. Both run
through ``prepare_loader`` with the same sampler; the per-sample path is forced by a custom
``collate_fn`` (which disables the fast path). Rounds alternate A (per-sample) and B (fast) so a
shared machine's drift hits both; the reported figure is the median over rounds of A/B, with the
spread. One torch thread, CPU only: the host-side cost a GPU step waits for.

``python -m benchmarks.loader`` writes benchmarks/results/loader.json and .md;
``run(**kwargs) -> dict`` is the same from Python.

``python -m benchmarks.loader [--nproc N] <a run's overrides>`` (any argument with ``=``) instead
tries the candidate fixes for a data-loading bottleneck on *that run's* training dataset
(``data=...``, built as the run builds it) at its per-rank batch: worker processes, pinned memory,
a deeper prefetch, and one gather per batch (``__getitems__``: TensorDatasets and datasets that
define it). Each candidate is timed against the loader as configured, alternated in every round;
its speedup is the median over rounds of baseline / candidate ms per batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _ms_per_batch(loader, batches: int) -> float:
    it, n, t0 = iter(loader), 0, time.perf_counter()
    while n < batches:
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n += 1
    return (time.perf_counter() - t0) / batches * 1e3


def run(
    batch_sizes: tuple[int, ...] = (64, 512, 4096),
    features: int = 1024,
    samples: int = 32768,
    batches: int = 20,
    rounds: int = 5,
    write: bool = True,
) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset, default_collate

    import disttrain

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, features, generator=g), torch.randn(samples, 1, generator=g))
    session = disttrain.setup(strategy="single", accelerator="cpu")
    points = []
    try:
        for b in batch_sizes:
            fast = session.prepare_loader(DataLoader(data, batch_size=b, shuffle=True, drop_last=True))
            slow = session.prepare_loader(DataLoader(
                data, batch_size=b, shuffle=True, drop_last=True, collate_fn=lambda x: default_collate(x)))
            assert type(fast.loader.dataset).__name__ == "_BatchIndexed"
            _ms_per_batch(fast, 2), _ms_per_batch(slow, 2)  # warm-up
            a, bb = [], []
            for _ in range(rounds):
                a.append(_ms_per_batch(slow, batches))
                bb.append(_ms_per_batch(fast, batches))
            ratios = sorted(x / y for x, y in zip(a, bb))
            points.append({
                "batch": b,
                "per_sample_ms": statistics.median(a),
                "fast_ms": statistics.median(bb),
                "speedup_median": statistics.median(ratios),
                "speedup_min": ratios[0],
                "speedup_max": ratios[-1],
            })
    finally:
        session.close()
    result = {
        "what": "ms per batch reading a TensorDataset through prepare_loader: per-sample default_collate (A) "
                "vs one index_select per tensor (B), alternated A B in each of `rounds` rounds",
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": 1},
        "config": {"features": features, "samples": samples, "batches_per_round": batches, "rounds": rounds},
        "points": points,
    }
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "loader.json").write_text(json.dumps(result, indent=2))
        (RESULTS / "loader.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        "# Data loading: per-sample collate vs one gather per batch\n",
        f"{result['what']}. {c['features']} float32 features, {c['samples']} samples, {c['batches_per_round']} "
        f"batches per measurement, {c['rounds']} rounds; torch {result['machine']['torch']}, 1 thread.\n",
        "| batch | per-sample ms (median) | fast ms (median) | speedup median [min, max] |",
        "|---|---|---|---|",
    ]
    for p in result["points"]:
        lines.append(f"| {p['batch']} | {p['per_sample_ms']:.2f} | {p['fast_ms']:.2f} | "
                     f"{p['speedup_median']:.1f}x [{p['speedup_min']:.1f}, {p['speedup_max']:.1f}] |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- a run's own dataset
def _candidates(dataset: Any, batch: int, workers: int, cuda: bool) -> dict[str, dict[str, Any] | str]:
    """DataLoader options of each candidate, or why it does not apply."""
    from torch.utils.data import TensorDataset

    base: dict[str, Any] = {"batch_size": batch, "shuffle": True, "drop_last": True, "num_workers": workers}
    more = max(2, 2 * workers)
    out: dict[str, dict[str, Any] | str] = {
        f"num_workers={more}": {**base, "num_workers": more, "persistent_workers": True},
        f"num_workers={more} prefetch_factor=4": {**base, "num_workers": more, "persistent_workers": True,
                                                  "prefetch_factor": 4},
        "pin_memory": {**base, "pin_memory": True} if cuda else "needs CUDA (pinned pages speed host-to-GPU copies)",
    }
    if type(dataset) is TensorDataset:
        from disttrain.loaders import _batched, _BatchIndexed

        out["batch gather"] = {**base, "dataset": _BatchIndexed(dataset), "collate_fn": _batched}
    elif hasattr(dataset, "__getitems__"):
        out["batch gather"] = "already: the dataset defines __getitems__"
    else:
        out["batch gather"] = ("needs a TensorDataset or a dataset with __getitems__(indices) returning the whole "
                               "batch (then one read per batch, not one per sample)")
    return out


def run_dataset(overrides: list[str], nproc: int = 1, batches: int = 10, rounds: int = 3) -> dict[str, Any]:
    """Time the candidate fixes on the training dataset of the run ``overrides`` describe."""
    import torch
    from torch.utils.data import DataLoader

    from disttrain.cli import build_data
    from disttrain.estimate import compose

    torch.set_num_threads(1)
    cfg = compose(overrides)
    dataset, _ = build_data(cfg)
    batch = max(int(cfg.data.batch_size) // nproc, 1)
    workers = int(cfg.data.get("num_workers", 0) or 0)
    base = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers)
    rows: list[dict[str, Any]] = []
    for name, opts in _candidates(dataset, batch, workers, torch.cuda.is_available()).items():
        if isinstance(opts, str):
            rows.append({"candidate": name, "skipped": opts})
            continue
        opts = dict(opts)
        cand = DataLoader(opts.pop("dataset", dataset), **opts)
        _ms_per_batch(base, 1), _ms_per_batch(cand, 1)  # warm-up (workers start)
        a, b = [], []
        for _ in range(rounds):
            a.append(_ms_per_batch(base, batches))
            b.append(_ms_per_batch(cand, batches))
        ratios = sorted(x / y for x, y in zip(a, b))
        rows.append({"candidate": name, "baseline_ms": statistics.median(a), "ms": statistics.median(b),
                     "speedup_median": statistics.median(ratios), "speedup_min": ratios[0], "speedup_max": ratios[-1]})
    return {"overrides": overrides, "batch_per_rank": batch, "num_workers": workers,
            "dataset": type(dataset).__name__, "batches": batches, "rounds": rounds, "rows": rows}


def markdown_dataset(res: dict[str, Any]) -> str:
    lines = [f"# Data-loading fixes on {res['dataset']} (batch {res['batch_per_rank']} per rank, "
             f"num_workers={res['num_workers']} as configured; {res['batches']} batches x {res['rounds']} rounds)\n",
             "| candidate | baseline ms/batch | candidate ms/batch | speedup median [min, max] |", "|---|---|---|---|"]
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['candidate']} | - | - | not tried: {r['skipped']} |")
        else:
            lines.append(f"| {r['candidate']} | {r['baseline_ms']:.2f} | {r['ms']:.2f} | {r['speedup_median']:.2f}x "
                         f"[{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    if any("=" in a and not a.startswith("-") for a in sys.argv[1:]):
        ap_run = argparse.ArgumentParser(description="candidate data-loading fixes on a run's dataset")
        ap_run.add_argument("--nproc", type=int, default=1, help="data-parallel ranks of the run (batch per rank)")
        ap_run.add_argument("--rounds", type=int, default=3)
        ap_run.add_argument("--batches", type=int, default=10)
        ap_run.add_argument("overrides", nargs="*")
        a = ap_run.parse_args()
        print(markdown_dataset(run_dataset(a.overrides, a.nproc, a.batches, a.rounds)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512, 4096])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    print(markdown(run(tuple(args.batch_sizes), batches=args.batches, rounds=args.rounds)))


if __name__ == "__main__":
    main()
