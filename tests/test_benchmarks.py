"""The benchmark tool's logic: arithmetic against hand-computed numbers (no processes), and one
end-to-end run of ``python -m benchmarks size=tiny`` that launches real torchrun processes and
writes well-formed JSON/CSV/PNG/Markdown. No test asserts a timing."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import cli, stats, sweep

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- arithmetic
def test_scaling_efficiency_by_hand():
    # 1 worker 1000 samples/s; 4 workers 3000 samples/s -> 3000 / (4 x 1000) = 0.75
    assert stats.scaling_efficiency(3000.0, 4, 1000.0) == pytest.approx(0.75)
    assert stats.scaling_efficiency(2000.0, 2, 1000.0) == pytest.approx(1.0)
    assert stats.speedup(3000.0, 1000.0) == pytest.approx(3.0)
    assert math.isnan(stats.scaling_efficiency(1.0, 2, 0.0))


def test_busbw_by_hand():
    # 64 MiB in 10 ms: algbw 6.7108864 GB/s; N=4: x 2*3/4 = 1.5 -> 10.0663296 GB/s
    s = 64 * 2**20
    assert stats.algbw(s, 0.010) == pytest.approx(6.7108864e9)
    assert stats.busbw(s, 0.010, 4) == pytest.approx(10.0663296e9)
    # N=2: factor 2*1/2 = 1, busbw == algbw
    assert stats.busbw(1e6, 0.001, 2) == pytest.approx(1e9)
    # N=8: factor 2*7/8 = 1.75
    assert stats.busbw(1e6, 0.001, 8) == pytest.approx(1.75e9)
    assert math.isnan(stats.busbw(1e6, 0.001, 1))


def test_ring_model_and_fit_recover_known_parameters():
    # a = 50 us, B = 2 GB/s, N = 4: T(1 MB) = 6 x 50us + 1.5 x 1e6 / 2e9 = 300us + 750us
    assert stats.ring_time(1e6, 4, 50e-6, 2e9) == pytest.approx(1.05e-3)
    sizes = [4096 * 4**k for k in range(8)]
    times = [stats.ring_time(s, 4, 50e-6, 2e9) for s in sizes]
    fit = stats.fit_ring(sizes, times, 4)
    assert fit["alpha_s"] == pytest.approx(50e-6, rel=1e-6)
    assert fit["bandwidth"] == pytest.approx(2e9, rel=1e-6)
    assert fit["rel_err_median"] == pytest.approx(0.0, abs=1e-9)


def test_quantiles_and_knee():
    q = stats.quantiles([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    assert (q["median"], q["p10"], q["p90"], q["iqr"], q["n"]) == (6, 2, 10, 5, 11)
    # 1000 -> 1800 (+80%) -> 1900 (+5.6%): stops paying after 64
    assert stats.knee([16, 64, 256], [1000, 1800, 1900]) == 64
    assert stats.knee([16, 64], [1000, 1800]) is None


def _steps(ends, phases=None, **extra):
    return [{"t_end": t, "phases": dict(phases or {}), **extra} for t in ends]


def test_throughput_warmup_and_shards():
    # steps end at 0, 1, 1.1, 1.2, 1.3 s: warm-up 2 drops the first two intervals, measured 0.1 s each
    r0 = {"rank": 0, "world_size": 2, "shard": [0, 2], "steps": _steps([0, 1, 1.1, 1.2, 1.3])}
    r1 = {"rank": 1, "world_size": 2, "shard": [1, 2], "steps": _steps([0, 1, 1.2, 1.4, 1.6])}
    rate, spread = stats.throughput([r0, r1], global_batch=64, warmup=2)
    # shard 0: 32 samples / 0.1 s = 320; shard 1: 32 / 0.2 = 160
    assert rate == pytest.approx(480.0)
    assert spread["n"] == 6
    # two pipeline stages share one shard: counted once, at the slower stage's pace
    s0 = {"rank": 0, "world_size": 2, "shard": [0, 1], "steps": _steps([0, 1, 1.1, 1.2, 1.3])}
    s1 = {"rank": 1, "world_size": 2, "shard": [0, 1], "steps": _steps([0, 1, 1.2, 1.4, 1.6])}
    assert stats.throughput([s0, s1], 64, 2)[0] == pytest.approx(320.0)
    # a server with no steps adds nothing
    assert stats.throughput([r0, {"rank": 1, "world_size": 2, "steps": []}], 64, 2)[0] == pytest.approx(320.0)


def test_breakdown_splits_ddp_wait_into_comm_and_idle():
    # one measured step (warm-up 1). rank 0 launches its last bucket at 10.0 s, rank 1 at 10.3 s;
    # rank 0's backward ends at 10.5 s: exposed wait 0.5 s = 0.3 s idle (waiting on rank 1) + 0.2 s comm
    ph = {"data": 0.1, "forward": 0.2, "backward": 0.9, "optimizer": 0.1}
    r0 = [{"t_end": 8.0, "phases": ph}, {"t_end": 9.5, "phases": ph, "bucket_launch": [9.9, 10.0], "bwd_end": 10.5}]
    r1 = [{"t_end": 8.0, "phases": ph}, {"t_end": 9.5, "phases": ph, "bucket_launch": [10.1, 10.3], "bwd_end": 10.5}]
    bd0 = stats.breakdown({0: r0, 1: [dict(s) for s in r1]}, warmup=1)
    # rank 0: compute 1.1 - 0.5 = 0.6, comm 0.2, idle 0.3; rank 1: exposed 0.2, idle 0, compute 0.9, comm 0.2
    assert bd0["data"] == pytest.approx(0.1)
    assert bd0["optimizer"] == pytest.approx(0.1)
    assert bd0["idle"] == pytest.approx((0.3 + 0.0) / 2)
    assert bd0["communication"] == pytest.approx((0.2 + 0.2) / 2)
    assert bd0["compute"] == pytest.approx((0.6 + 0.9) / 2)
    # wall 1.5 s on both: rank 0 names 0.1+0.6+0.2+0.1+0.3 = 1.3, rank 1 0.1+0.9+0.2+0.1 = 1.3
    assert bd0["other"] == pytest.approx(0.2)
    assert sum(bd0.values()) == pytest.approx(1.5)
    assert stats.phase_category("server_wait") == "idle"
    assert stats.phase_category("push") == "communication"
    assert stats.phase_category("bubble") == "idle"


def test_other_is_wall_minus_named_phases():
    ph = {"data": 0.1, "forward": 0.2, "backward": 0.3, "optimizer": 0.1}
    steps = _steps([0.0, 1.0, 2.0], ph)
    bd = stats.breakdown({0: steps}, warmup=1)
    assert bd["other"] == pytest.approx(1.0 - 0.7)
    assert sum(bd.values()) == pytest.approx(1.0)


def test_model_sizes_and_overhead_ratios():
    assert sweep.mlp_params(64, 256, 2) == 64 * 256 + 256 + 256 * 256 + 256 + 256 + 1
    h = sweep.hidden_for_params(4_000_000, 64, 4)
    assert abs(sweep.mlp_params(64, h, 4) - 4_000_000) / 4_000_000 < 0.01
    # per-round ratios B/A1 1.0, 1.1, 1.3 and A2/A1 0.9, 1.0, 1.2: medians 1.1 and 1.0
    o = cli.overhead_summary({"ratio_b_over_a": [1.3, 1.0, 1.1], "ratio_a_over_a": [1.0, 0.9, 1.2], "rounds": 3,
                              "median_step_ms": {"a1": 10.0, "b": 11.0, "a2": 10.0}})
    assert o["ratio"]["median"] == pytest.approx(1.1) and o["ratio"]["n"] == 3
    assert o["aa"]["median"] == pytest.approx(1.0)


def test_combine_efficiency_against_single_process():
    def pt(strategy, n, rate):
        return sweep.Point("scaling", strategy, "m", n, 8, 8 * n, samples_per_sec=rate,
                           step_ms=dict(median=1.0, p10=1.0, p90=1.0, iqr=0.0),
                           breakdown_ms=dict.fromkeys(stats.CATEGORIES, 0.1), peak_rss_mb=[1.0] * n)
    rows = cli.combine([pt("ddp", 1, 100.0), pt("ddp", 2, 150.0), pt("ddp", 2, 170.0), pt("ps", 2, 120.0)])
    by = {(r["strategy"], r["world_size"]): r for r in rows}
    assert by[("ddp", 2)]["samples_per_sec"] == pytest.approx(160.0)  # median of the repeats
    assert by[("ddp", 2)]["efficiency"] == pytest.approx(0.8)
    assert by[("ps", 2)]["efficiency"] == pytest.approx(0.6)  # against ddp at N=1


def test_strategy_detection_by_config_file():
    st = sweep.strategy_status(["ddp", "no_such_strategy"])
    assert st["ddp"]["available"]
    assert not st["no_such_strategy"]["available"]
    assert "no conf/strategy/no_such_strategy.yaml" in st["no_such_strategy"]["reason"]


def test_external_modes_are_optional(monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setitem(cli.EXTERNAL, "straggler", "benchmarks.no_such_module_yet")
    res: dict = {}
    cli.run_external("straggler", OmegaConf.create({"straggler": {}}), res)
    assert res["straggler"]["status"] == "not available yet"
    assert cli.modes(OmegaConf.create({"mode": "all"})) == list(cli.MODES)
    with pytest.raises(SystemExit):
        cli.modes(OmegaConf.create({"mode": ["nope"]}))


# ---------------------------------------------------------------------- end to end
@pytest.mark.slow  # the whole tool, every mode; each mode's arithmetic is tested by hand above
@pytest.mark.timeout(900)
def test_tiny_sweep_end_to_end(tmp_path):
    """Four real torchrun launches (scaling at N=1 and 2, the overhead job, comm at N=2), then the
    outputs are parsed back. (The batch mode is the scaling launch with other batch sizes; its
    own arithmetic, the knee, is tested above.)"""
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "benchmarks", "size=tiny", "name=test", f"out_dir={out}",
           "mode=[scaling,overhead,comm]", "timeout_s=240"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the tool kills its torchrun launches (their own sessions) on SIGTERM
        output, _ = proc.communicate(timeout=30)
        pytest.fail("python -m benchmarks size=tiny did not finish in 840 s:\n" + output[-3000:])
    assert proc.returncode == 0, output[-4000:]

    res = json.loads((out / "results.json").read_text())
    scaling = {(r["strategy"], r["world_size"]): r for r in res["scaling"]}
    assert set(scaling) == {("ddp", 1), ("ddp", 2)}
    for r in scaling.values():
        assert r["status"] == "ok", r
        assert r["samples_per_sec"] > 0 and r["step_ms"]["median"] > 0
        assert len(r["peak_rss_mb"]) == r["world_size"] and min(r["peak_rss_mb"]) > 0
        assert set(r["breakdown_ms"]) == set(stats.CATEGORIES)
    two = scaling[("ddp", 2)]
    assert two["efficiency"] == pytest.approx(two["samples_per_sec"] / (2 * scaling[("ddp", 1)]["samples_per_sec"]))
    assert two["breakdown_ms"]["communication"] + two["breakdown_ms"]["idle"] > 0  # the comm hook saw buckets

    o = res["overhead"]  # one job: raw DDP twice and disttrain ddp in the same processes, rounds alternated
    assert not o["failed"] and o["world_size"] == 2 and len(o["ratio_b_over_a"]) == len(o["ratio_a_over_a"]) == o["rounds"]
    assert o["ratio"]["median"] == pytest.approx(float(np.median(o["ratio_b_over_a"])))
    assert all(r > 0 for r in o["ratio_b_over_a"] + o["ratio_a_over_a"])

    (comm,) = res["comm"]
    assert comm["status"] == "ok" and comm["world_size"] == 2 and comm["backend"] == "gloo"
    for row in comm["rows"]:
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"])  # N=2: factor 2(N-1)/N = 1
    assert comm["grad"]["param_tensors"] == 100
    assert res["memcpy"]["bandwidth"] > 0

    with open(out / "points.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["kind"] for r in rows} == {"scaling"}
    assert len(rows) == 2
    with open(out / "comm.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    for png in ("throughput.png", "efficiency.png", "breakdown.png", "busbw.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
    md = (out / "report.md").read_text()
    for text in ("## Machine", "torch 2.13.0", "python -m benchmarks size=tiny", "noise floor", "busbw", "E_N", "gloo"):
        assert text in md, text


def test_pipeline_benchmark_summary_by_hand():
    """The pipeline benchmark's arithmetic on made-up records: medians, ratio to the plain script,
    the schedule's bubble formula, memory ratios and the target counts; the Markdown has a row each."""
    from benchmarks import pipeline_bubble as pb

    assert pb.equal_cuts(8, 4) == [0, 2, 4, 6, 8] and pb.equal_cuts(5, 2) == [0, 2, 5]
    raw = {"scaling_batch": 64, "scaling": {"DP2 x PP2": [10.0, 20.0, 30.0], "DP4": [8.0]}, "schedules": [
        {"k": 2, "schedule": "gpipe", "m": 2, "ours_ms": [10.0, 12.0, 11.0], "plain_ms": [10.0, 10.0, 10.0],
         "bubble": [0.4, 0.5, 0.3], "memory_measured": [100.0, 230.0], "memory_predicted": [100.0, 200.0],
         "predicted_step_ms": 9.0},
        {"k": 2, "schedule": "zbv", "m": 4, "ours_ms": [20.0], "plain_ms": [21.0], "bubble": [0.2],
         "memory_measured": [50.0, 50.0], "memory_predicted": [50.0, 50.0]},
    ]}
    res = pb.summarise(raw)
    gpipe, zbv = res["rows"]
    assert gpipe["step_ms"] == 11.0 and gpipe["ratio"] == pytest.approx(1.1) and gpipe["bubble_measured"] == 0.4
    assert gpipe["bubble_formula"] == pytest.approx(1 / 3) and zbv["bubble_formula"] == pytest.approx(1 / 25)
    assert [m["ratio"] for m in gpipe["memory"]] == pytest.approx([1.0, 1.15])
    assert res["targets"] == {"step_ratio_le_1.05": 1, "configs": 2, "memory_within_15pct": 4, "memory_rows": 4}
    assert res["scaling"]["DP2 x PP2"]["samples_per_sec"] == pytest.approx(64 / 20.0 * 1e3)
    md = pb.markdown({**res, "config": {"width": 8, "layers": 2, "batch": 8, "device": "cpu", "steps": 3,
                                        "warmup": 1, "scaling_world": 4, "scaling_batch": 64}, "machine": {}})
    assert "| 2 | gpipe | 1 | 2 | 0.400 | 0.333 | 11.0 | 10.0 | 1.10 |  | 9.0 |" in md
    assert "| DP2 x PP2 | 20.0 | 3200 |" in md and "in 1 of 2 configurations" in md


