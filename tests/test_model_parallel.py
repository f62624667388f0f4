"""strategy=model_parallel: placed and pipelined training equals the unsplit model.

Oracle: the same model, unsplit, on one process, trained on the gathered batch with the same
initial weights, optimizer and data. Spawned jobs are few and each checks several configurations
in sequence inside the same processes (2-core CI): one 2-process job for the schedules and the
front ends, one 4-process DP2 x PP2 job that also trains uninterrupted with the Trainer, then a
killed and a resumed run, and a 2-process job that loads the DP2 x PP2 checkpoint at D=1.
"""

from __future__ import annotations

import copy
import json
import re
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from disttrain.env import DistEnv
from disttrain.errors import ConfigError
from disttrain.models import MLP
from disttrain.strategies.base import Strategy
from disttrain.strategies.model_parallel import ModelParallelStrategy, cost, schedule_order, schedules, tracing
from disttrain.strategies.model_parallel import placement as pl
from disttrain.strategies.model_parallel.stage_module import narrow_optimizer
from disttrain.timing import StepTimer
from tests.distributed import run_distributed, run_torchrun

STEPS = 3
BATCH = 16
ATOL = 1e-6
ORACLE_ATOL = 1e-5


# ---------------------------------------------------------------------- models
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # no key bias: its true gradient is 0, which Adam would amplify
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (c // self.heads) ** 0.5
        att = att.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, heads)
        self.ln2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT whose forward is not a chain: token + positional embedding, blocks in a ModuleList,
    final norm and head. Its own initialisation (std 0.02) is what every test checks survives."""

    VOCAB, CTX, WIDTH = 32, 8, 16

    def __init__(self, n_layer: int = 4) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(self.VOCAB, self.WIDTH), nn.Embedding(self.CTX, self.WIDTH)
        self.blocks = nn.ModuleList(Block(self.WIDTH, 2) for _ in range(n_layer))
        self.ln_f, self.head = nn.LayerNorm(self.WIDTH), nn.Linear(self.WIDTH, self.VOCAB)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class InitGPT(TinyGPT):
    """Defines ``init_weights()`` (draws keyed by parameter name): built on meta under init=auto."""

    def init_weights(self) -> None:
        for name, p in self.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0 if ".ln" in f".{name}" and name.endswith("weight") else 0.0)


def gpt_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def gpt_batches(steps: int = STEPS, batch: int = 8, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    v, t = TinyGPT.VOCAB, TinyGPT.CTX
    return [(torch.randint(0, v, (batch, t), generator=g), torch.randint(0, v, (batch, t), generator=g)) for _ in range(steps)]


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    """The user's optimizer: weight decay on matrices only (two groups), as GPT recipes do."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95))


def gpt_reference(factory, kind: str, steps: list, clip: float | None = None) -> dict:
    """The unsplit model on one process, each step on the whole (gathered) batch."""
    torch.manual_seed(0)
    model = factory()
    if isinstance(model, InitGPT):
        with torch.no_grad():
            model.init_weights()
    init = copy.deepcopy(model.state_dict())
    opt = make_optimizer(kind, model)
    losses = []
    for batches in steps:
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        loss = gpt_loss(model(x), y)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        ev = model(gpt_batches(1, batch=6, seed=99)[0][0])
    return {"init": init, "final": model.state_dict(), "losses": losses, "eval": ev}


def assert_close_dicts(got: dict, want: dict, what: str, atol: float = ATOL) -> None:
    assert set(got) <= set(want), f"{what}: unexpected keys {set(got) - set(want)}"
    for k, v in got.items():
        assert torch.allclose(v, want[k], atol=atol, rtol=0), f"{what} {k}: max diff {(v - want[k]).abs().max()}"


# ---------------------------------------------------------------------- one process, devices
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


def test_activation_peak_is_lower_under_1f1b():
    peaks = {}
    for kind in ("gpipe", "1f1b"):
        torch.manual_seed(0)
        st = single_strategy(microbatches=8, schedule=kind)
        model = st.build_model(factory)
        st.train_step(model, RecordingSGD(model.parameters()), [batches(1)[0]], nn.CrossEntropyLoss(), None, StepTimer())
        peaks[kind] = [e["activation_peak_bytes"] for e in st.memory_report()]
    assert all(a < g for a, g in zip(peaks["1f1b"], peaks["gpipe"])), peaks
    order = schedule_order("1f1b", 3, 8)
    assert sorted(order) == sorted([("F", i) for i in range(8)] + [("B", i) for i in range(8)])


