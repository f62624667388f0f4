"""strategy=fsdp (torch fully_shard): on 2 and 4 gloo processes, and HSDP 2 x 2, training equals
one process on the gathered batch; each rank holds 1/N of parameters, gradients and optimizer
state; sharded checkpoints resume after a kill and across world sizes (2 -> 4, 4 -> 2); the CLI
trains digits; bad options fail with the fix. Activation checkpointing leaves results unchanged.

Oracle: plain single-process torch (tests/oracle.py) on the concatenation of the batches of every
rank and micro-step of a step (which samples form a step does not depend on the world size: the
loaders deal each global batch round-robin). Tolerance atol 1e-5 in fp32: both sides compute the
same mean-loss gradient and differ only in summation order (reduce-scatter of N partial
gradients, the clipping norm summed from shards), a few ulp per step on weights of order 1,
while a real mistake (a missed reduction, an unscaled accumulation, a local clipping norm)
moves the weights by ~1e-2. Checkpoints must restore every value exactly.

The multi-process runs are shared to keep the file fast on 2 cores: one 2-process launch (oracle,
checkpoints at 2), one killed and one resuming 2-process launch (which also loads the 4-rank
checkpoint), one 4-process launch (oracle, HSDP, shard sizes, the 2-rank checkpoint loaded).
Each launch runs several Sessions, one per configuration, over one process group.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed import run_distributed, run_python, run_torchrun
from tests.oracle import LR, assert_same_state, gathered_batches, reference, tiny_model
from tests.oracle import regression_data as _data

K = 4  # optimizer steps of the first runs (checkpoints at 2 and 4)
MORE = 6  # a run resumed from step K continues to this step
ACCUM = 2
BATCH = 16  # global micro-batch: 8 samples per rank at N=2, 4 at N=4
CLIP = 0.5  # below these steps' gradient norms: clipping is active
SEED = 7  # the loaders' shuffling seed
AC = {"wrap": ["Linear"], "activation_checkpointing": ["Linear"]}  # the AdamW runs' options


def _eval_data():
    """17 samples: evaluated in shards of 9 and 8 at N=2, in batches of 8."""
    x, y = _data().tensors
    return torch.utils.data.TensorDataset(x[:17], y[:17])


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


def _oracle(make_optimizer, steps: int = K) -> tuple[dict, list[float]]:
    return reference(gathered_batches(_data(), 1, steps, ACCUM, BATCH, seed=SEED), make_optimizer, CLIP)


def _ckpt(root, run: str) -> str:
    return f"{root}/{run}/checkpoints/step_{K:08d}.pt"


def _assert_identical(got: dict, want: dict) -> None:
    """Model and optimizer state (as ``_full_state`` gathers them) equal, bit for bit."""
    assert_same_state(got["model"], want["model"], atol=0)
    assert got["optimizer"].keys() == want["optimizer"].keys()
    for name, st in want["optimizer"].items():
        assert_same_state(got["optimizer"][name], st, atol=0)


# --------------------------------------------------------------------------- in the spawned ranks
_SESSIONS: list = []


def _session(strategy: str = "fsdp", **options):
    """A Session kept open until ``_close_all``: a launch's sessions share one process group."""
    import disttrain

    options = {"gradient_accumulation_steps": ACCUM, "grad_clip": CLIP, "seed": 0, **options}
    _SESSIONS.append(disttrain.setup(strategy=strategy, **options))
    return _SESSIONS[-1]


def _close_all() -> None:
    while _SESSIONS:
        _SESSIONS.pop().close()


def _full_state(model, optimizer) -> dict:
    """Model and optimizer state gathered whole on rank 0 (empty elsewhere), keyed by name; a
    copy (a value that needs no gathering, such as Adam's step count, would be the live tensor)."""
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    m, o = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return copy.deepcopy({"model": m, "optimizer": o.get("state", {})})


def _fit(session, make_optimizer, max_steps: int = K, run_dir: str | None = None, resume: str | None = None,
         eval_data=None):
    """The Trainer on tiny_model (checkpoints every 2 steps); returns it, its gathered state and
    its summary."""
    from disttrain.trainer import Trainer, TrainerConfig

    cfg = TrainerConfig(max_epochs=1, max_steps=max_steps, gradient_accumulation_steps=ACCUM, grad_clip=CLIP,
                        log_every_n_steps=2, checkpoint_every_n_steps=2, resume=resume)
    model = tiny_model()
    trainer = Trainer(session, model, make_optimizer(model.parameters()), torch.nn.MSELoss(), _data(),
                      batch_size=BATCH, config=cfg, seed=SEED, run_dir=run_dir, eval_data=eval_data)
    summary = trainer.fit()
    return trainer, _full_state(trainer.model, trainer.optimizer), summary


