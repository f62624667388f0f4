"""The raw reference: plain torch DistributedDataParallel training with no disttrain code, the
same model, data, optimizer, batch split and thread settings as
``torchrun -m disttrain data=synthetic model=mlp optimizer=adam`` (see benchmarks/sweep.py for the
matching overrides). Launch::

    torchrun --standalone --nproc_per_node=2 benchmarks/raw_ddp.py --record-dir /tmp/raw \
        --in-features 64 --hidden 256 --depth 2 --batch 256 --steps 50

Every rank writes ``record-dir/rank<r>.json`` in the probe's format (benchmarks/probe.py): per
optimizer step its end time and phase times, and its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


class MLP(nn.Module):
    """The same layers (and parameter names) as disttrain.models.MLP with relu, no dropout."""

    def __init__(self, in_features: int, hidden: int, out_features: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def synthetic(num_samples: int, in_features: int, out_features: int, noise: float, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(in_features, out_features, generator=g)
    b = torch.randn(out_features, generator=g)
    x = torch.randn(num_samples, in_features, generator=g)
    return TensorDataset(x, x @ w + b + noise * torch.randn(num_samples, out_features, generator=g))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record-dir", required=True)
    p.add_argument("--in-features", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--out-features", type=int, default=1)
    p.add_argument("--batch", type=int, default=256, help="global batch, split across ranks")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=0, help="0: just enough for --steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    torch.manual_seed(args.seed)
    num_samples = args.num_samples or (args.steps + 1) * args.batch
    data = synthetic(num_samples, args.in_features, args.out_features, 0.1, args.seed)
    torch.manual_seed(args.seed)
    model = MLP(args.in_features, args.hidden, args.out_features, args.depth).to(device)
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[local] if cuda else None, gradient_as_bucket_view=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch // world, sampler=sampler, drop_last=True)
    loss_fn = nn.MSELoss()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    records = []
    it = iter(loader)
    for _ in range(min(args.steps, len(loader))):
        phases: dict[str, float] = defaultdict(float)
        t = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device), y.to(device)
        sync()
        t, phases["data"] = time.perf_counter(), time.perf_counter() - t
        loss = loss_fn(model(x), y)
        sync()
        t, phases["forward"] = time.perf_counter(), time.perf_counter() - t
        loss.backward()
        sync()
        t, phases["backward"] = time.perf_counter(), time.perf_counter() - t
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        phases["optimizer"] = time.perf_counter() - t
        loss.item()
        records.append({"t_end": time.perf_counter(), "phases": dict(phases)})

    out = {
        "rank": rank, "world_size": world, "shard": [rank, world], "strategy": "raw_ddp",
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "steps": records,
    }
    os.makedirs(args.record_dir, exist_ok=True)
    with open(os.path.join(args.record_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    del model
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