def test_one_process_auto_placement_balances_parameters_and_prints_pinnable_config():
    model = MLP()  # 64-128-128-10: layers.0 8320, layers.2 16512, layers.4 1290 parameters
    specs = pl.propose_by_bytes(model, ["cpu", "cpu"])
    assert [s.names for s in specs] == [("layers.0-1",), ("layers.2-4",)]
    text = pl.to_yaml(specs)
    from omegaconf import OmegaConf

    pinned = OmegaConf.to_container(OmegaConf.create(text.split("\n# ")[0]))["placement"]
    assert pl.parse(pinned) == specs
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(text.split("'")[1])
    assert override.key_or_group == "strategy.placement" and pl.parse(override.value()) == specs


# ---------------------------------------------------------------------- pure parts of the pipeline
@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2),
                                    ("interleaved_zero_bubble", 2), ("zbv", 2)])
def test_torch_schedule_orders_reproduce_each_schedules_bubble_formula(name, v):
    """The cost model plays torch's own per-rank order: with equal stages (forward 1, backward 2;
    zero bubble's input and weight halves 1 each) the simulated bubble is the schedule's formula."""
    spec = schedules.get(name)
    for k, m in ((2, 4), (4, 8)):
        orders = spec.rank_orders(k, v, m)
        for r, order in orders.items():  # every micro-batch forward and backward once on every stage
            assert sorted(o for o in order if o[0] == "F") == sorted(
                ("F", s, i) for s in range(k * v) if spec.stage_ranks(k, v)[s] == r for i in range(m))
        step, busy, _ = cost.simulate(orders, [1.0] * (k * v), [2.0] * (k * v), [1.0] * (k * v))
        assert 1 - sum(busy) / len(busy) / step == pytest.approx(spec.bubble(k, v, m))


def test_partition_minimises_the_slowest_stage_within_the_memory_cap():
    units = [cost.UnitCost(f"u{i}", t, 2 * t, 100, 100, 200, 50) for i, t in enumerate([1, 1, 1, 3, 1, 1])]
    spec = schedules.get("1f1b")
    orders = spec.rank_orders(2, 1, 4)
    cuts = cost.partition(units, spec.stage_ranks(2, 1), orders, None)
    assert cuts == [0, 3, 6]  # 3 + 5 units of time: the best split of [1,1,1,3,1,1]
    # a cap that the first stage's four units exceed (static 400 each, activations 50 x 2 in flight)
    cuts = cost.partition(units, spec.stage_ranks(2, 1), orders, 1500)
    assert cuts[1] <= 3
    with pytest.raises(ConfigError, match="memory_cap_gb"):
        cost.partition(units, spec.stage_ranks(2, 1), orders, 500)
    with pytest.raises(ConfigError, match="at least 4 modules"):
        cost.partition(units[:3], schedules.get("zbv").stage_ranks(2, 2), schedules.get("zbv").rank_orders(2, 2, 2), None)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_optimizer_is_narrowed_in_place_with_its_groups_and_options(kind):
    model = TinyGPT()
    opt = make_optimizer(kind, model)
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    keep = {n for n, _ in model.named_parameters() if n.startswith("blocks.0")}
    replaced = {id(p): None for n, p in model.named_parameters() if n not in keep}
    narrow_optimizer(opt, replaced)
    assert type(opt).__name__ == {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[kind]
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in keep}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # groups left empty step fine
    assert cost.optimizer_state_ratio(opt) == {"sgd": 1.0, "adam": 2.0, "adamw": 2.0}[kind]


def _placement_error(model=TinyGPT, **kw) -> str:
    """Build on every rank of a 2-rank job, without any process group: the same ConfigError each."""
    messages = []
    for rank in range(2):
        env = DistEnv(rank=rank, world_size=2, local_world_size=2)
        st = ModelParallelStrategy(**kw)
        st.validate(env)
        with pytest.raises(ConfigError) as info:
            st.build_model(model)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    return messages[0]


