"""Communication micro-benchmarks, launched with torchrun (one launch per world size)::

    torchrun --standalone --nproc_per_node=4 -m benchmarks.comm --out /tmp/comm4.json

1. allreduce of a float32 buffer over message sizes (4 KB .. 64 MB by default) with the backend
   the training uses (gloo on CPU, NCCL on GPU). Sizes are visited round-robin (one op of each
   size, then the next round) so drift on a shared machine spreads over all sizes; every op is
   preceded by a barrier and its time is the slowest rank's.
2. gradient synchronisation of a model with 100 parameter tensors: disttrain's DDP strategy
   (bucketed allreduce overlapped with backward) against the same backward followed by one
   allreduce per parameter tensor, and against backward alone (no sync), alternating A B C.

``memcpy_bandwidth`` (the single-host ceiling) runs in the calling process, not under torchrun.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def memcpy_bandwidth(nbytes: int = 64 << 20, iters: int = 20, device: str = "cpu") -> dict:
    """Copy bandwidth of this host's memory (device memory on GPU): bytes copied / time, median
    over ``iters`` copies of an ``nbytes`` buffer (each copy reads and writes ``nbytes``)."""
    dev = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 3):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= 3:  # warm-up: page faults, allocator
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return {"bytes": nbytes, "median_s": med, "bandwidth": nbytes / med, "best_bandwidth": nbytes / times[0],
            "device": str(dev), "threads": torch.get_num_threads()}


class Deep(nn.Module):
    """``layers`` Linear(width, width) layers with biases: 2 x layers parameter tensors."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)])

    def forward(self, x):
        return self.layers(x)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", type=int, nargs="*", default=DEFAULT_SIZES)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad-width", type=int, default=128)
    p.add_argument("--grad-tensors", type=int, default=100)
    p.add_argument("--grad-batch", type=int, default=8)
    p.add_argument("--grad-iters", type=int, default=20)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    args = p.parse_args(argv)

    from disttrain.env import DistEnv, configure_threads
    from disttrain.strategies.ddp import DDPStrategy

    env = DistEnv.from_environ()
    device = env.device("auto")
    configure_threads(device, 1)
    strategy = DDPStrategy(bucket_cap_mb=args.bucket_cap_mb)
    backend = env.backend(device)
    strategy.setup(env, device, backend, 300.0)  # starts the process group
    world = env.world_size

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def slowest(seconds: list[float]) -> list[float]:
        t = torch.tensor(seconds, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    result: dict = {"world_size": world, "backend": backend, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    # 1. allreduce sweep, round-robin over sizes
    bufs = {s: torch.ones(max(s // 4, 1), dtype=torch.float32, device=device) for s in args.sizes}
    times: dict[int, list[float]] = {s: [] for s in args.sizes}
    for i in range(args.warmup + args.iters):
        for s in args.sizes:
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            dist.all_reduce(bufs[s])
            sync()
            if i >= args.warmup:
                times[s].append(time.perf_counter() - t0)
    result["allreduce"] = {str(s): slowest(v) for s, v in times.items()}
    del bufs

    # 2. gradient sync: disttrain DDP (bucketed) vs one allreduce per tensor vs no sync
    layers = args.grad_tensors // 2
    torch.manual_seed(0)
    plain = Deep(args.grad_width, layers).to(device)
    ddp_model, _ = strategy.wrap(copy.deepcopy(plain), None)
    params = [q for q in plain.parameters()]
    x = torch.randn(args.grad_batch, args.grad_width, device=device)

    def step_ddp() -> None:
        ddp_model(x).square().mean().backward()
        for q in ddp_model.parameters():
            q.grad = None

    def step_per_tensor() -> None:
        plain(x).square().mean().backward()
        for q in params:
            dist.all_reduce(q.grad)
        for q in params:
            q.grad = None

    def step_local() -> None:
        plain(x).square().mean().backward()
        for q in params:
            q.grad = None

    modes = {"ddp_bucketed": step_ddp, "per_tensor": step_per_tensor, "no_sync": step_local}
    gtimes: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(args.warmup + args.grad_iters):
        for name, fn in modes.items():  # A B C A B C ...
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= args.warmup:
                gtimes[name].append(time.perf_counter() - t0)
    result["grad_sync"] = {
        "param_tensors": len(params),
        "params": sum(q.numel() for q in params),
        "bytes": sum(q.numel() * q.element_size() for q in params),
        "bucket_cap_mb": args.bucket_cap_mb,
        "times": {m: slowest(v) for m, v in gtimes.items()},
    }
    del modes, step_ddp  # release the DDP model (its reducer holds the group) before the group ends
    if env.rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    strategy.teardown()
    from disttrain.env import destroy_process_group

    destroy_process_group()


if __name__ == "__main__":
    main()
