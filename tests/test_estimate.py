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
from disttrain.strategies.parameter_server import memory as ps_memory
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
    # parameter server, dedicated: 2 servers holding shards of 3 tensors (by hand), 3 workers
    sizes, optim = [800, 300, 100], [1600, 600, 200]
    s0, s1, worker = ps_memory.rank_estimates("dedicated", 5, [[0], [1, 2]], sizes, sizes, optim, 100, 1216)
    assert (s0.ranks, s0.params, s0.grads, s0.optimizer, s0.total) == ((0, 0), 800, 800, 1600, 3200)
    assert (s1.ranks, s1.params, s1.optimizer, s1.total) == ((1, 1), 400, 800, 1600)
    assert worker.ranks == (2, 4) and (worker.params, worker.grads, worker.optimizer, worker.total) == (1200, 1200, 0, 3716)
    assert footprint.for_rank([s0, s1, worker], 3) is worker


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


def test_parameter_server_colocated_shards_by_hand():
    """servers=colocated at 3 ranks over MLP(8 -> 16 -> 1)'s tensors [w0 512 B, b0 64, w1 64, b1 4]:
    largest first to the least loaded shard (ties: the lower shard, the lower tensor) gives
    shard 0 = {w0}, shard 1 = {b0, b1}, shard 2 = {w1}. Each rank: the whole worker (P + G + A, no
    optimizer state) plus its shard's parameters, gradient and Adam state (2 x bytes + a 4-byte
    step per tensor); buffers: the worker's reply buffer per shard (its floats + 2 header floats)."""
    rows, text = estimate.run(["strategy=parameter_server", "data.batch_size=30", *SMALL], world_size=3)
    shard_p = [512, 64 + 4, 64]
    shard_o = [2 * 512 + 4, 2 * (64 + 4) + 2 * 4, 2 * 64 + 4]
    assert [r.ranks for r in rows] == [(0, 0), (1, 1), (2, 2)]
    for r, row in enumerate(rows):
        assert (row.params, row.grads, row.optimizer) == (P + shard_p[r], P + shard_p[r], shard_o[r])
        assert row.activations == act_bytes(10) and row.in_flight == 1  # 30 samples over 3 workers
        assert row.buffers == (161 + 2 * 3) * 4
    assert sum(shard_o) == ADAM and "worker + shard 1" in text
    ded = estimate.run(["strategy=parameter_server", "strategy.servers=dedicated", "strategy.num_servers=2",
                        "data.batch_size=30", *SMALL], world_size=5)[0]  # 2 servers: {w0}, {b0, w1, b1}
    assert [(r.ranks, r.params, r.optimizer) for r in ded] == [
        ((0, 0), 512, 2 * 512 + 4), ((1, 1), 64 + 64 + 4, 2 * (64 + 64 + 4) + 3 * 4), ((2, 4), P, 0)]
    assert ded[2].activations == act_bytes(10) and ded[2].buffers == (161 + 2 * 2) * 4 and ded[0].buffers == 0
    (alone,) = estimate.run(["strategy=parameter_server", "data.batch_size=30", *SMALL], world_size=1)[0]
    assert (alone.params, alone.optimizer, alone.activations) == (P, ADAM, act_bytes(30))  # no server in one process


# a 2-stage pipeline over MLP(8 -> 16 -> 1): stage 0 = layers.0 (Linear 8->16) + layers.1 (ReLU),
# stage 1 = layers.2 (Linear 16->1)
STAGE_P = [(8 * 16 + 16) * 4, (16 + 1) * 4]


def stage_act(b: int) -> list[int]:
    """Saved for backward per micro-batch of b samples, by hand: stage 0 the input of layers.0
    (b x 8) and the ReLU's output (b x 16); stage 1 its own input to layers.2 (b x 16). The loss is
    outside the placed modules (not counted by the cost model)."""
    return [b * (8 + 16) * 4, b * 16 * 4]


@pytest.mark.parametrize("schedule, in_flight", [("gpipe", [4, 4]), ("1f1b", [2, 1])])
def test_model_parallel_stages_by_hand(schedule, in_flight):
    """K=2 stages x D=2 replicas (world 4), M=4: batch 32 -> 16 per replica -> micro-batches of 4.
    GPipe keeps all M micro-batches in flight on every stage; 1F1B min(M, K - stage). Adam: state
    2 x the parameter bytes (the cost model's ratio; per-tensor step scalars not counted)."""
    rows, text = estimate.run(["strategy=model_parallel", "strategy.pipeline_size=2", f"strategy.schedule={schedule}",
                               "strategy.microbatches=4", "strategy.placement=[{modules:[layers.0-1]},{modules:[layers.2]}]",
                               "data.batch_size=32", *SMALL], world_size=4)
    assert [r.ranks for r in rows] == [(0, 2), (1, 3)] and footprint.for_rank(rows, 2) is rows[0]
    for s, row in enumerate(rows):
        assert (row.params, row.grads, row.optimizer) == (STAGE_P[s], STAGE_P[s], 2 * STAGE_P[s])
        assert (row.activations, row.in_flight) == (stage_act(4)[s], in_flight[s])
        assert row.total == 4 * STAGE_P[s] + in_flight[s] * stage_act(4)[s]
    assert sum(STAGE_P) == P and "micro-batch=4 samples" in text and "stage 1" in text
    split, _ = estimate.run(["strategy=model_parallel", "strategy.pipeline_size=2", f"strategy.schedule={schedule}",
                             "strategy.split_points=[layers.2]", "data.batch_size=32", *SMALL], world_size=4)
    assert split == rows  # the same stages named by their first module


