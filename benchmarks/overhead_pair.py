"""disttrain's overhead over raw torch DDP, measured so that the machine's noise cancels: one
job (``torchrun --nproc_per_node=N benchmarks/overhead_pair.py ...``) builds, in the same
processes, two raw torch DDP replicas (A1, A2) and one disttrain-prepared ``ddp`` replica (B) of
the same MLP with Adam, fed the same batches (drawn once; ``--loaders``: each with its own data
loader instead, raw DataLoader + DistributedSampler against ``Session.prepare_loader``, which
adds the loaders' difference to the comparison). Every round times one step of each, the order alternating
(A1 B A2, then A2 B A1, ...), so drift and the neighbours' load hit all of them alike. Per round:
B / A1 (the overhead) and A2 / A1 (the A/A control, the noise floor); the report is the median of
the per-round ratios with its spread. Step = next batch, forward, loss, backward (gradients
allreduced), optimizer step, ``loss.item()``; the disttrain step is ``Session.train_step``, what
the Trainer runs. Rank 0 writes ``--out`` (JSON)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from benchmarks.raw_ddp import MLP, synthetic


def _cycle(loader: Any):
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--in-features", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch", type=int, default=256, help="global batch, split across ranks")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--loaders", action="store_true", help="each replica reads through its own loader")
    args = p.parse_args(argv)

    import disttrain

    session = disttrain.setup(strategy="ddp", accelerator="auto")  # the process group, one thread on CPU
    rank, world, device = session.rank, session.world_size, session.device
    data = synthetic(4096, args.in_features, 1, 0.1, 0)
    loss_fn = nn.MSELoss()
    per_rank = args.batch // world
    shared = [(data.tensors[0][i:i + per_rank].to(device), data.tensors[1][i:i + per_rank].to(device))
              for i in range(0, len(data) - per_rank + 1, per_rank)]

    def raw() -> Callable[[], float]:
        torch.manual_seed(0)
        model = DistributedDataParallel(MLP(args.in_features, args.hidden, 1, args.depth).to(device),
                                        device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sampler: DistributedSampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
        it = _cycle(DataLoader(data, batch_size=per_rank, sampler=sampler, drop_last=True) if args.loaders else shared)

        def step() -> float:
            x, y = next(it)
            loss = loss_fn(model(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    def ours() -> Callable[[], float]:
        torch.manual_seed(0)
        plain = MLP(args.in_features, args.hidden, 1, args.depth)
        model, opt = session.prepare_model(plain, torch.optim.Adam(plain.parameters(), lr=1e-3))
        assert opt is not None
        loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True)
        it = _cycle(session.prepare_loader(loader) if args.loaders else shared)

        def step() -> float:
            loss = session.train_step(model, opt, [next(it)], loss_fn)
            session.timer.end_step()
            return loss.item()
        return step

    steps = {"a1": raw(), "b": ours(), "a2": raw()}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in steps}
    orders = (("a1", "b", "a2"), ("a2", "b", "a1"))
    for i in range(args.warmup + args.rounds):
        for name in orders[i % 2]:
            sync()
            t0 = time.perf_counter()
            steps[name]()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        res = {"world_size": world, "device": str(device), "rounds": args.rounds, "warmup": args.warmup,
               "loaders": args.loaders,
               "per_rank_batch": args.batch // world, "step_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
               "ratio_b_over_a": [b / a for b, a in zip(times["b"], times["a1"])],
               "ratio_a_over_a": [a2 / a1 for a2, a1 in zip(times["a2"], times["a1"])],
               "median_step_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()}}
        tmp = f"{args.out}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(res, f)
        os.replace(tmp, args.out)
    del steps
    session.close()


if __name__ == "__main__":
    main()
