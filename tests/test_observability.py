"""Where a run's time goes (issue 16, items 1-3): the slow rank named with its cause, hangs
explained by the watchdog, FLOPs and MFU. Each multi-process test injects the answer: a rank
made slow in compute or in data, a rank that sleeps before a collective."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from disttrain.flops import FlopsMeter, count_flops, peak_flops
from disttrain.straggler import RankTimes, judge, split_step
from disttrain.watchdog import diagnose, hung_ranks
from tests.distributed import run_distributed

IN, HIDDEN, OUT = 8, 16, 4


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def _hand_flops_per_sample() -> int:
    """2*in*out per Linear forward; backward: 2*in*out for the weight gradient of each Linear,
    and again for the input gradient of every Linear but the first (its input needs none)."""
    first, second = 2 * IN * HIDDEN, 2 * HIDDEN * OUT
    return (first + second) + (first + second) + second


# ------------------------------------------------------------------------ 3: FLOPs and MFU
def test_flops_of_an_mlp_equal_the_hand_count() -> None:
    model = _mlp()
    x, y = torch.randn(5, IN), torch.randn(5, OUT)
    assert count_flops(model, x, y, nn.MSELoss()) == 5 * _hand_flops_per_sample()
    assert all(p.grad is None for p in model.parameters())  # counted on meta tensors: model untouched


def test_mfu_is_achieved_over_the_peak_of_every_device() -> None:
    data = [(torch.randn(IN), torch.randn(OUT)) for _ in range(4)]
    meter = FlopsMeter.measure(_mlp(), data, nn.MSELoss(), torch.device("cpu"), "32", devices=4, peak_override=1e9)
    assert meter.per_sample == _hand_flops_per_sample()
    rate = 1000.0  # samples per second
    assert meter.summary(rate)["achieved_flops_per_sec"] == _hand_flops_per_sample() * rate
    assert meter.mfu(rate) == pytest.approx(_hand_flops_per_sample() * rate / 4e9)
    assert peak_flops(torch.device("cpu"), "bf16") is None  # no table entry for CPUs: FLOP/s only
    cpu = FlopsMeter.measure(_mlp(), data, nn.MSELoss(), torch.device("cpu"), "32", devices=1)
    assert "mfu" not in cpu.summary(rate) and "perf/mfu" not in cpu.scalars(rate)


# ------------------------------------------------------------------------ 1: the slow rank
def test_backward_after_the_last_gradient_is_communication_wait() -> None:
    phases = {"data": 0.01, "forward": 0.02, "backward": 0.10, "optimizer": 0.005}
    split = split_step(phases, backward_end=5.0, ready_at=4.93)  # 70 ms waited for the others
    assert split["comm"] == pytest.approx(0.07) and split["compute"] == pytest.approx(0.05)
    assert split["data"] == 0.01 and split["optimizer"] == 0.005


def test_judge_names_the_slowest_rank_and_its_cause() -> None:
    ranks = [{"data": 1.0, "compute": 10.0}, {"data": 1.0, "compute": 10.5}, {"data": 9.0, "compute": 10.0}]
    ranks = [{**r, "comm": 0.0, "optimizer": 1.0} for r in ranks]
    v = judge(ranks, margin=0.2)
    assert (v.rank, v.cause, v.flagged) == (2, "data", True)
    assert v.excess_ms == pytest.approx(19.0 - 11.5)
    assert not judge(ranks, margin=1.0).flagged  # 65% over the median: below a 100% margin


def test_a_warm_up_step_does_not_decide_and_ranks_are_global() -> None:
    """Medians per window: rank 3's one slow first step (lazy init) does not make it the
    straggler; rank 5's steady 3 ms extra data wait does. Exchanged: four numbers per rank."""
    times = RankTimes(margin=0.2, ranks=[3, 5])
    for step in range(5):
        times.add({"data": 0.001, "forward": 0.5 if step == 0 else 0.002, "backward": 0.002}, None)
    other = {"data": 4.0, "compute": 4.0, "comm": 0.0, "optimizer": 0.0}
    sent = []
    verdict = times.gather(lambda mine: sent.append(mine) or [mine, other])
    assert sent[0] == {"data": 1.0, "compute": 4.0, "comm": 0.0, "optimizer": 0.0}
    assert verdict is not None and (verdict.rank, verdict.cause, verdict.flagged) == (5, "data", True)
    assert times.run_verdict().as_dict()["per_rank_ms"][3]["compute"] == 4.0


class _SlowOnRank(Dataset):
    """A dataset whose every item costs ``delay_s`` on one rank (slow storage on one node)."""

    def __init__(self, n: int, rank: int, delay_s: float) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, IN, generator=g), torch.randn(n, OUT, generator=g)
        self.slow = int(os.environ.get("RANK", "0")) == rank
        self.delay_s = delay_s

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if self.slow:
            time.sleep(self.delay_s)
        return self.x[i], self.y[i]


def _trainer(s, data, run_dir: str | None, **options):
    from disttrain.trainer import Trainer, TrainerConfig

    model = _mlp()
    cfg = TrainerConfig(max_epochs=1, progress_bar=False, check_in_sync=False, **options)
    return Trainer(s, model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), data, batch_size=16,
                   config=cfg, run_dir=Path(run_dir) if run_dir else None)