def test_every_placement_error_is_one_clear_message_on_every_rank_before_any_process_group():
    msg = _placement_error(placement=[{"modules": ["tok_emb", "blockz.0-1"]}, {"modules": ["blocks.2-3", "ln_f", "head"]}])
    assert "'blockz.0-1'" in msg and "TinyGPT" in msg and "blocks.0-3" in msg and "layers" not in msg
    msg = _placement_error(placement=[{"modules": ["tok_emb", "pos_emb", "blocks.0-2"]},
                                      {"modules": ["blocks.2-3", "ln_f", "head"]}])
    assert "'blocks.2'" in msg and "stage 0 and stage 1" in msg
    msg = _placement_error(placement=[{"modules": ["tok_emb", "pos_emb", "blocks.0-1"]}, {"modules": ["blocks.2-3", "ln_f"]}])
    assert "['head']" in msg and "placed in no stage" in msg
    three_layers = lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))  # noqa: E731
    msg = _placement_error(three_layers, stages_per_rank=2, schedule="interleaved_1f1b", microbatches=2)
    assert "more stages than layers" in msg and "['0', '1', '2']" in msg
    msg = _placement_error(split_points=["blocks.9"])
    assert "'blocks.9'" in msg and "blocks.0-3" in msg


def test_a_snapshot_taken_before_the_cut_restores_after_it():
    """The Trainer's pre-flight snapshots the model before the first step; with placement: auto the
    stages are cut during the pre-flight steps, and the restore takes this rank's tensors back."""
    st = ModelParallelStrategy(placement="auto")
    st.validate(DistEnv(rank=1, world_size=2, local_world_size=2))
    torch.manual_seed(0)
    model = st.build_model(TinyGPT)
    opt = make_optimizer("adamw", model)
    model, opt = st.wrap(model, opt)
    snapshot = copy.deepcopy(Strategy.state_dict(st, model, opt))
    keep = {n for n in snapshot["model"] if n.startswith(("blocks.2", "blocks.3", "ln_f", "head"))}
    st.role.builder.cut(keep)  # what the first step does on pipeline rank 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            opt.state[p] = {"step": torch.tensor(1.0)}
    st.load_state_dict(model, opt, snapshot)
    assert set(model.state_dict()) == keep and not opt.state
    assert_close_dicts(model.state_dict(), snapshot["model"], "restored", atol=0.0)
    assert [len(g["params"]) for g in opt.param_groups] == [
        sum(1 for n, p in model.named_parameters() if p.dim() >= 2), sum(1 for n, p in model.named_parameters() if p.dim() < 2)]


def test_a_stage_listed_out_of_call_order_is_named():
    with torch.device("meta"):
        skeleton = TinyGPT()
    names = [["tok_emb", "pos_emb", "blocks.0-1"], ["ln_f", "blocks.2-3", "head"]]
    resolved = pl.resolve(skeleton, [pl.StageSpec(i, tuple(n)) for i, n in enumerate(names)])
    traced = tracing.trace(skeleton, (torch.zeros(2, 8, dtype=torch.long),), [resolved[1][0]])
    with pytest.raises(ConfigError, match=r"puts 'blocks.2' in stage 1, but forward runs it in stage 0"):
        tracing.check_placement(traced, resolved, skeleton)


