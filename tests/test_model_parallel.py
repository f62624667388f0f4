"""strategy=model_parallel: placed and pipelined training equals the unsplit model.

Oracle: the same model, unsplit, trained by the plain single-process step on the whole batch
with the same initial weights and data. Spawned runs are few: each one loops over several
(schedule, M) configurations inside the same processes.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from disttrain import placement as pl
from disttrain.env import DistEnv
from disttrain.errors import ConfigError
from disttrain.models import MLP
from disttrain.strategies.base import Strategy
from disttrain.strategies.model_parallel import ModelParallelStrategy, schedule_order
from disttrain.timing import StepTimer
from tests.distributed import run_distributed, run_torchrun

STEPS = 3
BATCH = 16
ATOL = 1e-6


class RecordingSGD(torch.optim.SGD):
    """SGD with momentum that keeps each step's gradients (by parameter position)."""

    def __init__(self, params, lr=0.05, momentum=0.9):
        super().__init__(params, lr=lr, momentum=momentum)
        self.recorded: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.recorded.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def factory() -> nn.Module:
    return MLP(in_features=12, hidden=16, out_features=5, depth=3)  # layers.0..6


def batches(steps: int = STEPS):
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(BATCH, 12, generator=g), torch.randint(0, 5, (BATCH,), generator=g)) for _ in range(steps)]


def reference(init_state: dict, steps: int = STEPS):
    """The unsplit model trained by the base Strategy's step: returns final state, grads by name, losses."""
    model = factory()
    model.load_state_dict(init_state)
    opt = RecordingSGD(model.parameters())
    base = Strategy()
    losses = [base.train_step(model, opt, [b], nn.CrossEntropyLoss(), None, StepTimer()).item() for b in batches(steps)]
    names = [n for n, _ in model.named_parameters()]
    grads = [dict(zip(names, step)) for step in opt.recorded]
    return model.state_dict(), grads, losses


def assert_close_dicts(got: dict, want: dict, what: str) -> None:
    assert set(got) <= set(want), f"{what}: unexpected keys {set(got) - set(want)}"
    for k, v in got.items():
        assert torch.allclose(v, want[k], atol=ATOL, rtol=0), f"{what} {k}: max diff {(v - want[k]).abs().max()}"


# ---------------------------------------------------------------------- single process
THREE_CPU_STAGES = [
    {"modules": ["layers.0-1"], "device": "cpu"},
    {"modules": ["layers.2", "layers.3"], "device": "cpu"},
    {"modules": ["layers.4-6"], "device": "cpu"},
]


def single_strategy(placement=THREE_CPU_STAGES, **kw) -> ModelParallelStrategy:
    st = ModelParallelStrategy(placement=placement, **kw)
    st.validate(DistEnv())
    st.setup(DistEnv(), torch.device("cpu"), "gloo", 30)
    return st


@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule,m", [("gpipe", 1), ("gpipe", 4), ("1f1b", 4)])
def test_single_process_placed_pipeline_equals_unsplit(schedule, m):
    torch.manual_seed(0)
    st = single_strategy(microbatches=m, schedule=schedule)
    model = st.build_model(factory)
    init = copy.deepcopy(model.state_dict())
    opt = RecordingSGD(model.parameters())
    losses = [st.train_step(model, opt, [b], nn.CrossEntropyLoss(), None, StepTimer()).item() for b in batches()]
    want_state, want_grads, want_losses = reference(init)
    names = [n for n, _ in model.named_parameters()]
    for step, grads in enumerate(opt.recorded):
        assert_close_dicts(dict(zip(names, grads)), want_grads[step], f"grad step {step}")
    assert_close_dicts(model.state_dict(), want_state, "weights")
    assert losses == pytest.approx(want_losses, abs=ATOL)
    # the memory report: parameters per stage counted independently, optimizer state = momentum
    report = st.memory_report()
    ref_model = factory()
    for k, stage in enumerate(THREE_CPU_STAGES):
        mods = pl.expand(ref_model, stage["modules"])
        nbytes = sum(p.numel() * 4 for n in mods for p in ref_model.get_submodule(n).parameters())
        assert report[k]["params_bytes"] == nbytes == report[k]["grads_bytes"] == report[k]["optimizer_bytes"]
        if nbytes:
            assert report[k]["activation_peak_bytes"] > 0
    eval_out = st.eval_forward(model, batches(1)[0][0])
    ref_model.load_state_dict(want_state)
    assert torch.allclose(eval_out, ref_model(batches(1)[0][0]), atol=ATOL)


