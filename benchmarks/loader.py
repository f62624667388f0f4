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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512, 4096])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    print(markdown(run(tuple(args.batch_sizes), batches=args.batches, rounds=args.rounds)))


if __name__ == "__main__":
    main()
