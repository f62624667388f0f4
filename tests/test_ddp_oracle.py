"""DDP on 2 gloo processes equals one process training on the gathered batch.

Each rank returns the batches it actually trained on; the oracle is plain single-process torch
SGD over those batches concatenated (the gathered batch), with no disttrain code in it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from tests.distributed import run_distributed
from tests.oracle import LR, assert_same_state, gathered_batches, sgd_reference
from tests.oracle import regression_data as _data
from tests.oracle import tiny_model as _model

K_STEPS = 6
WORLD = 2


def _assert_same(got, want):
    assert_same_state(got, want, atol=1e-6)


# --------------------------------------------------------------------------- Session API
def _session_worker(accum: int):
    import disttrain

    ds = disttrain.setup(strategy="ddp", gradient_accumulation_steps=accum)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(_data(), batch_size=16, shuffle=True)  # global batch 16 -> 8 per rank
    model, optimizer, loader = ds.prepare(model, optimizer, loader)
    seen = []
    while len(seen) < K_STEPS * accum:  # crosses an epoch boundary (set_epoch) when accum > 2
        for x, y in loader:  # the README's loop, as a user writes it
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            ds.backward(loss)
            optimizer.step()
            seen.append((x.clone(), y.clone()))
            if len(seen) == K_STEPS * accum:
                break
    state = {k: v.detach().clone() for k, v in ds.unwrap(model).state_dict().items()}
    del model, optimizer
    ds.close()
    return state, seen


@pytest.mark.timeout(180)
@pytest.mark.parametrize("accum", [1, 3])
def test_session_ddp_matches_single_process_on_gathered_batch(accum):
    results = run_distributed(_session_worker, WORLD, accum)
    states = [r[0] for r in results]
    _assert_same(states[1], states[0])  # every rank ends identical
    steps = []
    for s in range(K_STEPS):
        micro = range(s * accum, (s + 1) * accum)
        steps.append([results[r][1][m] for m in micro for r in range(WORLD)])
    _assert_same(states[0], sgd_reference(steps))
    # each rank read a different, disjoint shard of the data
    x0 = torch.cat([b[0] for b in results[0][1]])
    x1 = torch.cat([b[0] for b in results[1][1]])
    assert not any(torch.equal(a, b) for a in x0[:20] for b in x1[:20])


# --------------------------------------------------------------------------- Trainer
def _trainer_worker(accum: int):
    import disttrain
    from disttrain.trainer import Trainer, TrainerConfig

    cfg = TrainerConfig(max_epochs=1, max_steps=K_STEPS, gradient_accumulation_steps=accum, log_every_n_steps=2)
    session = disttrain.setup(strategy="ddp", gradient_accumulation_steps=accum, seed=0)
    model = _model()
    trainer = Trainer(
        session, model, torch.optim.SGD(model.parameters(), lr=LR), torch.nn.MSELoss(), _data(),
        batch_size=16, config=cfg, seed=7,
    )
    summary = trainer.fit()
    state = {k: v.detach().clone() for k, v in session.unwrap(trainer.model).state_dict().items()}
    del trainer, model
    session.close()
    return state, summary["steps"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_ddp_matches_single_process_on_gathered_batch(accum):
    results = run_distributed(_trainer_worker, WORLD, accum)
    assert [r[1] for r in results] == [K_STEPS, K_STEPS]
    _assert_same(results[1][0], results[0][0])
    # The Trainer reads each rank's DistributedSampler shard (seed 7, epoch 0), 8 samples per micro-batch.
    _assert_same(results[0][0], sgd_reference(gathered_batches(_data(), WORLD, K_STEPS, accum, 8, seed=7)))


def _single_reference_through_session():
    import disttrain

    ds = disttrain.setup(strategy="single")
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = ds.prepare(model, optimizer)
    x, y = _data().tensors
    for _ in range(3):
        optimizer.zero_grad()
        ds.backward(torch.nn.functional.mse_loss(model(x[:16]), y[:16]))
        optimizer.step()
    return copy.deepcopy(model.state_dict()), [[(x[:16], y[:16])]] * 3


def test_single_strategy_is_plain_torch():
    state, steps = _single_reference_through_session()
    _assert_same(state, sgd_reference(steps))