def test_schedule_orders_are_complete_and_1f1b_bounds_in_flight():
    for kind in ("gpipe", "1f1b"):
        for k in (2, 4):
            for s in range(k):
                order = schedule_order(kind, k, s, 8)
                assert sorted(order) == sorted([("F", i) for i in range(8)] + [("B", i) for i in range(8)])
                live = peak = 0
                for op, i in order:
                    assert op == "F" or ("F", i) in order[: order.index((op, i))]
                    live += 1 if op == "F" else -1
                    peak = max(peak, live)
                assert peak == (8 if kind == "gpipe" else k - s)


def test_activation_peak_is_lower_under_1f1b():
    peaks = {}
    for kind in ("gpipe", "1f1b"):
        torch.manual_seed(0)
        st = single_strategy(microbatches=8, schedule=kind)
        model = st.build_model(factory)
        st.train_step(model, RecordingSGD(model.parameters()), [batches(1)[0]], nn.CrossEntropyLoss(), None, StepTimer())
        peaks[kind] = [e["activation_peak_bytes"] for e in st.memory_report()]
    assert all(a < g for a, g in zip(peaks["1f1b"], peaks["gpipe"])), peaks


# ---------------------------------------------------------------------- auto placement
def test_auto_placement_balances_parameters_and_prints_pinnable_config():
    model = MLP()  # 64-128-128-10: layers.0 8320, layers.2 16512, layers.4 1290 parameters
    specs = pl.propose(model, [0, 1], "rank")
    assert [s.names for s in specs] == [("layers.0-1",), ("layers.2-4",)]
    # the best split: no other cut has a smaller largest stage
    sizes = [sum(p.numel() for p in m.parameters()) for _, m in pl.leaves(model)]
    best = min(max(sum(sizes[:c]), sum(sizes[c:])) for c in range(1, len(sizes)))
    got = [sum(p.numel() for n in r for p in model.get_submodule(n).parameters()) for r in pl.resolve(model, specs)]
    assert max(got) == best
    text = pl.to_yaml(specs)
    pinned = OmegaConf.to_container(OmegaConf.create(text.split("\n# ")[0]))["placement"]
    assert pl.parse(pinned, 2) == specs
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(text.split("'")[1])
    assert override.key_or_group == "strategy.placement" and pl.parse(override.value(), 2) == specs


# ---------------------------------------------------------------------- validation
def _expect(match: str, fn) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        fn()
    return str(info.value)


def test_validation_errors_before_anything_moves():
    env1, env2 = DistEnv(), DistEnv(rank=0, world_size=2, local_world_size=2)

    def build(placement, **kw):
        st = single_strategy(placement, **kw)
        model = factory()
        before = {n: p.device for n, p in model.named_parameters()}
        try:
            st.build_model(lambda: model)
        finally:
            assert {n: p.device for n, p in model.named_parameters()} == before

    # a parameter placed twice (overlap) and a parameter placed nowhere
    _expect("placed exactly once", lambda: build([{"modules": ["layers"], "device": "cpu"}, {"modules": ["layers.6"], "device": "cpu"}]))
    msg = _expect("not placed", lambda: build([{"modules": ["layers.0-3"], "device": "cpu"}, {"modules": ["layers.4-5"], "device": "cpu"}]))
    assert "layers.6.weight" in msg
    # unknown module names: the message lists what exists
    msg = _expect("does not have", lambda: build([{"modules": ["layer.0-3"], "device": "cpu"}, {"modules": ["layers.4-6"], "device": "cpu"}]))
    assert "layers.0" in msg and "layers.6" in msg
    _expect("numbered children 0-6", lambda: build([{"modules": ["layers.0-9"], "device": "cpu"}]))
    # a device that does not exist
    missing_gpu = f"cuda:{torch.cuda.device_count()}"
    msg = _expect("does not exist", lambda: ModelParallelStrategy([{"modules": ["layers"], "device": missing_gpu}]).validate(env1))
    assert "cpu" in msg
    _expect("not a device|only cpu", lambda: ModelParallelStrategy([{"modules": ["layers"], "device": "gpu7"}]).validate(env1))
    # more stages than ranks (one process, and two processes)
    three = [{"modules": [f"layers.{i}"], "rank": i} for i in range(3)]
    _expect("more stages than ranks", lambda: ModelParallelStrategy(three).validate(env2))
    _expect("more stages than ranks", lambda: ModelParallelStrategy(three[:2]).validate(env1))
    _expect("names device", lambda: ModelParallelStrategy(THREE_CPU_STAGES[:2]).validate(env2))
    # 1F1B with fewer micro-batches than stages
    _expect("microbatches>=2", lambda: ModelParallelStrategy("auto", microbatches=1, schedule="1f1b").validate(env2))
    _expect("microbatches>=3", lambda: ModelParallelStrategy(THREE_CPU_STAGES, microbatches=2, schedule="1f1b").validate(env1))
    _expect("gpipe", lambda: ModelParallelStrategy(schedule="zigzag").validate(env1))
    _expect("integer >= 1", lambda: ModelParallelStrategy(microbatches=0).validate(env1))