def _load_into_fresh(path: str) -> dict:
    """The plug-in face: prepare a fresh model and AdamW, ``ds.load(path)``; the state it got."""
    ds = _session(**AC)
    model = tiny_model()
    model, optimizer = ds.prepare(model, _adamw(model.parameters()))
    ds.load(path)
    return _full_state(model, optimizer.inner)


def _adamw_run(run_dir: str, resume: str | None = None) -> dict:
    """The run that is killed, resumed, and compared with the uninterrupted one."""
    return _fit(_session(**AC), _adamw, run_dir=run_dir, resume=resume)[1]


def _two_ranks(root: str) -> dict:
    out: dict = {}
    s = _session(wrap="auto", min_params=1, cpu_offload=True)  # auto: both Linears are blocks
    _, state, summary = _fit(s, _sgd, eval_data=_eval_data())  # ranks evaluate 9 and 8 samples: 2 and 1 batches
    out["sgd"], out["eval_loss"] = state["model"], summary["eval_loss"]
    out["sgd_blocks"] = s.strategy.blocks
    s = _session(**AC)  # the uninterrupted run; its checkpoint is resumed at 4 ranks
    trainer, out["adamw"], _ = _fit(s, _adamw, run_dir=f"{root}/two")
    s.save(f"{root}/two_full.pt", full=True, step=K)
    snapshot = s.snapshot()  # the pre-flight check's in-memory copy restores every value
    s.train_step(trainer.model, trainer.optimizer, [next(iter(trainer.train_loader))], torch.nn.MSELoss())
    s.restore(snapshot)
    out["restored"] = _full_state(trainer.model, trainer.optimizer)
    out["ddp_ac"] = _fit(_session("ddp", activation_checkpointing=["Linear"]), _sgd)[1]["model"]
    _close_all()
    return out


def _four_ranks(root: str) -> dict:
    out: dict = {"sgd": _fit(_session(wrap=["Linear"]), _sgd)[1]["model"]}
    out["adamw"] = _fit(_session(**AC), _adamw, run_dir=f"{root}/four")[1]
    out["loaded_from_two"] = _load_into_fresh(_ckpt(root, "two"))
    out["resumed_from_two"] = _fit(_session(**AC), _adamw, max_steps=MORE, resume=_ckpt(root, "two"))[1]["model"]
    s = _session(wrap=["Linear"], replicate_size=2)
    trainer, state, _ = _fit(s, _adamw)
    out["hsdp"], out["hsdp_differ"] = state["model"], s.check_in_sync()
    out["hsdp_local"] = sum(p.to_local().numel() for p in trainer.model.parameters())
    out["shards"] = _shard_sizes()
    _close_all()
    return out


def _shard_sizes() -> dict:
    """Elements this rank holds of the parameters, gradients and AdamW state of a model whose
    dimensions all divide by 4, after one step through the plug-in face."""
    from disttrain.models import ResidualMLP

    ds = _session(wrap=["Block"], gradient_accumulation_steps=1, grad_clip=None)
    torch.manual_seed(0)
    model = ResidualMLP(in_features=16, hidden=32, out_features=8, depth=2)
    total = sum(p.numel() for p in model.parameters())
    model, optimizer = ds.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    optimizer.zero_grad()
    ds.backward(model(torch.randn(4, 16)).pow(2).mean())
    grads = sum(p.grad.to_local().numel() for p in model.parameters())
    optimizer.step()
    state = sum(v.to_local().numel() for st in optimizer.state.values() for k, v in st.items() if k != "step")
    params = sum(p.to_local().numel() for p in model.parameters())
    return {"total": total, "params": params, "grads": grads, "optimizer": state, "blocks": ds.strategy.blocks}


def _resume_ranks(root: str) -> dict:
    out = {"resumed": _adamw_run(f"{root}/killed", resume="auto")}
    out["loaded_from_four"] = _load_into_fresh(_ckpt(root, "four"))
    out["resumed_from_four"] = _fit(_session(**AC), _adamw, max_steps=MORE, resume=_ckpt(root, "four"))[1]["model"]
    _close_all()
    return out


# --------------------------------------------------------------------------- the launches
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def two(root):
    return run_distributed(_two_ranks, 2, str(root), timeout=200)[0]


@pytest.fixture(scope="module")
def four(root, two):
    return run_distributed(_four_ranks, 4, str(root), timeout=300)[0]


@pytest.fixture(scope="module")
def resumed(root, four):
    with pytest.raises(RuntimeError, match="exit code -9"):  # rank 1 SIGKILLs itself after step 3
        run_distributed(_adamw_run, 2, f"{root}/killed", timeout=120, env={"DISTTRAIN_FAULT": "kill@1:3"})
    assert (root / "killed" / "checkpoints" / "latest").read_text() == "step_00000002.pt"
    return run_distributed(_resume_ranks, 2, str(root), timeout=200)[0]


