"""DDP on 2 gloo processes equals one process training on the gathered batch.

Each rank returns the batches it actually trained on; the oracle is plain single-process torch
SGD over those batches concatenated (the gathered batch), with no disttrain code in it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from tests.distributed import run_distributed

K_STEPS = 6
WORLD = 2
LR = 0.05


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _data():
    from disttrain.data import synthetic_regression

    return synthetic_regression(num_samples=256, in_features=8, seed=1)[0]


def _reference(batches_per_step: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Plain torch: one SGD step per entry, on the concatenation of its batches (mean loss)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for batches in batches_per_step:
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model.state_dict()


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=f"parameter {k} differs")


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
    _assert_same(states[0], _reference(steps))
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
    data = _data()
    order = [list(DistributedSampler(data, WORLD, r, shuffle=True, seed=7, drop_last=True)) for r in range(WORLD)]
    steps = []
    for s in range(K_STEPS):
        batch = []
        for m in range(s * accum, (s + 1) * accum):
            for r in range(WORLD):
                idx = order[r][m * 8:(m + 1) * 8]
                batch.append((data.tensors[0][idx], data.tensors[1][idx]))
        steps.append(batch)
    _assert_same(results[0][0], _reference(steps))


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
    _assert_same(state, _reference(steps))