def test_validation_errors_before_anything_moves():
    env1, env2, env4 = (DistEnv(rank=0, world_size=n, local_world_size=n) for n in (1, 2, 4))

    def build(placement, **kw):
        st = single_strategy(placement, **kw)
        model = factory()
        before = {n: p.device for n, p in model.named_parameters()}
        try:
            st.build_model(lambda: model)
        finally:
            assert {n: p.device for n, p in model.named_parameters()} == before

    _expect("placed in stage 0 and stage 1", lambda: build([{"modules": ["layers"], "device": "cpu"}, {"modules": ["layers.6"], "device": "cpu"}]))
    msg = _expect("placed in no stage", lambda: build([{"modules": ["layers.0-3"], "device": "cpu"}, {"modules": ["layers.4-5"], "device": "cpu"}]))
    assert "layers.6" in msg
    msg = _expect("does not have", lambda: build([{"modules": ["layer.0-3"], "device": "cpu"}, {"modules": ["layers.4-6"], "device": "cpu"}]))
    assert "layers" in msg
    _expect("numbered children 0-6", lambda: build([{"modules": ["layers.0-9"], "device": "cpu"}]))
    missing_gpu = f"cuda:{torch.cuda.device_count()}"
    msg = _expect("does not exist", lambda: ModelParallelStrategy([{"modules": ["layers"], "device": missing_gpu}]).validate(env1))
    assert "cpu" in msg
    _expect("not a device|only cpu", lambda: ModelParallelStrategy([{"modules": ["layers"], "device": "gpu7"}]).validate(env1))
    three = [{"modules": [f"layers.{i}"], "rank": i} for i in range(3)]
    _expect("more stages than ranks", lambda: ModelParallelStrategy(three).validate(env2))
    _expect("more stages than ranks", lambda: ModelParallelStrategy(three[:2]).validate(env1))
    _expect("names device", lambda: ModelParallelStrategy(THREE_CPU_STAGES[:2]).validate(env2))
    _expect("microbatches>=2", lambda: ModelParallelStrategy("auto", microbatches=1, schedule="1f1b").validate(env2))
    _expect("microbatches>=3", lambda: ModelParallelStrategy(THREE_CPU_STAGES, microbatches=2, schedule="1f1b").validate(env1))
    _expect("gpipe", lambda: ModelParallelStrategy(schedule="zigzag").validate(env1))
    _expect("integer >= 1", lambda: ModelParallelStrategy(microbatches=0).validate(env1))
    _expect("not a multiple of strategy.pipeline_size=3", lambda: ModelParallelStrategy(pipeline_size=3).validate(env4))
    _expect("exactly 2", lambda: ModelParallelStrategy(schedule="zbv", stages_per_rank=3).validate(env2))
    _expect("one process per pipeline rank", lambda: ModelParallelStrategy(schedule="zbv").validate(env1))
    _expect("runs stage 1 on pipeline rank 1", lambda: ModelParallelStrategy(
        [{"modules": ["a"], "rank": 0}, {"modules": ["b"], "rank": 0}]).validate(env2))
    _expect("multiple of its rounds", lambda: ModelParallelStrategy(
        schedule="interleaved_1f1b", pipeline_size=2, microbatches=5).validate(env2))


def _expect(match: str, fn) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        fn()
    return str(info.value)


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


# ---------------------------------------------------------------------- 2 processes: schedules and front ends
NAMES_2 = [{"modules": ["tok_emb", "pos_emb", "blocks.0-1"]}, {"modules": ["blocks.2-3", "ln_f", "head"]}]
NAMES_4 = [{"modules": ["tok_emb", "pos_emb", "blocks.0"]}, {"modules": ["blocks.1"]}, {"modules": ["blocks.2"]},
           {"modules": ["blocks.3", "ln_f", "head"]}]
CONFIGS_2 = [  # (label, model, strategy options, optimizer, accumulated batches per step, grad clip)
    ("names gpipe", "gpt", dict(placement=NAMES_2, microbatches=2), "sgd", 1, None),
    ("split points 1f1b", "gpt", dict(split_points=["blocks.2"], schedule="1f1b", microbatches=4), "adamw", 2, 0.5),
    ("interleaved 1f1b", "gpt", dict(placement=NAMES_4, schedule="interleaved_1f1b", microbatches=2), "adam", 1, None),
    ("interleaved zero bubble", "gpt", dict(placement=NAMES_4, schedule="interleaved_zero_bubble", microbatches=4), "adamw", 1, None),
    ("zbv", "gpt", dict(split_points=["blocks.1", "blocks.2", "blocks.3"], schedule="zbv", microbatches=2), "sgd", 1, None),
    ("auto", "gpt", dict(placement="auto", schedule="1f1b", microbatches=2), "adamw", 1, None),
    ("meta init", "init_gpt", dict(placement=NAMES_2, init="meta", microbatches=2), "sgd", 1, None),
]
MODELS = {"gpt": TinyGPT, "init_gpt": InitGPT}


def _steps(accum: int) -> list[list[tuple]]:
    data = gpt_batches(STEPS * accum)
    return [data[s * accum:(s + 1) * accum] for s in range(STEPS)]


