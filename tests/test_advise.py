"""Sync or async advice (benchmarks/advise.py): the time model against hand-computed schedules,
and one real 2-rank probe with a straggler injected by construction (trainer.slowdown)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import advise

ROOT = Path(__file__).resolve().parent.parent


def test_staleness_zero_is_the_ddp_model():
    # rank 0 takes 1, 2, 3 s; rank 1 2, 1, 5 s; 0.5 s of communication: a cycle of 3 steps takes
    # max(1,2) + max(2,1) + max(3,5) + 3 x 0.5 = 10.5 s, so 6 steps take 21 s
    own = [[1.0, 2.0, 3.0], [2.0, 1.0, 5.0]]
    assert advise.ddp_time(own, 0.5, 6) == pytest.approx(21.0)
    assert advise.ps_time(own, 0.5, 0, 6) == pytest.approx(21.0)
    rng = __import__("random").Random(0)
    own = [[rng.uniform(0.5, 3.0) for _ in range(7)] for _ in range(3)]
    assert advise.ps_time(own, 0.2, 0, 50) == pytest.approx(advise.ddp_time(own, 0.2, 50))


def test_persistent_straggler_by_hand():
    """Worker 0 takes 1 s a step, worker 1 2 s; 10 global steps = 20 worker steps.
    ddp: 10 x 2 = 20 s. Fully async: by t the workers finished floor(t) + floor(t/2) steps, 20 at
    t = 14. s = 4: worker 0 runs 5 steps ahead, then is paced by worker 1 (it may start step k
    only after worker 1 finished step k - 5, at 2(k - 4)): finishes at 1..5, 6, 7, 8, 9, 11, 13,
    15; worker 1 at 2, 4, ..., 16: the 20th worker step ends at 16 s."""
    own = [[1.0], [2.0]]
    assert advise.ddp_time(own, 0.0, 10) == 20.0
    assert advise.ps_time(own, 0.0, None, 10) == 14.0
    assert advise.ps_time(own, 0.0, 4, 10) == 16.0
    # s = 1: worker 0 finishes at 1, 2, then 2k - 1 (paced from step 2): 11 steps by t = 19, worker 1 9
    assert advise.ps_time(own, 0.0, 1, 10) == 19.0
    assert advise.ps_finish_times(own, 0.0, 1, 5)[0] == [1.0, 2.0, 3.0, 5.0, 7.0]
    pred = advise.predict(own, 0.0, 10, {})
    assert advise.recommend(pred) == "parameter_server s=null"
    # a penalty of 1.5 (ps needs 1.5x the samples): 30 worker steps, floor(t) + floor(t/2) = 30 at t = 20
    assert advise.ps_time(own, 0.0, None, 10, penalty=1.5) == 20.0
    assert advise.recommend(advise.predict(own, 0.0, 10, {None: 1.5, 4: 1.5, 1: 1.5})) == "ddp"
    # no straggler: every setting ties with ddp, which is kept (no extra process for nothing)
    assert advise.recommend(advise.predict([[1.0], [1.0]], 0.1, 10, {})) == "ddp"


def test_penalties_from_the_straggler_results(tmp_path):
    path = tmp_path / "s.json"
    res = {"ddp": {"samples_to_target": 1000}, "ps_s=4": {"samples_to_target": 1200},
           "ps_s=null": {"samples_to_target": 800}}
    path.write_text(json.dumps({"results": res}))
    assert advise.penalties(path) == {0: 1.0, 1: 1.2, 4: 1.2, None: 1.0}  # at least 1; s=1 takes s=4's
    assert advise.penalties(path, {4: 2.0})[4] == 2.0
    assert advise.penalties(tmp_path / "missing.json") == {0: 1.0, 1: 1.0, 4: 1.0, None: 1.0}


@pytest.mark.timeout(240)
def test_advise_names_async_for_an_injected_straggler(tmp_path):
    """Two ranks; rank 1 does 3x the compute (busy work, trainer.slowdown). The probe sees rank 1's
    own step time well above rank 0's (a gross, construction-based fact), the ddp model
    reproduces the measured step, and the advice is the fully asynchronous parameter server."""
    out = tmp_path / "advice.json"
    cmd = [sys.executable, "-m", "benchmarks", "advise", "--nproc", "2", "--steps", "8", "--warmup", "2",
           "--target-steps", "200", "--out", str(out), "data=synthetic", "model=mlp", "model.hidden=256",
           "model.depth=2", "data.batch_size=128", "data.dataset.num_samples=4096", "data.metric=null",
           "+trainer.slowdown={rank: 1, factor: 3.0}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=220,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    fast, slow = res["own_ms_median"]
    assert slow > 1.5 * fast, res
    assert res["recommendation"] == "parameter_server s=null", proc.stdout
    assert res["predicted_s"]["parameter_server s=0"] == pytest.approx(res["predicted_s"]["ddp"])
    assert "recommendation: parameter_server s=null" in proc.stdout