# --------------------------------------------------------------------------- oracle
@pytest.mark.timeout(300)
def test_two_ranks_equal_one_process(two, root):
    sgd, norms = _oracle(_sgd)
    assert max(norms) > CLIP  # clipping acted
    assert_same_state(two["sgd"], sgd, atol=1e-5)  # auto blocks, cpu_offload, momentum SGD
    model = tiny_model()
    model.load_state_dict(sgd)
    x, y = _eval_data().tensors
    with torch.no_grad():  # uneven eval shards: every sample counted once, no rank left waiting
        assert two["eval_loss"] == pytest.approx(torch.nn.functional.mse_loss(model(x), y).item(), abs=1e-5)
    assert sorted(two["sgd_blocks"]) == ["0", "2"]
    assert_same_state(two["adamw"]["model"], _oracle(_adamw)[0], atol=1e-5)  # + activation checkpointing
    assert_same_state(two["ddp_ac"], sgd, atol=1e-5)  # ddp with activation checkpointing
    _assert_identical(two["restored"], two["adamw"])
    # ds.save(full=True) and the export tool write the same whole model, loadable weights-only
    full = torch.load(root / "two_full.pt", weights_only=True)
    assert full["extra"] == {"step": K}
    assert_same_state(full["model"], two["adamw"]["model"], atol=0)
    proc = run_python(["-m", "disttrain.export", _ckpt(root, "two"), str(root / "exported.pt")])
    assert proc.returncode == 0, proc.stderr
    assert_same_state(torch.load(root / "exported.pt", weights_only=True)["model"], full["model"], atol=0)


@pytest.mark.timeout(480)
def test_four_ranks_and_hsdp_equal_one_process(four):
    assert_same_state(four["sgd"], _oracle(_sgd)[0], atol=1e-5)
    adamw = _oracle(_adamw)[0]
    assert_same_state(four["adamw"]["model"], adamw, atol=1e-5)
    assert_same_state(four["hsdp"], adamw, atol=1e-5)
    assert four["hsdp_differ"] == []  # replicas of each shard agree
    assert four["hsdp_local"] * 2 >= sum(p.numel() for p in tiny_model().parameters())  # sharded in 2, not 4


@pytest.mark.timeout(480)
def test_each_rank_holds_a_quarter_of_the_model_states(four):
    sh = four["shards"]
    assert sorted(sh["blocks"]) == ["layers.1", "layers.2"]
    assert sh["params"] == sh["grads"] == sh["total"] // 4
    assert sh["optimizer"] == 2 * sh["total"] // 4  # exp_avg and exp_avg_sq


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.timeout(480)
def test_checkpoint_of_two_ranks_resumes_at_four(two, four):
    _assert_identical(four["loaded_from_two"], two["adamw"])
    # steps 5-6 at N=4 read the samples N=2 would have: equal to one process over all 6 steps
    assert_same_state(four["resumed_from_two"], _oracle(_adamw, MORE)[0], atol=1e-5)


@pytest.mark.timeout(600)
def test_kill_and_resume_equals_the_uninterrupted_run(two, resumed):
    _assert_identical(resumed["resumed"], two["adamw"])


@pytest.mark.timeout(600)
def test_checkpoint_of_four_ranks_resumes_at_two(four, resumed):
    _assert_identical(resumed["loaded_from_four"], four["adamw"])
    assert_same_state(resumed["resumed_from_four"], _oracle(_adamw, MORE)[0], atol=1e-5)


# --------------------------------------------------------------------------- the CLI
@pytest.mark.timeout(420)
@pytest.mark.slow  # the app end to end (bf16, activation checkpointing, export); the oracles above prove fsdp
def test_cli_trains_digits(tmp_path):
    out = tmp_path / "run"
    proc = run_torchrun(
        ["strategy=fsdp", "strategy.wrap=[Block]", "model=residual_mlp", "activation_checkpointing=[Block]",
         "optimizer=adam", "trainer.max_epochs=8", "trainer.grad_clip=5.0", "precision=bf16", f"hydra.run.dir={out}"],
        nproc=2, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "fsdp: 2 block(s) sharded" in proc.stdout and "activation checkpointing: 2 block(s)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.95, summary
    assert summary["fsdp_blocks"] == 2
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    assert latest.with_suffix(".shards").is_dir()
    # the export tool's file serves inference in one plain process, at the run's accuracy
    proc = run_python(["-m", "disttrain.export", str(latest), str(tmp_path / "model.pt")])
    assert proc.returncode == 0, proc.stderr
    from disttrain.data import digits
    from disttrain.models import ResidualMLP

    model = ResidualMLP(in_features=64, hidden=128, out_features=10, depth=2)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True)["model"])
    x, y = digits(test_fraction=0.2, seed=0)[1].tensors
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).double().mean().item() >= 0.95