def test_cost_profile_counts_the_same_bytes_on_meta_as_on_real_tensors():
    """The estimate profiles pinned placements on the meta device; the strategy profiles real
    tensors: the byte figures agree, and equal the hand count (times are meaningless on meta)."""
    from disttrain.strategies.model_parallel import cost

    def run(device):
        with torch.device(device):
            model = mlp()
        x = torch.randn(4, 8, device=device)
        return [(u.name, u.param_bytes, u.grad_bytes, u.optim_bytes, u.act_bytes)
                for u in cost.profile(model, ["0", "1", "2"], (x,), lambda out: out.sum(), 2.0, repeats=0)]

    assert run("meta") == run("cpu") == [("0", 576, 576, 1152, 4 * 8 * 4), ("1", 0, 0, 0, 4 * 16 * 4),
                                         ("2", 68, 68, 136, 4 * 16 * 4)]


def test_model_parallel_run_compares_the_strategys_own_counts():
    """In a run, the watch for a pipeline rank reads the strategy's per-rank report (its tensors)
    at the report step, not the allocator (which saw the whole model before the cut)."""
    est = footprint.RankEstimate("stage 1", (1, 3), 100.0, 100.0, 200.0, 10.0, in_flight=4, step=2)

    class Pipe:
        def memory_report(self):
            return [{"params": 1.0, "grads": 1.0, "optimizer": 2.0, "activations_peak": 4.0},
                    {"params": 100.0, "grads": 100.0, "optimizer": 200.0, "activations_peak": 50.0}]

    watch = footprint.MemoryWatch(est, torch.device("cpu"), counted=lambda: estimate._pipeline_counted(Pipe(), 1))
    watch.observe(1)
    watch.observe(2)
    m = watch.summary()["memory"]
    assert (m["states_bytes"], m["activations_bytes"], m["peak_bytes"]) == (400.0, 50.0, 450.0)
    assert (m["estimated_peak_bytes"], m["states_error"]) == (440.0, 0.0) and m["activations_error"] == pytest.approx(0.25)
    assert est.holds(3) and not est.holds(2) and est.span == "1,3"
    with pytest.raises(ConfigError, match="one process"):
        estimate.run(["strategy=model_parallel", "strategy.placement=[{modules:[layers.0-1],device:cpu},"
                      "{modules:[layers.2],device:cpu}]", *SMALL], world_size=1)


def test_model_parallel_interleaved_and_auto():
    """interleaved_1f1b, K=2 x V=2 over MLP(8 -> 16 -> 16 -> 1) (layers.0-4): rank 0 holds stages
    0 and 2, rank 1 stages 1 and 3 (torch's loop mapping). Parameters per rank by hand; the
    activations' peak is the cost model's (it plays torch's own order), between one micro-batch
    of the rank's larger stage and M of all its stages. ``placement: auto`` profiles a real CPU
    stand-in and splits every parameter exactly once over the 2 ranks."""
    deep = [*SMALL, "model.depth=2"]
    rows, _ = estimate.run(["strategy=model_parallel", "strategy.pipeline_size=2", "strategy.schedule=interleaved_1f1b",
                            "strategy.microbatches=4", "strategy.placement=[{modules:[layers.0-1]},{modules:[layers.2]},"
                            "{modules:[layers.3]},{modules:[layers.4]}]", "data.batch_size=16", *deep], world_size=2)
    b = 4
    assert [r.role for r in rows] == ["stages 0,2", "stages 1,3"]
    assert [r.params for r in rows] == [(8 * 16 + 16) * 4, (16 * 16 + 16) * 4 + (16 + 1) * 4]
    per_micro = [b * (8 + 16) * 4 + b * 16 * 4, b * 16 * 4 + b * 16 * 4]  # (layers.0 in, relu out) + relu out; inputs of layers.2, .4
    for row, a in zip(rows, per_micro):
        assert row.activations == a and row.activations_peak is not None
        assert max(b * 24 * 4, b * 16 * 4) <= row.activations_peak <= 4 * a
        assert row.total == row.params * 4 + row.activations_peak
    auto, _ = estimate.run(["strategy=model_parallel", "strategy.pipeline_size=2", "data.batch_size=16", *deep], world_size=2)
    mlp_p = (8 * 16 + 16 + 16 * 16 + 16 + 16 + 1) * 4
    assert len(auto) == 2 and sum(r.params for r in auto) == mlp_p and all(r.params > 0 for r in auto)
    assert all(r.optimizer == 2 * r.params and r.in_flight == 4 for r in auto)


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
