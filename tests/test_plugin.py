"""The plug-in face on real processes: the README's adapted loop, unchanged, under every
data-parallel strategy equals one process on the gathered batch; a plug-in loop saved mid-epoch
and resumed continues bit for bit; per-rank batch sizes; DeepSpeed warns about a user's own
gradient clipping. Strategies run one after another inside one spawned job (each on its own port)
to keep CI short."""

from __future__ import annotations

import logging
import os
import runpy

import pytest
import torch
from torch import nn

from tests.distributed import ROOT, free_port, run_distributed

# strategy -> options (JSON, as a launcher would pass them): every exact data-parallel engine
# (the parameter server at staleness 0, with its shards served on a thread of each rank, is
# synchronous: it equals the oracle too)
ADAPTED = {"ddp": None, "deepspeed": '{"zero_stage": 1}', "fsdp": None, "horovod": None,
           "parameter_server": '{"max_staleness": 0}'}


def _use_port(offset: int) -> None:
    os.environ["MASTER_PORT"] = str(int(os.environ["DT_BASE_PORT"]) + offset)


def _adapted_loop_under(strategies: dict) -> dict:
    """``examples/adapted_loop.py`` run as it is, the strategy chosen by the launcher's
    environment; returns the final weights of each run."""
    out = {}
    for i, (name, options) in enumerate(strategies.items()):
        _use_port(i)
        os.environ["DISTTRAIN_STRATEGY"] = name
        os.environ.pop("DISTTRAIN_STRATEGY_OPTIONS", None)
        if options:
            os.environ["DISTTRAIN_STRATEGY_OPTIONS"] = options
        g = runpy.run_path(str(ROOT / "examples" / "adapted_loop.py"), run_name="__main__")
        ds = g["ds"]
        out[name] = ds.full_state_dict()  # gathered on the main process (fsdp's shards too)
        del g
        ds.close()
    return out


def _adapted_loop_oracle() -> dict:
    """The same five epochs in one process: each step averages the two ranks' mean losses over
    the shards their samplers give them (which is what averaging their gradients computes)."""
    from sklearn.datasets import load_digits
    from torch.utils.data import DistributedSampler

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    samplers = [DistributedSampler(range(len(x)), num_replicas=2, rank=r, shuffle=True, seed=0) for r in (0, 1)]
    for epoch in range(5):
        shards = []
        for s in samplers:
            s.set_epoch(epoch)
            shards.append(list(s))
        for start in range(0, len(shards[0]), 32):
            optimizer.zero_grad()
            losses = [nn.functional.cross_entropy(model(x[idx[start:start + 32]]), y[idx[start:start + 32]])
                      for idx in shards]
            (sum(losses) / 2).backward()
            optimizer.step()
    return model.state_dict()


@pytest.mark.timeout(400)
def test_readme_loop_unchanged_under_every_data_parallel_strategy_equals_one_process():
    results = run_distributed(_adapted_loop_under, 2, ADAPTED, timeout=360,
                              env={"DT_BASE_PORT": str(free_port() + 200)})
    want = _adapted_loop_oracle()
    assert all(got is None for res in results[1:] for got in res.values())  # gathered on rank 0 only
    for name, got in results[0].items():
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=0, msg=lambda m, k=k, name=name: f"{name} {k}: {m}")


# ------------------------------------------------------------------------ exact resume, plug-in face
def _plugin_loop(tmp: str, stop_after: int | None, resume: bool) -> list[float]:
    """A user's loop with dropout and shuffling: returns this rank's loss at every step it runs.
    ``stop_after``: save (mid-epoch) after that many steps and stop; ``resume``: load and go on."""
    from torch.utils.data import DataLoader

    import disttrain
    from disttrain.data import synthetic_regression

    ds = disttrain.setup(strategy="ddp", seed=0, timeout_s=60)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    loader = DataLoader(synthetic_regression(96, seed=2)[0], batch_size=16, shuffle=True)
    model, optimizer, loader, scheduler = ds.prepare(model, optimizer, loader, scheduler)
    start_epoch, step = 0, 0
    if resume:
        extra = ds.load(f"{tmp}/ckpt.pt")
        start_epoch, step = extra["epoch"], extra["step"]
    losses = []
    for epoch in range(start_epoch, 3):
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            ds.backward(loss)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            if step == stop_after:
                ds.save(f"{tmp}/ckpt.pt", epoch=epoch, step=step)
                ds.close()
                return losses
    ds.close()
    return losses


@pytest.mark.timeout(300)
def test_plugin_loop_saved_mid_epoch_resumes_bit_for_bit(tmp_path):
    """``ds.save``/``ds.load`` restore the prepared loader's position (epoch 1, 2 of its 6
    batches), the scheduler and every rank's RNG: the resumed loop's losses are the
    uninterrupted loop's, bit for bit, on every rank."""
    full = run_distributed(_plugin_loop, 2, str(tmp_path), None, False, timeout=120)
    first = run_distributed(_plugin_loop, 2, str(tmp_path), 8, False, timeout=120)
    rest = run_distributed(_plugin_loop, 2, str(tmp_path), None, True, timeout=120)
    for rank in (0, 1):
        assert len(full[rank]) == 18 and len(first[rank]) == 8 and len(rest[rank]) == 10
        assert first[rank] + rest[rank] == full[rank], rank


# ------------------------------------------------------------------------ per-rank batches, clipping
def _batch_sizes_and_clip_warning(caplog_level: int) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    import disttrain

    _use_port(0)
    ds = disttrain.setup(strategy="ddp", batch_size_per_rank=True)
    loader = ds.prepare(DataLoader(TensorDataset(torch.zeros(64, 4)), batch_size=16))
    sizes = [len(b[0]) for b in loader]
    ds.close()
    # DeepSpeed: a user's own clip_grad_norm_ between backward and step is warned about, once
    _use_port(1)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("disttrain").addHandler(handler)
    ds = disttrain.setup(strategy="deepspeed", zero_stage=1)
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    model, optimizer = ds.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    for _ in range(3):
        optimizer.zero_grad()
        ds.backward(model(torch.randn(8, 4)).pow(2).mean())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        optimizer.step()
    ds.close()
    return {"sizes": sizes, "warnings": [r for r in records if "clip_grad_norm_" in r]}


@pytest.mark.timeout(200)
def test_batch_size_per_rank_and_deepspeed_user_clipping_warning():
    results = run_distributed(_batch_sizes_and_clip_warning, 2, logging.WARNING, timeout=180,
                              env={"DT_BASE_PORT": str(free_port() + 300)})
    for res in results:
        assert res["sizes"] == [16, 16]  # 64 samples, 2 ranks, 16 per rank as the loader says
        assert len(res["warnings"]) == 1 and "setup(grad_clip=...)" in res["warnings"][0]
