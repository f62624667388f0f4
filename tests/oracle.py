"""The oracle every data-parallel engine is checked against: plain single-process torch on the
gathered batch, with no disttrain code in it. Shared by the DDP, DeepSpeed and Horovod tests."""

from __future__ import annotations

import torch
from torch.utils.data import DistributedSampler

LR = 0.05


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def regression_data():
    from disttrain.data import synthetic_regression

    return synthetic_regression(num_samples=256, in_features=8, seed=1)[0]


def sgd_reference(batches_per_step, momentum: float = 0.0, clip: float | None = None) -> dict[str, torch.Tensor]:
    """One SGD step per entry, on the concatenation of its batches (mean MSE loss)."""
    return reference(batches_per_step, lambda params: torch.optim.SGD(params, lr=LR, momentum=momentum), clip)[0]


def reference(batches_per_step, make_optimizer, clip: float | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """``tiny_model`` trained one step per entry by ``make_optimizer(params)``, on the
    concatenation of its batches (mean MSE loss), clipping the gradient norm to ``clip``.
    Returns the final weights and each step's gradient norm before clipping."""
    model = tiny_model()
    opt = make_optimizer(model.parameters())
    norms = []
    for batches in batches_per_step:
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
    return model.state_dict(), norms


def gathered_batches(data, world: int, steps: int, accum: int, micro: int, seed: int) -> list[list[tuple]]:
    """What the Trainer feeds: rank r reads its DistributedSampler shard (epoch 0), ``micro``
    samples per micro-batch; an optimizer step gathers ``accum`` micro-batches of every rank."""
    order = [list(DistributedSampler(data, world, r, shuffle=True, seed=seed, drop_last=True)) for r in range(world)]
    out = []
    for s in range(steps):
        batch = []
        for m in range(s * accum, (s + 1) * accum):
            for r in range(world):
                idx = order[r][m * micro:(m + 1) * micro]
                batch.append((data.tensors[0][idx], data.tensors[1][idx]))
        out.append(batch)
    return out


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=f"parameter {k} differs")