@pytest.mark.slow  # each module's own figures are tested by hand above; this is the whole tool, minutes
@pytest.mark.timeout(600)
def test_straggler_and_pipeline_modes_run_in_the_tool(tmp_path):
    """The sync-vs-async straggler comparison and the pipeline-bubble comparison run from the
    same command (tiny settings) and land in results.json and the report."""
    out = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "size=tiny", "name=test", f"out_dir={out}", "mode=[straggler,pipeline]"],
        cwd=ROOT, capture_output=True, text=True, timeout=560,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for mode in ("straggler", "pipeline"):
        assert res[mode]["status"] == "ok" and res[mode]["result"], res[mode]
    md = (out / "report.md").read_text()
    assert "## Straggler" in md and "## Pipeline bubble" in md and "failed:" not in md


@pytest.mark.timeout(120)
def test_loader_benchmark_runs_both_paths_side_by_side():
    from benchmarks import loader

    res = loader.run(batch_sizes=(8, 16), features=4, samples=64, batches=3, rounds=2, write=False)
    assert [p["batch"] for p in res["points"]] == [8, 16]
    for p in res["points"]:
        assert p["per_sample_ms"] > 0 and p["fast_ms"] > 0
        assert p["speedup_min"] <= p["speedup_median"] <= p["speedup_max"]
    md = loader.markdown(res)
    assert md.count("\n| 8 |") == 1 and "speedup median" in md


