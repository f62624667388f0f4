"""The plug-in face: collectives, rank-zero helpers, accumulation, precision, save/load."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import disttrain
from disttrain.errors import ConfigError
from tests.distributed import run_distributed


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def _collectives_worker(tmp: str):
    ds = disttrain.setup(strategy="ddp", seed=0)
    r = ds.rank
    out = {
        "sum": ds.reduce(torch.tensor([float(r + 1)]), "sum").item(),
        "mean": ds.reduce(torch.tensor([float(r + 1)]), "mean").item(),
        "max": ds.reduce(float(r), "max").item(),
        "min": ds.reduce(float(r), "min").item(),
    }
    out["rank_zero_only"] = ds.rank_zero_only(lambda: "ran")()
    order = []
    with ds.main_process_first():
        order.append(("inside", r))
    # save on every rank (rank 0 writes), then load into a freshly prepared model
    model = _tiny()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model, opt = ds.prepare(model, opt)
    x = torch.randn(8, 4)
    opt.zero_grad()
    ds.backward(model(x).pow(2).mean())
    opt.step()
    ds.save(f"{tmp}/ck.pt", note="hello", step=3)
    saved = {k: v.clone() for k, v in ds.unwrap(model).state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    extra = ds.load(f"{tmp}/ck.pt")
    restored = ds.unwrap(model).state_dict()
    out["load_ok"] = all(torch.equal(saved[k], restored[k]) for k in saved)
    out["extra"] = extra
    out["opt_state_steps"] = [float(s["step"]) for s in opt.state_dict()["state"].values()]
    # a global batch that does not split evenly is refused with the fix in the message
    try:
        ds.prepare(DataLoader(TensorDataset(torch.zeros(10, 4)), batch_size=7))
    except ConfigError as exc:
        out["split_error"] = str(exc)
    del model, opt
    ds.close()
    return out


@pytest.mark.timeout(180)
def test_collectives_helpers_and_checkpoint_roundtrip(tmp_path):
    res = run_distributed(_collectives_worker, 2, str(tmp_path))
    for r, out in enumerate(res):
        assert out["sum"] == 3.0 and out["mean"] == 1.5 and out["max"] == 1.0 and out["min"] == 0.0
        assert out["rank_zero_only"] == ("ran" if r == 0 else None)
        assert out["load_ok"]
        assert out["extra"]["note"] == "hello" and out["extra"]["step"] == 3
        assert out["opt_state_steps"] == [1.0, 1.0]
        assert "batch size 7 is not divisible by the 2 data-parallel ranks" in out["split_error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "latest"]  # rank 0 wrote once


def test_accumulation_steps_only_at_cycle_end():
    ds = disttrain.setup(strategy="single", gradient_accumulation_steps=3)
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = ds.prepare(model, opt)
    before = model.weight.detach().clone()
    x = torch.randn(9, 4)
    applied = []
    for i in range(3):
        opt.zero_grad()
        ds.backward(model(x[3 * i:3 * i + 3]).pow(2).mean())
        opt.step()
        applied.append(not torch.equal(before, model.weight))
    assert applied == [False, False, True]
    # the one step equals SGD on the mean loss of the three micro-batches
    ref = _tiny()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    torch.stack([ref(x[3 * i:3 * i + 3]).pow(2).mean() for i in range(3)]).mean().backward()
    ref_opt.step()
    torch.testing.assert_close(model.weight, ref.weight, atol=1e-7, rtol=0)
    ds.close()


def test_bf16_forward_returns_fp32_and_close_is_idempotent():
    ds = disttrain.setup(strategy="single", precision="bf16")
    model = ds.prepare(_tiny())
    out = model(torch.randn(3, 4))
    assert out.dtype == torch.float32
    ds.close()
    ds.close()


def test_sharded_loader_reshuffles_each_epoch():
    ds = disttrain.setup(strategy="single")
    data = TensorDataset(torch.arange(32).float())
    loader = ds.prepare(DataLoader(data, batch_size=8, shuffle=True))
    epoch0 = torch.cat([b[0] for b in loader])
    epoch1 = torch.cat([b[0] for b in loader])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(32))
    assert not torch.equal(epoch0, epoch1)
    ds.close()


def test_bad_arguments_name_the_value():
    with pytest.raises(ConfigError, match="precision='fp8'"):
        disttrain.setup(strategy="single", precision="fp8")
    with pytest.raises(ConfigError, match="strategy='nope' is not a known strategy: available are"):
        disttrain.setup(strategy="nope")
    ds = disttrain.setup(strategy="single")
    with pytest.raises(TypeError, match="expected nn.Module, Optimizer or DataLoader"):
        ds.prepare("not a model")
    with pytest.raises(RuntimeError, match="call ds.prepare"):
        ds.backward(torch.tensor(1.0, requires_grad=True))
    ds.close()


def test_tensor_dataset_fast_path_gives_the_default_loaders_batches():
    """A TensorDataset with the default collate is read a batch at a time (one gather per tensor,
    not one index per sample); every batch of two epochs must equal what the per-sample path,
    forced by a custom collate_fn, yields with the same sampler."""
    from torch.utils.data import default_collate

    ds = disttrain.setup(strategy="single", accelerator="cpu", seed=0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(100, 3, generator=g), torch.randint(0, 5, (100,), generator=g))
    fast = ds.prepare_loader(DataLoader(data, batch_size=16, shuffle=True), seed=3)
    slow = ds.prepare_loader(DataLoader(data, batch_size=16, shuffle=True, collate_fn=lambda b: default_collate(b)), seed=3)
    assert type(fast.loader.dataset).__name__ == "_BatchIndexed" and slow.loader.dataset is data
    assert fast.dataset is data  # the user's dataset, for len() and checkpoints
    for _ in range(2):
        pairs = list(zip(fast, slow, strict=True))
        assert len(pairs) == 7  # 100 samples, 16 a batch, the last one short
        for a, b in pairs:
            assert isinstance(a, list) and len(a) == 2
            for ta, tb in zip(a, b):
                assert ta.dtype == tb.dtype and torch.equal(ta, tb)
    ds.close()