def _train(st, env, model_name: str, opt_kind: str, accum: int, clip, data_parallel: int = 1) -> dict:
    """Build, wrap, train STEPS steps (each rank on its data-parallel shard), evaluate, export."""
    torch.manual_seed(0)
    model = st.build_model(MODELS[model_name])
    init = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    opt = make_optimizer(opt_kind, model)
    model, opt = st.wrap(model, opt)
    dp, d = st.data_shard(env)
    losses = []
    for batches in _steps(accum):
        mine = [(x.chunk(d)[dp], y.chunk(d)[dp]) for x, y in batches]
        losses.append(st.train_step(model, opt, mine, gpt_loss, clip, StepTimer()).item())
    with torch.no_grad():
        ev = st.eval_forward(model, gpt_batches(1, batch=6, seed=99)[0][0])
    return {
        "init": init, "final": {k: v.clone() for k, v in model.state_dict().items()}, "losses": losses, "eval": ev,
        "pp_rank": st.role.pp_rank, "groups": [len(g["params"]) for g in opt.param_groups],
        "metrics": st.log_metrics(), "bubble": st.bubble_fraction(), "export": st.export_state_dict(model),
        "overlapped": getattr(st.role.grad_sync, "overlapped", None), "memory": st.memory_report(),
    }


def _run_configs(configs) -> list[dict]:
    """Each configuration in turn, in this spawned process."""
    env = DistEnv.from_environ()
    out = []
    for label, model_name, kw, opt_kind, accum, clip in configs:
        st = ModelParallelStrategy(**kw)
        st.validate(env)
        st.setup(env, torch.device("cpu"), "gloo", 60)
        out.append(_train(st, env, model_name, opt_kind, accum, clip))
        st.teardown()
    return out


def _pipeline_worker(configs) -> list[dict]:
    return _run_configs(configs) + [_plugin_face(DistEnv.from_environ())]


def _plugin_face(env: DistEnv) -> dict:
    """The plug-in face: prepare a whole model and its optimizer, one line per step."""
    import disttrain

    ds = disttrain.setup(strategy=ModelParallelStrategy(placement=NAMES_2, microbatches=2), seed=0)
    torch.manual_seed(0)
    model = TinyGPT()
    model, opt = ds.prepare(model, make_optimizer("adamw", model))
    losses = [ds.train_step(model, opt, step[0], gpt_loss).item() for step in _steps(1)]
    x = _steps(1)[0][0][0]
    errors = []
    for call in (lambda: model(x), lambda: ds.backward(torch.zeros((), requires_grad=True))):
        try:
            call()
        except ConfigError as exc:
            errors.append(str(exc))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ds.close()
    return {"losses": losses, "errors": errors, "final": state}


def _check_against_oracle(results: list[list[dict]], configs, world: int, k: int) -> None:
    full_keys = set(TinyGPT().state_dict())
    for c, (label, model_name, kw, opt_kind, accum, clip) in enumerate(configs):
        want = gpt_reference(MODELS[model_name], opt_kind, _steps(accum), clip)
        per_rank = [r[c] for r in results]
        for rank, r in enumerate(per_rank):
            tag = f"{label}: rank {rank}"
            # the user's initialisation survives: the unsplit model's initial values
            assert r["init"], tag
            assert_close_dicts(r["init"], want["init"], f"{tag} initial weights", atol=0.0)
            assert_close_dicts(r["final"], want["final"], f"{tag} weights", atol=ORACLE_ATOL)
            assert 0.0 <= r["bubble"] < 1.0 and "pipeline/bubble_fraction" in r["metrics"], tag
            if r["eval"] is not None:
                assert torch.allclose(r["eval"], want["eval"], atol=ORACLE_ATOL), tag
        # every rank returns its pipeline's loss (on its data-parallel shard); their mean is the batch's
        mean_losses = torch.tensor([r["losses"] for r in per_rank]).mean(0).tolist()
        assert mean_losses == pytest.approx(want["losses"], abs=ORACLE_ATOL), label
        # each rank holds only its stages' parameters; the pipeline ranks together hold the model once
        held = [set(per_rank[p]["final"]) for p in range(k)]
        assert set().union(*held) == full_keys and sum(len(h) for h in held) == len(full_keys), label
        assert sum(r["eval"] is not None for r in per_rank) == world // k, label
        assert per_rank[0]["export"] is not None and list(per_rank[0]["export"]) == list(want["final"]), label
        assert_close_dicts(per_rank[0]["export"], want["final"], f"{label} export", atol=ORACLE_ATOL)
        if opt_kind == "adamw":  # the user's two groups, each narrowed to the rank's parameters
            assert all(len(r["groups"]) == 2 and min(r["groups"]) > 0 for r in per_rank), label