def test_memory_mode_arithmetic():
    """benchmarks/memory.py: parameter count, alternated plan, per-rank memory from probe records,
    ratios against ddp and against the variant without activation checkpointing."""
    from benchmarks import memory
    from disttrain.models import ResidualMLP

    model = ResidualMLP(in_features=8, hidden=16, out_features=1, depth=2, expansion=2)
    assert memory.residual_mlp_params(8, 16, 2, expansion=2) == sum(p.numel() for p in model.parameters())
    assert memory.plan(["ddp", "fsdp"], [2, 4]) == [("ddp", 2), ("fsdp", 2), ("fsdp", 4), ("ddp", 4)]

    mb = 2**20

    def rank(base, start, fwd, after):  # bytes at the probe's four moments, in MB
        return {"memory_bytes": {"base": base * mb, "step_start": start * mb, "before_backward": fwd * mb,
                                 "after_step": after * mb}}

    def point(variant, strategy, n, ranks, step_ms):
        return {"variant": variant, "strategy": strategy, "world_size": n, "status": "ok", "error": "",
                "samples_per_sec": 100.0, "step_ms_median": step_ms, "records": ranks}

    rows = memory.summarize([
        point("ddp", "ddp", 2, [rank(10, 310, 330, 410), rank(12, 312, 332, 412)], 100.0),
        point("fsdp", "fsdp", 2, [rank(10, 160, 180, 210), rank(10, 150, 170, 205)], 120.0),
        point("fsdp+ac", "fsdp", 2, [rank(10, 160, 165, 210), rank(10, 160, 164, 210)], 150.0),
        {**point("zero3", "deepspeed", 2, [], 0.0), "status": "failed", "error": "boom"},
    ])
    by = {r["variant"]: r for r in rows}
    assert by["ddp"]["model_states_mb"] == pytest.approx(400.0)  # after_step - base, largest rank
    assert by["fsdp"]["model_states_mb"] == pytest.approx(200.0)
    assert by["fsdp"]["states_vs_ddp"] == pytest.approx(0.5)
    assert by["fsdp"]["states_target"] == pytest.approx(1.15 / 2)
    assert math.isnan(by["ddp"]["states_target"])
    assert by["fsdp"]["forward_mb"] == pytest.approx(20.0)  # before_backward - step_start
    assert by["fsdp+ac"]["forward_vs_plain"] == pytest.approx(5.0 / 20.0)
    assert by["fsdp+ac"]["step_time_vs_plain"] == pytest.approx(1.25)
    assert math.isnan(by["zero3"]["model_states_mb"])
    md = memory.markdown({"rows": rows, "params": 1000, "model": {"per_rank_batch": 4}})
    assert "| fsdp | 2 | 200 | 0.500 | <= 0.575 | 20.0 |" in md
    assert "| zero3 | 2 | failed: boom |" in md
    assert "| fsdp+ac | 2 | 0.25 | 1.25 |" in md
    # the one-process trade: per-round time ratios (each round's pair), memory ratio
    t = memory.trade_row(32, {"plain": 4.0, "ac": 1.0}, {"plain": [0.10, 0.20, 0.10], "ac": [0.13, 0.26, 0.15]})
    assert t["held_ratio"] == pytest.approx(0.25)
    assert t["time_ratio"] == pytest.approx(1.3) and t["rounds"] == 3
    assert t["ms_plain"] == pytest.approx(100.0) and t["ms_ac"] == pytest.approx(150.0)
    md = memory.markdown({"rows": [], "params": 1, "model": {"per_rank_batch": 4}, "ac_trade": [t]})
    assert "| 32 | 4.0 | 1.0 | 0.25 | 100 | 150 | 1.30 [" in md


@pytest.mark.timeout(120)
def test_loader_candidates_on_a_runs_dataset():
    """``python -m benchmarks.loader <overrides>``: the run's own dataset (here one that sleeps 4 ms
    per sample, by construction) against each candidate fix. Two worker processes sleep side by
    side, so they read it well over 1.3x faster (a gross, construction-based fact); fixes that do
    not apply say why."""
    from benchmarks import loader

    res = loader.run_dataset(["data=synthetic", "data.dataset._target_=tests.slow_data.slow_regression",
                              "+data.dataset.delay_s=0.004", "data.batch_size=16"], nproc=2, batches=8, rounds=1)
    assert res["dataset"] == "SlowDataset" and res["batch_per_rank"] == 8
    rows = {r["candidate"]: r for r in res["rows"]}
    assert rows["num_workers=2"]["speedup_median"] > 1.3, rows
    assert "TensorDataset" in rows["batch gather"]["skipped"]
    md = loader.markdown_dataset(res)
    assert "| num_workers=2 |" in md and "not tried:" in md