def _observed_worker(run_dir: str) -> dict:
    """One launch, three runs: rank 1 made 4x slower in compute (the slowdown knob does real
    work); rank 0 reading slowly; rank 1 sleeping 8 s after step 2 (``sleep@1:2``) before the log
    step's allreduce, with ``hang_timeout_s=1.5``."""
    from disttrain.session import Session

    s = Session("ddp", timeout_s=60, seed=0)
    try:
        compute = _trainer(s, _SlowOnRank(256, 0, 0.0), f"{run_dir}/compute", max_steps=8, log_every_n_steps=4,
                           slowdown={"rank": 1, "factor": 4.0}, peak_flops=1e12).fit()
        data = _trainer(s, _SlowOnRank(256, 0, 0.004), None, max_steps=8, log_every_n_steps=4).fit()
        os.environ.update(DISTTRAIN_FAULT="sleep@1:2", DISTTRAIN_FAULT_SLEEP_S="8")
        hang = _trainer(s, _SlowOnRank(128, 0, 0.0), f"{run_dir}/hang", max_steps=4, log_every_n_steps=1,
                        hang_timeout_s=1.5)
        hang.fit()
        return {"compute": compute, "data": data, "hang_report": hang.watchdog.report}
    finally:
        os.environ.pop("DISTTRAIN_FAULT", None)
        s.close()


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("observed")
    return run_dir, run_distributed(_observed_worker, 2, str(run_dir), timeout=150)


@pytest.mark.timeout(180)
def test_the_slow_rank_is_named_with_its_cause(observed) -> None:
    """2 gloo ranks under DDP, whose allreduce evens out step times: the rank made slow in compute,
    then the rank with a slow dataset, is named with the right cause, on every rank."""
    run_dir, results = observed
    for r in results:
        compute, data = r["compute"], r["data"]
        assert compute["straggler"]["rank"] == 1 and compute["straggler"]["cause"] == "compute", compute["straggler"]
        assert data["straggler"]["rank"] == 0 and data["straggler"]["cause"] == "data", data["straggler"]
        # not evened out: the fast rank's compute stays far below the 4x rank's, its wait above
        ms = compute["straggler"]["per_rank_ms"]
        assert ms[1]["compute"] > 2 * ms[0]["compute"] and ms[0]["comm"] > ms[1]["comm"], ms
        assert compute["flops_per_sample"] == _hand_flops_per_sample()
        assert compute["mfu"] == pytest.approx(compute["achieved_flops_per_sec"] / (2 * 1e12))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "compute" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"straggler/rank", "straggler/excess_ms", "ranks/compute_ms/rank1", "ranks/data_ms/rank0",
            "perf/tflops", "perf/mfu"} <= tags
    assert [e.value for e in events.Scalars("straggler/rank")] == [1.0, 1.0]  # steps 4 and 8


# ------------------------------------------------------------------------ 2: hangs explained
def test_diagnose_names_the_rank_behind() -> None:
    ahead = {"step": 3, "last_enqueued": {"0": 7}, "frames": ["trainer.py:1 in _train"],
             "collectives": [{"pg": "0", "seq": 7, "op": "gloo:all_reduce", "sizes": [[1]], "completed": False,
                              "age_s": 9.0}]}
    behind = {"step": 3, "last_enqueued": {"0": 6}, "frames": ["faults.py:9 in inject"], "collectives": []}
    report = diagnose({0: ahead, 1: behind, 2: ahead}, world_size=4)
    assert hung_ranks(report) == [1]
    assert "collective #7 of process group 0 (gloo:all_reduce" in report and "ranks [0, 2] entered" in report
    assert "in inject" in report and "ranks [3] did not answer" in report


@pytest.mark.timeout(180)
def test_a_rank_that_does_not_arrive_is_named_with_the_collective(observed) -> None:
    """Rank 1 sleeps 8 s before the log step's allreduce; with ``hang_timeout_s=1.5`` the
    diagnosis names rank 1 and that allreduce while rank 1 is still asleep (its stack is in the
    sleep), every rank dumps its stacks and collectives, and the job then finishes (far inside
    the process group's 60 s timeout: the fixture's launch ended)."""
    run_dir, results = observed
    report = (run_dir / "hang" / "hang" / "diagnosis.txt").read_text()
    assert [r["hang_report"] for r in results if r["hang_report"]] == [report.strip()]  # once, by the first to notice
    assert hung_ranks(report) == [1], report
    line = next(ln for ln in report.splitlines() if ln.startswith("rank 1 did not arrive"))
    assert "gloo:all_reduce" in line and "ranks [0] entered" in line, line
    assert "in inject" in line, line  # rank 1 was still inside the injected sleep: reported in time
    for r in (0, 1):
        assert (run_dir / "hang" / "hang" / f"rank{r}_collectives.json").exists()
    assert "time.sleep" in (run_dir / "hang" / "hang" / "rank1_stacks.txt").read_text()