@pytest.mark.timeout(300)
def test_two_ranks_every_schedule_and_front_end_equals_unsplit():
    results = run_distributed(_pipeline_worker, 2, CONFIGS_2, timeout=280)
    _check_against_oracle([r[:-1] for r in results], CONFIGS_2, 2, 2)
    auto = results[1][CONFIGS_2.index(next(c for c in CONFIGS_2 if c[0] == "auto"))]
    assert auto["memory"] is None or len(auto["memory"]) == 2
    plug = [r[-1] for r in results]
    want = gpt_reference(TinyGPT, "adamw", _steps(1))
    for r in plug:
        assert r["losses"] == pytest.approx(want["losses"], abs=ORACLE_ATOL)
        assert_close_dicts(r["final"], want["final"], "plug-in face", atol=ORACLE_ATOL)
        assert len(r["errors"]) == 2 and all("ds.train_step(model, optimizer, (inputs, targets), loss_fn)" in e
                                             for e in r["errors"]), r["errors"]


# ---------------------------------------------------------------------- 4 processes: DP2 x PP2, checkpoints
CONFIGS_4 = [
    ("dp2 x pp2 gpipe", "gpt", dict(placement=NAMES_2, pipeline_size=2, microbatches=2, bucket_cap_mb=0.002), "adamw", 1, None),
    ("dp2 x pp2 zero bubble", "gpt", dict(placement=NAMES_4, pipeline_size=2, schedule="interleaved_zero_bubble",
                                          microbatches=2, bucket_cap_mb=0.002), "sgd", 1, None),
]
TRAIN_KW = dict(placement=NAMES_2, pipeline_size=2, schedule="1f1b", microbatches=2)


def _token_data():
    from torch.utils.data import TensorDataset

    x, y = zip(*gpt_batches(8, batch=8, seed=7))
    return TensorDataset(torch.cat(x), torch.cat(y))


def _trainer_run(run_dir: str, resume: str | None) -> dict:
    """The Trainer on DP2 x PP2: 4 steps, a checkpoint every 2; returns this rank's final state."""
    from disttrain.checkpoint import shards_dir
    from disttrain.session import Session
    from disttrain.strategies.model_parallel import checkpointing
    from disttrain.trainer import Trainer, TrainerConfig

    s = Session(ModelParallelStrategy(**TRAIN_KW), timeout_s=30, seed=0)
    model = s.build_model(TinyGPT)
    cfg = TrainerConfig(max_epochs=1, max_steps=4, checkpoint_every_n_steps=2, log_every_n_steps=2, resume=resume,
                        check_in_sync=True)
    trainer = Trainer(s, model, make_optimizer("adamw", model), gpt_loss, _token_data(), batch_size=8, config=cfg,
                      run_dir=Path(run_dir), seed=3)
    trainer.fit()
    state = checkpointing.local_state(s.unwrap(trainer.model), trainer.optimizer)
    out = {"state": {k: v.clone() for k, v in _flat(state).items()}, "step": trainer.step,
           "shards": str(shards_dir(Path(run_dir) / "checkpoints" / "step_00000004.pt"))}
    del trainer, model
    s.close()
    return out


