"""strategy=horovod: hvd.DistributedOptimizer on 2 gloo processes (launched like torchrun, not
horovodrun) equals one process training on the gathered batch; the CLI trains digits; a missing
engine fails at once with the fix.

Oracle: plain single-process torch SGD on the concatenation of the batches every rank trained on
(no disttrain or Horovod code in it). Tolerance: atol 1e-5 on fp32 weights after a few steps.
Both sides compute the same mean-loss gradient; they differ only in floating-point summation
order (Horovod averages two half-batch gradients in a fused gloo allreduce), i.e. a few ulp
(~1e-7) per step on weights of order 1 - well below 1e-5 - while a missed allreduce, a double
scaling or a skipped micro-batch moves the weights by ~1e-2.
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
def _trainer_worker(accum: int, clip: float | None):
    import disttrain
    from disttrain.trainer import Trainer, TrainerConfig

    cfg = TrainerConfig(max_epochs=1, max_steps=K_STEPS, gradient_accumulation_steps=accum, grad_clip=clip,
                        log_every_n_steps=2)
    session = disttrain.setup(strategy="horovod", gradient_accumulation_steps=accum, grad_clip=clip, seed=0)
    torch.manual_seed(1 + session.rank)  # different start on each rank: the broadcast must fix it
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    if session.rank == 0:
        model.load_state_dict(_model().state_dict())
    trainer = Trainer(
        session, model, torch.optim.SGD(model.parameters(), lr=LR), torch.nn.MSELoss(), _data(),
        batch_size=WORLD * MICRO, config=cfg, seed=7,
    )
    summary = trainer.fit()
    state = {k: v.detach().clone() for k, v in session.unwrap(trainer.model).state_dict().items()}
    del trainer, model
    session.close()
    return state, summary["steps"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("accum,clip", [pytest.param(1, None, marks=pytest.mark.slow), (2, 0.5)])
def test_horovod_matches_single_process_on_gathered_batch(accum, clip):
    results = run_distributed(_trainer_worker, WORLD, accum, clip, timeout=280)
    assert [r[1] for r in results] == [K_STEPS] * WORLD
    _assert_same(results[1][0], results[0][0], atol=0)  # every rank ends with the same weights
    steps = gathered_batches(_data(), WORLD, K_STEPS, accum, MICRO, seed=7)
    _assert_same(results[0][0], _reference(steps, clip=clip))


# --------------------------------------------------------------------------- the CLI
@pytest.mark.slow  # the oracle tests above prove the engine; this is the app end to end
@pytest.mark.timeout(420)
def test_cli_trains_digits(tmp_path):
    out = tmp_path / "run"
    proc = run_torchrun(
        ["strategy=horovod", "strategy.compression=fp16", "optimizer=adam", "trainer.max_epochs=8",
         f"hydra.run.dir={out}"],
        nproc=2, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.95, summary
    assert summary["compression"] == "fp16"
    for key in ("steps", "elapsed_s", "samples_per_sec", "step_time_ms"):
        assert key in summary
    assert (out / "checkpoints" / "latest").is_file()


# --------------------------------------------------------------------------- failing fast
def _run(code: str):
    return run_python(["-c", code], cwd=ROOT)


def test_missing_horovod_says_how_to_install():
    proc = _run(
        "import sys; sys.modules['horovod'] = None; sys.modules['horovod.torch'] = None\n"
        "import disttrain\n"
        "from disttrain.errors import ConfigError\n"
        "try:\n    disttrain.setup(strategy='horovod')\n"
        "except ConfigError as e:\n    print('CONFIG-ERROR', e)\n"
    )
    assert "CONFIG-ERROR" in proc.stdout, proc.stdout + proc.stderr
    assert "scripts/install_horovod.sh" in proc.stdout


def test_bad_compression_fails_in_validate():
    from disttrain.env import DistEnv
    from disttrain.errors import ConfigError
    from disttrain.registry import build_strategy

    with pytest.raises(ConfigError, match=r"compression='bf16'.*\['none', 'fp16'\]"):
        build_strategy("horovod", compression="bf16").validate(DistEnv())
