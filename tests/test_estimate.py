"""Memory before launch (disttrain/estimate.py, disttrain/footprint.py) and the data-loading
bottleneck warning (disttrain/bottleneck.py), against figures computed by hand; one real 2-rank
launch on a dataset made slow by construction checks both in a run."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from disttrain import estimate, footprint
from disttrain.bottleneck import DataWaitCheck
from disttrain.errors import ConfigError
from tests.distributed import run_python, run_torchrun

# MLP(8 -> 16 -> 1), the model of every test here: 8*16 + 16 + 16*1 + 1 = 161 float32 parameters
P = 161 * 4
ADAM = 2 * P + 2 * 4 * 2  # exp_avg + exp_avg_sq per parameter, and a float32 `step` per tensor (4 tensors)


def act_bytes(batch: int) -> int:
    """What autograd keeps for backward, by hand: the input (addmm), the ReLU output (ReLU and the
    second addmm share it), the output and the target (MSE): batch x (8 + 16 + 1 + 1) float32."""
    return batch * (8 + 16 + 1 + 1) * 4


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


@pytest.mark.parametrize("optimizer, state", [
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), 0),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), P),
    (lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), ADAM),
])
def test_footprint_equals_the_hand_figures(optimizer, state):
    with torch.device("meta"):
        model = mlp()
    fp = footprint.measure(model, optimizer, torch.randn(5, 8), torch.randn(5, 1), nn.MSELoss(), micro_batch=5)
    assert (fp.params, fp.grads, fp.optimizer, fp.param_count) == (P, P, state, 161)
    assert fp.activations == act_bytes(5)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing was allocated


def test_layouts_split_the_hand_figures():
    fp = footprint.Footprint(params=1200, grads=1200, optimizer=2400, activations=100, micro_batch=4, param_count=300)

    class S:
        def __init__(self, name, **kw):
            self.name = name
            self.__dict__.update(kw)

    (ddp,) = estimate.layout(S("ddp"), fp, 4)
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.total) == (1200, 1200, 2400, 4900)
    (fsdp,) = estimate.layout(S("fsdp", replicate_size=1), fp, 4)
    assert (fsdp.params, fsdp.grads, fsdp.optimizer, fsdp.activations) == (300, 300, 600, 100)
    (hsdp,) = estimate.layout(S("fsdp", replicate_size=2), fp, 4)
    assert hsdp.states == 4800 / 2
    bucket = {"zero_optimization": {"reduce_bucket_size": 1000}}
    zero = {st: estimate.layout(S("deepspeed", zero_stage=st, extra_config=bucket), fp, 4)[0] for st in (0, 1, 2, 3)}
    assert [(z.params, z.grads, z.optimizer, z.buffers) for z in zero.values()] == [
        (1200, 1200, 2400, 0), (1200, 1200, 600, 0), (1200, 300, 600, 0), (300, 300, 600, 4000)]
    server, worker = estimate.layout(S("parameter_server", num_servers=2), fp, 5)
    assert server.ranks == (0, 1) and worker.ranks == (2, 4)
    assert (server.params, server.optimizer, server.activations * server.in_flight) == (600, 1200, 0)
    assert (worker.params, worker.grads, worker.optimizer, worker.total) == (1200, 1200, 0, 2500)
    assert footprint.for_rank([server, worker], 3) is worker


SMALL = ["data=synthetic", "model=mlp", "model.hidden=16", "model.depth=1", "optimizer=adam"]


@pytest.mark.timeout(120)
def test_estimate_command_and_estimate_only(tmp_path, capsys):
    """``python -m disttrain.estimate`` composes the run's config (in-process here) and gives the
    hand figures, refusing a bad config as the run would; ``trainer.estimate_only=true`` prints
    the same table from the app (a subprocess) and trains nothing."""
    rows, text = estimate.run(["strategy=fsdp", "data.batch_size=32", *SMALL], world_size=4)
    (fsdp,) = rows
    assert (fsdp.params, fsdp.grads, fsdp.optimizer, fsdp.activations) == (P / 4, P / 4, ADAM / 4, act_bytes(8))
    assert fsdp.total == (2 * P + ADAM) / 4 + act_bytes(8) and "fsdp (1/4 shards)" in text
    with pytest.raises(ConfigError, match="data.batch_size=32 is not divisible"):
        estimate.run(["strategy=ddp", "data.batch_size=32", *SMALL], world_size=3)
    estimate.main(["--world-size", "2", "strategy=deepspeed", "strategy.zero_stage=2", "data.batch_size=32", *SMALL])
    assert "deepspeed ZeRO-2" in capsys.readouterr().out
    res = run_python(["-m", "disttrain", "strategy=single", "trainer.estimate_only=true", *SMALL], cwd=tmp_path, timeout=100)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "memory estimate: strategy=single" in res.stdout and not list(tmp_path.glob("outputs/*/summary.json"))


def test_data_wait_check_by_hand():
    check = DataWaitCheck(0.2, warmup=2, window=2)
    # steps end at t = 0, 1 (warm-up), then 2, 3: 1 s each with 0.5 s of data wait: share 0.5 > 0.2
    msgs = [check.observe({"data": 0.5, "forward": 0.1}, now=float(t)) for t in range(4)]
    assert msgs[:3] == [None] * 3 and "took 50% of the step time" in msgs[3]
    assert check.observe({"data": 0.9}, now=4.0) is None and check.observe({"data": 0.9}, now=5.0) is None  # once
    assert check.summary() == {"data_wait_share": pytest.approx((0.5 + 0.5 + 0.9 + 0.9) / 4), "data_bottleneck": True}
    quiet = DataWaitCheck(0.2, warmup=0, window=1)
    assert all(quiet.observe({"data": 0.1}, now=float(t)) is None for t in range(4))
    assert quiet.summary()["data_bottleneck"] is False


@pytest.mark.timeout(240)
def test_slow_dataset_is_named_and_memory_is_measured(tmp_path):
    """Two ranks read a dataset that sleeps 4 ms per sample (8 samples per rank and step: 32 ms of
    data wait against well under a millisecond of compute for 161 parameters): every rank says
    once that data loading is the bottleneck, with a share above one half; the summary carries the
    share, and the memory estimate the run compared against its measurement (the hand figures)."""
    res = run_torchrun([
        *SMALL, "strategy=ddp", "data.dataset._target_=tests.slow_data.slow_regression", "+data.dataset.delay_s=0.004",
        "data.batch_size=16", "trainer.max_steps=12", "trainer.log_every_n_steps=100", "data.metric=null",
    ], nproc=2, cwd=tmp_path, timeout=200)
    assert res.returncode == 0, res.stdout[-4000:]
    for rank in (0, 1):
        found = re.findall(rf"data loading is the bottleneck on rank {rank}: waiting for batches took (\d+)%", res.stdout)
        assert len(found) == 1, res.stdout[-3000:]
        assert int(found[0]) > 50
    assert "python -m benchmarks.loader" in res.stdout
    (run,) = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_bottleneck"] is True and 0.5 < summary["data_wait_share"] <= 1.0
    mem = summary["memory"]
    assert mem["step"] == 2 and mem["estimated_states_bytes"] == 2 * P + ADAM
    assert mem["estimated_peak_bytes"] == 2 * P + ADAM + act_bytes(8)
    assert "memory at step 2 (ddp (replica))" in res.stdout