def test_tied_parameters_across_stages_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    st = single_strategy([{"modules": ["a"], "device": "cpu"}, {"modules": ["b"], "device": "cpu"}])
    _expect("tied parameter", lambda: st.build_model(Tied))


def test_chain_contract_is_checked_on_meta():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x) * 2)

    with torch.device("meta"):
        model = Residual()
    assert "transforms the output of 'a'" in pl.check_chain(model, ["a", "b"], torch.randn(2, 4))
    assert "order" in pl.check_chain(model, ["b", "a"], torch.randn(2, 4))
    with torch.device("meta"):
        mlp = factory()
    assert pl.check_chain(mlp, [f"layers.{i}" for i in range(7)], torch.randn(2, 12)) is None
    msg = pl.check_chain(mlp, [f"layers.{i}" for i in range(7) if i != 1], torch.randn(2, 12))
    assert "layers.1" in msg and "no stage holds" in msg


# ---------------------------------------------------------------------- multi process (gloo)
def _stage_placement(world: int):
    cuts = {2: ["layers.0-2", "layers.3-6"], 4: ["layers.0-1", "layers.2-3", "layers.4-5", "layers.6"]}[world]
    # ranks in reverse order for 4: stage k on rank world-1-k (placement, not rank order, decides the flow)
    ranks = list(range(world)) if world == 2 else list(reversed(range(world)))
    return [{"modules": [c], "rank": r} for c, r in zip(cuts, ranks)]


def _pipeline_worker(world: int, configs: list[tuple[str, int, str]]):
    torch.set_num_threads(1)
    env = DistEnv.from_environ()
    out = []
    for schedule, m, init in configs:
        st = ModelParallelStrategy(placement=_stage_placement(world), microbatches=m, schedule=schedule, init=init)
        st.validate(env)
        st.setup(env, torch.device("cpu"), "gloo", 60)
        torch.manual_seed(0)
        model = st.build_model(factory)
        init_state = {k: v.clone() for k, v in model.state_dict().items()}
        opt = RecordingSGD(model.parameters())
        losses = [st.train_step(model, opt, [b], nn.CrossEntropyLoss(), None, StepTimer()).item() for b in batches()]
        names = [n for n, _ in model.named_parameters()]
        res = {
            "stage": st.stage_index,
            "init": init_state,
            "final": {k: v.clone() for k, v in model.state_dict().items()},
            "grads": [dict(zip(names, g)) for g in opt.recorded],
            "losses": losses,
            "numel": sum(p.numel() for p in model.parameters()),
            "bubble": st.bubble_fraction(),
            "metrics": st.log_metrics(),
            "memory": st.memory_report(),
        }
        with torch.no_grad():
            res["eval"] = st.eval_forward(model, batches(1)[0][0])
        if (schedule, m) == ("gpipe", 4) and init == "meta":
            ckpt = st.state_dict(model, opt)
            res["ckpt_keys"] = sorted(ckpt["model"])
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            st.load_state_dict(model, opt, ckpt)  # rank 0: the whole file; others: their own part
            res["reloaded"] = {k: v.clone() for k, v in model.state_dict().items()}
        out.append(res)
        dist_barrier()
    return out


