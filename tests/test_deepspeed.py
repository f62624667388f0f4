"""strategy=deepspeed: ZeRO on 2 gloo processes equals one process training on the gathered batch;
checkpoints round-trip through DeepSpeed's own format; the CLI trains digits; a missing or
misconfigured engine fails at once with the fix.

Oracle: plain single-process torch SGD on the concatenation of the batches every rank trained on
(no disttrain or DeepSpeed code in it). Tolerance: atol 1e-5 on fp32 weights after a few steps.
Both sides compute the same mean-loss gradient; they differ only in floating-point summation
order (DeepSpeed sums two half-batch gradients over gloo, scales by 1/world and flattens ZeRO
partitions), i.e. a few ulp (~1e-7) per step on weights of order 1 - well below 1e-5 - while any
real mistake (a missed reduction, a double loss scaling, a skipped micro-batch) moves the weights
by ~1e-2.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed import ROOT, run_distributed, run_python, run_torchrun
from tests.oracle import LR, assert_same_state, gathered_batches
from tests.oracle import regression_data as _data
from tests.oracle import sgd_reference as _reference
from tests.oracle import tiny_model as _model

K_STEPS = 4
WORLD = 2
MICRO = 8  # samples per rank per micro-batch


def _assert_same(got, want, atol=1e-5) -> None:
    assert_same_state(got, want, atol)


# --------------------------------------------------------------------------- Trainer path
def _trainer_worker(stage: int, accum: int):
    import disttrain
    from disttrain.trainer import Trainer, TrainerConfig

    cfg = TrainerConfig(max_epochs=1, max_steps=K_STEPS, gradient_accumulation_steps=accum, log_every_n_steps=2)
    session = disttrain.setup(strategy="deepspeed", zero_stage=stage, gradient_accumulation_steps=accum, seed=0)
    model = _model()
    trainer = Trainer(
        session, model, torch.optim.SGD(model.parameters(), lr=LR), torch.nn.MSELoss(), _data(),
        batch_size=WORLD * MICRO, config=cfg, seed=7,
    )
    summary = trainer.fit()
    state = session.strategy.state_dict(trainer.model, None)["model"]  # gathered under ZeRO-3
    del trainer, model
    session.close()
    return state, summary["steps"], summary.get("zero_stage")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage,accum", [(1, 2), (2, 1), (3, 2)])
def test_zero_matches_single_process_on_gathered_batch(stage, accum):
    results = run_distributed(_trainer_worker, WORLD, stage, accum, timeout=280)
    assert [r[1:] for r in results] == [(K_STEPS, stage)] * WORLD
    _assert_same(results[1][0], results[0][0], atol=0)  # every rank ends with the same weights
    # The Trainer reads each rank's DistributedSampler shard (seed 7, epoch 0).
    steps = gathered_batches(_data(), WORLD, K_STEPS, accum, MICRO, seed=7)
    _assert_same(results[0][0], _reference(steps))


# --------------------------------------------------------------------------- Session API + checkpoints
def _session_worker(ckpt_dir: str):
    """The README's plug-in loop with momentum SGD: 3 steps, ds.save, 2 more steps (-> A); then a
    fresh model and engine, ds.load, the same 2 steps (-> B). B == A needs the sharded momentum
    restored, not just the weights."""
    import disttrain

    ds = disttrain.setup(strategy="deepspeed", zero_stage=2, gradient_accumulation_steps=2)
    x, y = _data().tensors
    rank = ds.rank

    def batches(step):  # this rank's two micro-batches of global step `step`
        base = step * 2 * WORLD * MICRO
        return [
            (x[base + (m * WORLD + rank) * MICRO: base + (m * WORLD + rank + 1) * MICRO],
             y[base + (m * WORLD + rank) * MICRO: base + (m * WORLD + rank + 1) * MICRO])
            for m in range(2)
        ]

    def train(model, optimizer, steps):
        for s in steps:
            for xb, yb in batches(s):
                optimizer.zero_grad()
                ds.backward(torch.nn.functional.mse_loss(model(xb), yb))
                optimizer.step()

    def fresh():
        model = _model()
        return ds.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9))

    model, optimizer = fresh()
    train(model, optimizer, range(3))
    ds.save(f"{ckpt_dir}/step_3.pt", keep_last=2, step=3)
    train(model, optimizer, range(3, 5))
    a = ds.strategy.state_dict(model, None)["model"]
    ds.strategy.teardown()
    model, optimizer = fresh()
    extra = ds.load(f"{ckpt_dir}/step_3.pt")
    train(model, optimizer, range(3, 5))
    b = ds.strategy.state_dict(model, None)["model"]
    del model, optimizer
    ds.close()
    return a, b, extra


@pytest.mark.timeout(300)
def test_session_loop_and_checkpoint_roundtrip(tmp_path):
    results = run_distributed(_session_worker, WORLD, str(tmp_path), timeout=280)
    (a0, b0, extra0), (a1, _, _) = results
    assert extra0["step"] == 3 and extra0["meta"]["zero_stage"] == 2
    _assert_same(a1, a0, atol=0)
    _assert_same(b0, a0, atol=0)  # resumed == uninterrupted, bit for bit
    x, y = _data().tensors
    n = 2 * WORLD * MICRO
    _assert_same(a0, _reference([[(x[s * n:(s + 1) * n], y[s * n:(s + 1) * n])] for s in range(5)], momentum=0.9))
    # the manifest is an ordinary disttrain checkpoint; the shards are DeepSpeed's
    assert (tmp_path / "latest").read_text() == "step_3.pt"
    from disttrain.checkpoint import shards_dir

    assert any(shards_dir(tmp_path / "step_3.pt").iterdir())


# --------------------------------------------------------------------------- the CLI
@pytest.mark.slow  # the oracle tests above prove the engine; this is the app end to end
@pytest.mark.timeout(420)
def test_cli_trains_digits(tmp_path):
    out = tmp_path / "run"
    proc = run_torchrun(
        ["strategy=deepspeed", "strategy.zero_stage=2", "optimizer=adam", "trainer.max_epochs=8",
         "trainer.grad_clip=5.0", "precision=bf16", f"hydra.run.dir={out}"],
        nproc=2, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.95, summary
    assert summary["zero_stage"] == 2
    for key in ("steps", "elapsed_s", "samples_per_sec", "step_time_ms"):
        assert key in summary
    assert list((out / "checkpoints").glob("step_*.shards"))  # DeepSpeed's own shards beside the manifests


# --------------------------------------------------------------------------- failing fast
def _run(code: str):
    return run_python(["-c", code], cwd=ROOT)


def test_missing_deepspeed_says_how_to_install():
    proc = _run(
        "import sys; sys.modules['deepspeed'] = None\n"  # makes `import deepspeed` raise ImportError
        "import disttrain\n"
        "from disttrain.errors import ConfigError\n"
        "try:\n    disttrain.setup(strategy='deepspeed')\n"
        "except ConfigError as e:\n    print('CONFIG-ERROR', e)\n"
    )
    assert "CONFIG-ERROR" in proc.stdout, proc.stdout + proc.stderr
    assert "disttrain[deepspeed]" in proc.stdout or ".[deepspeed]" in proc.stdout
    assert "pip install" in proc.stdout


@pytest.mark.parametrize(
    "options,words",
    [
        ({"zero_stage": 4}, ["zero_stage=4", "[0, 1, 2, 3]"]),
        ({"config": {"gradient_accumulation_steps": 4}}, ["gradient_accumulation_steps", "trainer.gradient_accumulation_steps"]),
        ({"config": {"zero_optimization": {"stage": 3}}}, ["zero_optimization.stage", "strategy.zero_stage"]),
    ],
)
def test_bad_options_fail_in_validate(options, words):
    from disttrain.env import DistEnv
    from disttrain.errors import ConfigError
    from disttrain.registry import build_strategy

    strategy = build_strategy("deepspeed", **options)
    with pytest.raises(ConfigError) as err:
        strategy.validate(DistEnv())
    for w in words:
        assert w in str(err.value)


def test_config_maps_session_options_and_merges_passthrough():
    from disttrain.registry import build_strategy
    from disttrain.strategies.base import RunOptions

    strategy = build_strategy("deepspeed", zero_stage=3, config={"zero_optimization": {"overlap_comm": True},
                                                                 "communication_data_type": "fp32"})
    strategy.run_options = RunOptions(precision="bf16", gradient_accumulation_steps=4, grad_clip=0.5)
    cfg = strategy.ds_config()
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert cfg["communication_data_type"] == "fp32"
    # no trainer.grad_clip means no clipping (DeepSpeed's own default would clip at 1.0)
    strategy.run_options = RunOptions()
    assert strategy.ds_config()["gradient_clipping"] == 0.0
