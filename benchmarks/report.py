"""Writing a sweep out: results.json, points.csv, comm.csv, PNG plots and report.md."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from benchmarks import stats

CSV_FIELDS = ["kind", "strategy", "model", "params", "world_size", "per_rank_batch", "global_batch", "status",
              "samples_per_sec", "efficiency", "speedup", "step_ms_median", "step_ms_p10", "step_ms_p90",
              *[f"{c}_ms" for c in stats.CATEGORIES], "peak_rss_mb_max", "peak_gpu_mb_max", "device", "error"]


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except Exception:
        commit = ""
    # a copy of the tree without .git (a GPU machine, a container) names its commit here
    commit = commit or os.environ.get("DISTTRAIN_GIT_COMMIT", "") or "unknown"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        import disttrain

        dt_version = getattr(disttrain, "__version__", "")
    except Exception:
        dt_version = ""
    return {
        "host": platform.node(), "os": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1) if mem_gb else None, "load_avg": os.getloadavg(),
        "python": platform.python_version(), "torch": torch.__version__, "disttrain": dt_version,
        "git_commit": commit, "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": gpus, "device": gpus[0] if gpus else "cpu",
        "backend": "nccl" if gpus else "gloo",
    }


def _nan(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _nan(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_nan(x) for x in v]
    return v


def _row(p: dict[str, Any]) -> dict[str, Any]:
    step = p.get("step_ms") or {}
    bd = p.get("breakdown_ms") or {}
    row = {k: p.get(k, "") for k in CSV_FIELDS}
    row.update(step_ms_median=step.get("median", ""), step_ms_p10=step.get("p10", ""), step_ms_p90=step.get("p90", ""))
    row.update({f"{c}_ms": bd.get(c, "") for c in stats.CATEGORIES})
    row["peak_rss_mb_max"] = max(p["peak_rss_mb"]) if p.get("peak_rss_mb") else ""
    row["peak_gpu_mb_max"] = max(p["peak_gpu_mb"]) if p.get("peak_gpu_mb") else ""
    return {k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def write_all(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    (out / "results.json").write_text(json.dumps(_nan(res), indent=1, default=str) + "\n")
    rows = [_row(p) for p in res.get("scaling", [])]
    rows += [_row(p) for p in (res.get("batch") or {}).get("points", [])]
    rows += [_row(p) for p in (res.get("overhead") or {}).get("launches", [])]
    with open(out / "points.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    comm_rows = [row for c in res.get("comm", []) if c.get("status") == "ok" for row in c["rows"]]
    if comm_rows:
        with open(out / "comm.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(comm_rows[0]))
            w.writeheader()
            w.writerows(comm_rows)
    plots(res, out)
    (out / "report.md").write_text(markdown(res, out))


# ---------------------------------------------------------------------- plots
def plots(res: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        made.append(out / name)

    scaling = [r for r in res.get("scaling", []) if r.get("status") == "ok"]
    if scaling:
        models = sorted({r["model"] for r in scaling})
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
        fig2, axes2 = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
        for ax, ax2, model in zip(axes[0], axes2[0], models):
            rows = [r for r in scaling if r["model"] == model]
            for strat in sorted({r["strategy"] for r in rows}):
                rs = sorted((r for r in rows if r["strategy"] == strat), key=lambda r: r["world_size"])
                ax.plot([r["world_size"] for r in rs], [r["samples_per_sec"] for r in rs], "o-", label=strat)
                ax2.plot([r["world_size"] for r in rs], [r["efficiency"] for r in rs], "o-", label=strat)
            base = [r for r in rows if r["world_size"] == 1 and r["strategy"] == "ddp"]
            ns = sorted({r["world_size"] for r in rows})
            if base:
                ax.plot(ns, [n * base[0]["samples_per_sec"] for n in ns], "k--", lw=1, label="ideal (N x single)")
            ax2.axhline(1.0, color="k", ls="--", lw=1, label="ideal")
            for a, ylabel in ((ax, "samples/s"), (ax2, "efficiency E_N")):
                a.set_title(f"model {model}")
                a.set_xlabel("workers N")
                a.set_ylabel(ylabel)
                a.set_xticks(ns)
                a.grid(alpha=0.3)
                a.legend(fontsize=8)
            effs = [r["efficiency"] for r in rows if r["efficiency"] is not None and math.isfinite(r["efficiency"])]
            ax2.set_ylim(0, max([1.1, *(e * 1.1 for e in effs)]))
        save(fig, "throughput.png")
        save(fig2, "efficiency.png")

        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(scaling) + 2), 4.5))
        labels = [f"{r['strategy']} {r['model']} N={r['world_size']}" for r in scaling]
        bottom = [0.0] * len(scaling)
        for cat in stats.CATEGORIES:
            vals = [(r["breakdown_ms"] or {}).get(cat, 0.0) or 0.0 for r in scaling]
            ax.bar(range(len(scaling)), vals, bottom=bottom, label=cat)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(scaling)))
        ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("mean ms per step")
        ax.set_title("where a step's time goes (warm-up excluded)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        save(fig, "breakdown.png")

    comm = [c for c in res.get("comm", []) if c.get("status") == "ok"]
    if comm:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c in comm:
            rows = c["rows"]
            xs = [r["bytes"] for r in rows]
            ax.errorbar(xs, [r["busbw_GBps"] for r in rows],
                        yerr=[[r["busbw_GBps"] - r["busbw_GBps_p10"] for r in rows], [r["busbw_GBps_p90"] - r["busbw_GBps"] for r in rows]],
                        fmt="o-", capsize=2, label=f"busbw N={c['world_size']} ({c['backend']})")
            n, fit = c["world_size"], c["ring_fit"]
            if fit["bandwidth"] and math.isfinite(fit["bandwidth"]):
                model = [stats.busbw(s, stats.ring_time(s, n, fit["alpha_s"], fit["bandwidth"]), n) / 1e9 for s in xs]
                ax.plot(xs, model, ":", label=f"ring fit N={n}: a={fit['alpha_s'] * 1e6:.0f}us B={fit['bandwidth'] / 1e9:.2f}GB/s")
        mc = res.get("memcpy")
        if mc:
            ax.axhline(mc["bandwidth"] / 1e9, color="k", ls="--", label=f"memcpy {mc['bandwidth'] / 1e9:.1f} GB/s ({mc['device']})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("bus bandwidth (GB/s)")
        ax.set_title("allreduce busbw = algbw x 2(N-1)/N")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        save(fig, "busbw.png")

    batch = [p for p in (res.get("batch") or {}).get("points", []) if p["status"] == "ok"]
    if batch:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = [p["per_rank_batch"] for p in batch]
        ax.plot(xs, [p["samples_per_sec"] for p in batch], "o-", label="samples/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("per-rank batch")
        ax.set_ylabel("samples/s")
        ax2 = ax.twinx()
        ax2.plot(xs, [p["step_ms"]["median"] for p in batch], "s--", color="C1", label="ms per batch")
        ax2.set_ylabel("ms per batch (median)")
        ax.grid(alpha=0.3)
        fig.legend(fontsize=8, loc="upper left")
        save(fig, "batch.png")
    return made


# ---------------------------------------------------------------------- markdown
def _f(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def _mem_label(rows: list[dict[str, Any]]) -> str:
    """The memory column holds torch.cuda.max_memory_allocated where the ranks ran on GPUs."""
    return "peak GPU MB allocated" if any(r.get("peak_gpu_mb") for r in rows) else "peak RSS MB"


def scaling_table(rows: list[dict[str, Any]]) -> str:
    head = ("| strategy | model | N | samples/s | E_N | step ms median [p10, p90] | data | compute | comm | optimizer "
            f"| idle | other | {_mem_label(rows)} (max rank) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["model"], r["strategy"], r["world_size"])):
        if r.get("status") != "ok":
            lines.append(f"| {r['strategy']} | {r['model']} | {r['world_size']} | failed: {r.get('error', '')[:80]} |" + " |" * 9)
            continue
        s, b = r["step_ms"], r["breakdown_ms"]
        mem = max(r["peak_gpu_mb"]) if r.get("peak_gpu_mb") else max(r["peak_rss_mb"] or [0])
        lines.append(
            f"| {r['strategy']} | {r['model']} | {r['world_size']} | {_f(r['samples_per_sec'], '{:.0f}')} | {_f(r['efficiency'])} "
            f"| {_f(s['median'])} [{_f(s['p10'])}, {_f(s['p90'])}] | " + " | ".join(_f(b[c]) for c in stats.CATEGORIES)
            + f" | {_f(mem, '{:.0f}')} |"
        )
    return "\n".join(lines)


def overhead_text(o: dict[str, Any]) -> str:
    if o.get("failed"):
        return f"failed: {o['failed'][0]}\n"
    r, aa, ms = o["ratio"], o["aa"], o["step_ms"]
    return (
        f"disttrain ddp / raw torch DDP in the same processes, N={o['world_size']}, model {o['model']} "
        f"({o['params']} params, per-rank batch {o['per_rank_batch']}), {o['rounds']} rounds of one step each, "
        f"order alternating (A1 B A2, A2 B A1), "
        f"{'each through its own loader' if o.get('loaders') else 'the same batches'}:\n\n"
        f"| comparison | median of per-round ratios | p10 | p90 | rounds |\n|---|---|---|---|---|\n"
        f"| disttrain ddp / raw DDP (B/A1) | {_f(r['median'], '{:.3f}')} | {_f(r['p10'], '{:.3f}')} | {_f(r['p90'], '{:.3f}')} | {r['n']} |\n"
        f"| raw DDP / raw DDP (A2/A1, noise floor) | {_f(aa['median'], '{:.3f}')} | {_f(aa['p10'], '{:.3f}')} | {_f(aa['p90'], '{:.3f}')} | {aa['n']} |\n\n"
        f"Target: B/A1 median <= {o['target']}. Median step (ms): A1 {_f(ms['a1'])}, B {_f(ms['b'])}, A2 {_f(ms['a2'])}.\n"
    )


def markdown(res: dict[str, Any], out: Path) -> str:
    m = res["machine_start"]
    parts = [
        f"# Benchmark report: {res['name']}\n",
        f"Command: `{res['command']}`  \nStarted {res['started']}, took {res.get('duration_s', 0) / 60:.1f} min.\n",
        "## Machine\n",
        f"- host {m['host']}, {m['os']}\n- CPU: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM\n"
        f"- device: {m['device']} (backend {m['backend']}{', CUDA ' + str(m['cuda']) if m['cuda'] else ''})\n"
        f"- python {m['python']}, torch {m['torch']}, disttrain {m['disttrain']} (commit {m['git_commit']})\n"
        f"- load average (1, 5, 15 min) at start {tuple(round(x, 1) for x in m['load_avg'])}, at end "
        f"{tuple(round(x, 1) for x in res.get('load_end', ()))}: other work shared the machine, so absolute "
        f"figures are indicative; ratios come from alternated launches in the same run.\n",
        "## Method\n",
        "Every point is a real `torchrun --standalone` launch of `-m disttrain` (raw reference: "
        "`benchmarks/raw_ddp.py`; collectives: `-m benchmarks.comm`). Model: an MLP regressor on synthetic data, "
        "Adam, one torch thread per process on CPU. Weak scaling: every data shard gets the same per-rank batch, so the "
        f"global batch grows with N. The first {res['config']['warmup']} optimizer steps of every launch are dropped and "
        f"{res['config']['steps']} are measured. A step's time is the wall time between the ends of consecutive steps "
        "(`benchmarks/probe.py` records it per rank); samples/s = sum over data shards of shard batch / median step time "
        "of the shard's slowest rank; E_N = samples/s at N / (N x samples/s of ddp at N=1, the single process). "
        "The breakdown (mean ms per step, averaged over ranks): data wait; compute = forward + backward minus the "
        "exposed gradient-sync wait; communication = exposed allreduce wait after this rank's last gradient bucket was "
        "launched (DDP comm hook), minus idle; idle = time until the slowest rank launched its last bucket (waiting on "
        "others), plus strategy phases named wait/idle/bubble; optimizer; other = loop overhead not in a phase "
        "(logging, `loss.item()`). Peak memory: max RSS per rank (`getrusage`), or `torch.cuda.max_memory_allocated` on GPU. "
        "Spread: median and p10/p90 of measured step times pooled over ranks (median over repeats).\n",
    ]
    if res["skipped"]:
        parts.append("Skipped: " + "; ".join(res["skipped"]) + "\n")
    if "strategies" in res:
        parts.append("## Scaling\n")
        st = res["strategies"]
        parts.append("Strategies: " + ", ".join(
            f"{n} ({'ran' if s['available'] else 'not available yet: ' + s['reason']})" for n, s in st.items()) + "\n")
        models = {r["model"]: r["params"] for r in res.get("scaling", [])}
        cfgm = res["config"]["models"]
        parts.append("Models: " + "; ".join(
            f"`{k}` {v:,} params (depth {cfgm[k]['depth']}, per-rank batch {cfgm[k]['per_rank_batch']})" for k, v in models.items()) + "\n")
        parts.append(scaling_table(res.get("scaling", [])) + "\n")
        for png in ("throughput.png", "efficiency.png", "breakdown.png"):
            if (out / png).exists():
                parts.append(f"![{png}]({png})\n")
    if res.get("overhead"):
        parts.append("## Overhead against raw torch DDP (noise floor: A/A)\n")
        parts.append(overhead_text(res["overhead"]))
    if res.get("comm") is not None:
        parts.append("## Communication\n")
        mc = res.get("memcpy")
        if mc:
            parts.append(f"Memory-copy ceiling: {mc['bandwidth'] / 1e9:.2f} GB/s (median of 20 copies of "
                         f"{mc['bytes'] >> 20} MB on {mc['device']}, one thread; best {mc['best_bandwidth'] / 1e9:.2f} GB/s). "
                         "On one host every allreduce byte crosses memory, so busbw cannot exceed it.\n")
        for c in res["comm"]:
            if c.get("status") != "ok":
                parts.append(f"N={c['world_size']}: failed: {c.get('error', '')}\n")
                continue
            fit = c["ring_fit"]
            parts.append(f"### allreduce, N={c['world_size']}, {c['backend']} on {c['device_name']}\n")
            parts.append(f"Ring model fit T = 2(N-1)a + 2(N-1)/N x S/B: a = {_f(fit['alpha_s'] * 1e6, '{:.1f}')} us, "
                         f"B = {_f(fit['bandwidth'] / 1e9, '{:.2f}')} GB/s, median |relative error| {_f(fit['rel_err_median'] * 100, '{:.0f}')}%.\n")
            parts.append("| size | time us median [p10, p90] | algbw GB/s | busbw GB/s | ring model us |\n|---|---|---|---|---|")
            for r in c["rows"]:
                parts.append(f"| {_size(r['bytes'])} | {_f(r['time_us'], '{:.0f}')} [{_f(r['time_us_p10'], '{:.0f}')}, "
                             f"{_f(r['time_us_p90'], '{:.0f}')}] | {_f(r['algbw_GBps'], '{:.3f}')} | {_f(r['busbw_GBps'], '{:.3f}')} "
                             f"| {_f(r['ring_model_us'], '{:.0f}')} |")
            g = c["grad"]
            s = g["step_ms"]
            parts.append(f"\nGradient sync, {g['param_tensors']} parameter tensors ({g['params']:,} params, "
                         f"{g['bytes'] / 2**20:.1f} MB), forward+backward(+sync) ms, median [p10, p90], alternated:\n")
            parts.append("| variant | step ms | sync ms (minus no-sync median) |\n|---|---|---|")
            for k, label, sync in (("ddp_bucketed", f"disttrain ddp (bucketed, {g['bucket_cap_mb']} MB buckets, overlapped)", g["sync_ms_bucketed"]),
                                   ("per_tensor", "one allreduce per tensor after backward", g["sync_ms_per_tensor"]),
                                   ("no_sync", "backward only (no sync)", 0.0)):
                parts.append(f"| {label} | {_f(s[k]['median'])} [{_f(s[k]['p10'])}, {_f(s[k]['p90'])}] | {_f(sync)} |")
            parts.append("")
        if (out / "busbw.png").exists():
            parts.append("![busbw.png](busbw.png)\n")
    if res.get("batch"):
        bt = res["batch"]
        parts.append(f"## Batch size (N={bt['world_size']}, model {bt['model']}, ddp)\n")
        parts.append(f"| per-rank batch | ms per batch median [p10, p90] | samples/s | {_mem_label(bt['points'])} |\n|---|---|---|---|")
        for p in bt["points"]:
            if p["status"] != "ok":
                parts.append(f"| {p['per_rank_batch']} | failed: {p['error'][:80]} | | |")
                continue
            mem = max(p["peak_gpu_mb"]) if p.get("peak_gpu_mb") else max(p["peak_rss_mb"])
            parts.append(f"| {p['per_rank_batch']} | {_f(p['step_ms']['median'])} [{_f(p['step_ms']['p10'])}, "
                         f"{_f(p['step_ms']['p90'])}] | {_f(p['samples_per_sec'], '{:.0f}')} | {_f(mem, '{:.0f}')} |")
        knee = bt["knee"]
        parts.append("\n" + (f"A bigger batch stops paying after per-rank batch {knee}: the next size gains less than "
                             f"{bt['min_gain']:.0%} samples/s." if knee else
                             f"Every step up in batch still gained at least {bt['min_gain']:.0%} samples/s.") + "\n")
        if (out / "batch.png").exists():
            parts.append("![batch.png](batch.png)\n")
    if res.get("memory"):
        from benchmarks import memory

        parts.append("## Memory of model states, and activation checkpointing\n")
        parts.append(memory.markdown(res["memory"]))
    for mode, title in (("straggler", "Straggler: sync vs async"), ("pipeline", "Pipeline bubble")):
        if mode in res:
            r = res[mode]
            parts.append(f"## {title}\n")
            if r["status"] != "ok":
                parts.append(f"{r['status']}{': ' + r['error'] if r.get('error') else ''} (`{r['module']}`)\n")
            else:
                parts.append("```json\n" + json.dumps(_nan(r["result"]), indent=1, default=str)[:4000] + "\n```\n")
    return "\n".join(parts) + "\n"


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def rerender(out: Path) -> None:
    """Redraw the plots and report.md of ``out`` from its results.json (no launches):
    ``python -m benchmarks.report benchmarks/results/<name>``."""
    res = json.loads((Path(out) / "results.json").read_text())
    write_all(res, Path(out))


if __name__ == "__main__":
    import sys

    rerender(Path(sys.argv[1]))