def dist_barrier():
    import torch.distributed as dist

    dist.barrier()


def _check_against_reference(results: list[list[dict]], configs, world: int):
    for c, (schedule, m, init) in enumerate(configs):
        per_rank = [r[c] for r in results]
        init_state = {k: v for r in per_rank for k, v in r["init"].items()}
        full = factory().state_dict()
        assert set(init_state) == set(full), "the stages together hold the whole model, once"
        if init == "full":
            torch.manual_seed(0)
            assert_close_dicts(init_state, factory().state_dict(), "init=full weights")
        want_state, want_grads, want_losses = reference(init_state)
        ref = factory()
        for r in per_rank:
            tag = f"{schedule} M={m} init={init} stage {r['stage']}"
            assert_close_dicts(r["final"], want_state, f"{tag} weights")
            for step, g in enumerate(r["grads"]):
                assert_close_dicts(g, want_grads[step], f"{tag} grad step {step}")
            assert r["losses"] == pytest.approx(want_losses, abs=ATOL), tag
            # each rank holds exactly its stage's parameters
            mods = pl.expand(ref, _stage_placement(world)[r["stage"]]["modules"])
            expected = {k for n in mods for k in ref.get_submodule(n).state_dict(prefix=n + ".")}
            assert set(r["final"]) == expected, tag
            assert r["numel"] == sum(p.numel() for n in mods for p in ref.get_submodule(n).parameters()) < sum(
                p.numel() for p in ref.parameters()
            )
            assert 0.0 <= r["bubble"] < 1.0 and "pipeline/bubble_fraction" in r["metrics"]
            assert r["memory"][r["stage"]]["params_bytes"] == 4 * r["numel"]
            if r["stage"] == world - 1:
                ref.load_state_dict(want_state)
                assert torch.allclose(r["eval"], ref(batches(1)[0][0]), atol=ATOL)
            else:
                assert r["eval"] is None
            if "ckpt_keys" in r:
                assert_close_dicts(r["reloaded"], r["final"], f"{tag} reloaded")
        rank0 = results[0][c]
        if "ckpt_keys" in rank0:
            assert rank0["ckpt_keys"] == sorted(full), "rank 0's checkpoint holds the whole model"


CONFIGS_2 = [("gpipe", 1, "meta"), ("gpipe", 4, "meta"), ("1f1b", 2, "meta"), ("1f1b", 4, "full")]
CONFIGS_4 = [("gpipe", 1, "meta"), ("gpipe", 4, "meta"), ("1f1b", 4, "meta")]


@pytest.mark.timeout(240)
def test_two_ranks_gloo_equal_unsplit():
    results = run_distributed(_pipeline_worker, 2, 2, CONFIGS_2, timeout=200)
    _check_against_reference(results, CONFIGS_2, 2)


@pytest.mark.timeout(240)
def test_four_ranks_gloo_equal_unsplit():
    results = run_distributed(_pipeline_worker, 4, 4, CONFIGS_4, timeout=200)
    _check_against_reference(results, CONFIGS_4, 4)


# ---------------------------------------------------------------------- the CLI
@pytest.mark.timeout(300)
def test_cli_trains_digits_on_two_pipeline_ranks(tmp_path):
    proc = run_torchrun(
        ["strategy=model_parallel", "strategy.schedule=1f1b", f"hydra.run.dir={tmp_path}",
         "trainer.progress_bar=false", "trainer.max_epochs=8"],
        nproc=2, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.95, summary
    assert 0.0 <= summary["bubble_fraction"] < 1.0
    assert "placement: auto proposes" in proc.stdout and "memory per stage" in proc.stdout
    assert "{modules: [layers.0-1], rank: 0}" in proc.stdout
    ckpt = torch.load(sorted((tmp_path / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert set(ckpt["model"]) == set(MLP().state_dict()), "the checkpoint holds the whole model"