def _flat(state: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
    return out


def _dp_pp_worker(configs, run_dir: str) -> tuple[list[dict], dict]:
    return _run_configs(configs), _trainer_run(run_dir, None)


def _resume_worker(run_dir: str) -> dict:
    return _trainer_run(run_dir, "auto")


def _load_at_other_d_worker(path: str) -> dict:
    """The DP2 x PP2 checkpoint loaded by a 2-rank pipeline (D=1, same K)."""
    import disttrain
    from disttrain.strategies.model_parallel import checkpointing

    ds = disttrain.setup(strategy=ModelParallelStrategy(**TRAIN_KW), seed=5)
    model = ds.build_model(TinyGPT)
    model, opt = ds.prepare(model, make_optimizer("adamw", model))
    ds.load(path)
    state = {k: v.clone() for k, v in _flat(checkpointing.local_state(model, opt)).items()}
    ds.close()
    return state


@pytest.mark.timeout(600)
def test_dp2_pp2_equals_unsplit_and_kill_and_resume_equals_uninterrupted(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    results = run_distributed(_dp_pp_worker, 4, CONFIGS_4, str(whole), timeout=280)
    _check_against_oracle([r[0] for r in results], CONFIGS_4, 4, 2)
    for r in results:
        assert r[0][0]["overlapped"] >= 1, "buckets all-reduced during backward (gpipe, full backward)"
    uninterrupted = [r[1] for r in results]
    assert all(u["step"] == 4 for u in uninterrupted)
    # the data-parallel replicas of a stage end identical
    assert_close_dicts(uninterrupted[2]["state"], uninterrupted[0]["state"], "replicas", atol=0.0)
    _check_shard_files(Path(uninterrupted[0]["shards"]), {r: set(u["state"]) for r, u in enumerate(uninterrupted)})

    with pytest.raises((RuntimeError, TimeoutError)):  # rank 1 dies after step 3; the others' messages fail
        run_distributed(_trainer_run, 4, str(killed), None, timeout=200, env={"DISTTRAIN_FAULT": "kill@1:3"})
    assert (killed / "checkpoints" / "step_00000002.pt").exists()
    assert not (killed / "checkpoints" / "step_00000004.pt").exists()  # rank 1 died after step 3
    after = run_distributed(_resume_worker, 4, str(killed), timeout=200)
    for r in range(4):
        assert after[r]["step"] == 4
        assert_close_dicts(after[r]["state"], uninterrupted[r]["state"], f"resumed rank {r}", atol=0.0)

    # the same checkpoint at another data-parallel size (D=1, K=2): each rank loads its stage
    loaded = run_distributed(_load_at_other_d_worker, 2, str(whole / "checkpoints" / "step_00000004.pt"), timeout=120)
    for r in range(2):
        assert_close_dicts(loaded[r], uninterrupted[r]["state"], f"loaded at D=1 rank {r}", atol=0.0)
        assert set(loaded[r]) == set(uninterrupted[r]["state"])


def _check_shard_files(directory: Path, keys_by_rank: dict[int, set[str]]) -> None:
    """No rank's file holds another stage's tensors: each key is stored in the file of a rank
    that holds that key itself."""
    from disttrain.checkpoint import _RestrictedUnpickler

    with open(directory / ".metadata", "rb") as f:
        meta = _RestrictedUnpickler(f).load()
    tensors = {fqn for fqn, md in meta.state_dict_metadata.items() if type(md).__name__ == "TensorStorageMetadata"}
    files = {index.fqn: info.relative_path for index, info in meta.storage_data.items() if index.fqn in tensors}
    assert files and set(files) == tensors, "every tensor is stored"
    writers = set()
    for fqn, rel in files.items():
        writer = int(re.match(r"__(\d+)_", rel).group(1))
        assert fqn in keys_by_rank[writer], f"{fqn} written by rank {writer}, which does not hold it"
        writers.add(writer)
    assert {w % 2 for w in writers} == {0, 1}, "each pipeline rank's stage written by one of its own replicas"


# ---------------------------------------------------------------------- the CLI under torchrun
@pytest.mark.slow  # DP2 x PP2 equals the unsplit model in test_dp2_pp2_...; this is the app end to end
@pytest.mark.timeout(300)
def test_cli_trains_digits_on_dp2_x_pp2(tmp_path):
    proc = run_torchrun(
        ["strategy=model_parallel", "strategy.pipeline_size=2", "strategy.schedule=1f1b", f"hydra.run.dir={tmp_path}",
         "trainer.progress_bar=false", "trainer.max_epochs=8"],
        nproc=4, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.95, summary
    assert 0.0 <= summary["bubble_fraction"] < 1.0
    assert "placement: auto proposes" in proc.stdout and "memory and time per pipeline rank" in proc.stdout
    assert "  - {modules: [layers." in proc.stdout and "measured/predicted" in proc.stdout
    manifest = torch.load(sorted((tmp_path / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert "model" not in manifest and manifest["extra"]["meta"]["layout"] == "pipeline"
    assert list((tmp_path / "checkpoints").glob("*.shards/.metadata"))