# --------------------------------------------------------------------------- failing fast, one process
@pytest.mark.parametrize(
    "options,world,words",
    [
        ({}, 1, ["WORLD_SIZE=1", "--nproc_per_node", "strategy=single"]),
        ({"replicate_size": 3}, 4, ["replicate_size=3", "[1, 2, 4]"]),
        ({"wrap": "blocks"}, 2, ["strategy.wrap='blocks'", "auto", "[Block]"]),
        ({"wrap": []}, 2, ["strategy.wrap=[]", "[Block]"]),
        ({"min_params": 0}, 2, ["min_params=0", ">= 1"]),
    ],
)
def test_bad_options_fail_in_validate(options, world, words):
    from disttrain.env import DistEnv
    from disttrain.errors import ConfigError
    from disttrain.registry import build_strategy

    with pytest.raises(ConfigError) as err:
        build_strategy("fsdp", **options).validate(DistEnv(rank=0, world_size=world, local_world_size=world))
    for w in words:
        assert w in str(err.value)


def test_blocks_by_name_or_size_and_unknown_names():
    from disttrain import blocks
    from disttrain.errors import ConfigError
    from disttrain.models import ResidualMLP

    model = ResidualMLP(in_features=16, hidden=32, out_features=8, depth=2)  # blocks of 8,416 parameters
    assert blocks.select(model, ["Block"], "strategy.wrap") == ["layers.2", "layers.1"]  # children first
    assert blocks.select(model, "auto", "k", min_params=4000) == ["layers.1.fc1", "layers.1.fc2", "layers.2.fc1",
                                                                 "layers.2.fc2"]
    assert blocks.select(model, "auto", "k", min_params=4000, single_layers=False) == ["layers.1", "layers.2"]
    with pytest.raises(ConfigError) as err:
        blocks.select(model, ["TransformerBlock"], "strategy.wrap")
    assert "['TransformerBlock'] match no module" in str(err.value)
    assert "['Block', 'Dropout', 'GELU', 'LayerNorm', 'Linear', 'Sequential']" in str(err.value)


def test_optimizer_checks_name_the_fix():
    from disttrain.errors import ConfigError
    from disttrain.strategies.fsdp import _check_optimizer

    model = tiny_model()
    _check_optimizer(torch.optim.AdamW(model.parameters()), model, cpu_offload=True)  # runs on CPU tensors
    with pytest.raises(ConfigError, match=r"capturable=True\) steps only on accelerator tensors.*cpu_offload=false"):
        _check_optimizer(torch.optim.Adam(model.parameters(), capturable=True), model, cpu_offload=True)
    stepped = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    stepped.step()
    with pytest.raises(ConfigError, match="before its first step"):
        _check_optimizer(stepped, model, cpu_offload=False)
    with pytest.raises(ConfigError, match="not the model's"):
        _check_optimizer(torch.optim.SGD(tiny_model().parameters(), lr=0.1), model, cpu_offload=False)


def test_activation_checkpointing_keeps_numbers_and_keys():
    """One process (strategy=single): the same losses and weights, the same state dict keys,
    less saved activation memory; bad specs fail with the fix."""
    import disttrain
    from disttrain.cli import AppSettings
    from disttrain.errors import ConfigError
    from disttrain.models import ResidualMLP

    def train(spec):
        ds = disttrain.setup(strategy="single", activation_checkpointing=spec)
        torch.manual_seed(0)
        model = ResidualMLP(in_features=16, hidden=32, out_features=8, depth=2)
        model, opt = ds.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        torch.manual_seed(1)
        x = torch.randn(64, 16)
        saved = []
        for _ in range(3):
            opt.zero_grad()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
                loss = model(x).pow(2).mean()
            ds.backward(loss)
            opt.step()
        ds.close()
        return model.state_dict(), sum(saved)

    plain, plain_saved = train(None)
    checkpointed, ac_saved = train(["Block"])
    assert_same_state(checkpointed, plain, atol=0)
    assert ac_saved < plain_saved / 2
    with pytest.raises(ConfigError, match="activation_checkpointing='yes': expected auto"):
        disttrain.setup(strategy="single", activation_checkpointing="yes")
    with pytest.raises(ConfigError, match="activation_checkpointing=5: expected"):
        AppSettings(activation_checkpointing=5)
    assert AppSettings(activation_checkpointing=["Block"]).activation_checkpointing == ["Block"]
