"""A measuring probe around any disttrain strategy, selected from the command line so the launch
stays a plain ``torchrun -m disttrain``::

    strategy._target_=benchmarks.probe.probed +strategy.base=disttrain.strategies.ddp.DDPStrategy \
        +strategy.record_dir=/tmp/rec +strategy.probe_comm=true

``probed`` builds the named strategy class with its usual options, as a subclass that also
records, per optimizer step on every rank: the end time of the step, the trainer's phase times
(data, forward, backward, optimizer and the strategy's own), and with ``probe_comm`` on a DDP
model the launch and completion times of each gradient-bucket allreduce (a comm hook that wraps
torch's own ``allreduce_hook``). At teardown each rank writes ``record_dir/rank<r>.json`` with
those records and its peak memory (RSS on CPU, allocated on GPU). The per-step cost is a dict
copy and one ``perf_counter`` call.

With ``probe_memory`` it also records the bytes allocated (``allocated_bytes``) when the model is
about to be built (the baseline: data loaded, no model), and on the second optimizer step (in the
warm-up) at its start, before its first backward and after the optimizer stepped (before
gradients are zeroed): ``benchmarks/memory.py`` turns them into model-state and activation memory.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from disttrain.footprint import allocated_bytes  # glibc mallinfo2 on CPU, memory_allocated on CUDA

_CLASSES: dict[type, type] = {}


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def probed(base: str, record_dir: str, probe_comm: bool = False, probe_memory: bool = False, **options: Any):
    """Instantiate strategy class ``base`` (import path) with ``options``, wrapped in the probe."""
    cls = _import(base)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Probed{cls.__name__}", (_ProbeMixin, cls), {})
    obj = _CLASSES[cls](**options)
    obj._probe_init(record_dir, probe_comm, probe_memory)
    return obj


def _first_optimizer_step() -> None:
    """Torch's first optimizer costs ~25 MB of one-time imports and caches: pay it before the
    memory baseline, so it is not counted as model state."""
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.zeros(1)
    torch.optim.Adam([p]).step()


class _ProbeMixin:
    def _probe_init(self, record_dir: str, probe_comm: bool, probe_memory: bool = False) -> None:
        self._rec_dir = Path(record_dir)
        self._probe_comm = bool(probe_comm)
        self._probe_memory = bool(probe_memory)
        self._records: list[dict[str, Any]] = []
        self._buckets: list[tuple[float, float, int]] = []
        self._bwd_end: float | None = None
        self._memory: dict[str, int] = {}
        self._measuring = False

    def _mark(self, point: str) -> None:
        if self._measuring and point not in self._memory:
            self._memory[point] = allocated_bytes(self.device)

    def build_model(self, factory):
        if self._probe_memory:
            _first_optimizer_step()
            self._memory["base"] = allocated_bytes(self.device)
        return super().build_model(factory)

    def optimizer_step(self, model, optimizer, grad_clip):
        super().optimizer_step(model, optimizer, grad_clip)
        self._mark("after_step")

    # -------------------------------------------------------------- hooks into the strategy
    def wrap(self, model, optimizer):
        model, optimizer = super().wrap(model, optimizer)
        from torch.nn.parallel import DistributedDataParallel

        if self._probe_comm and isinstance(model, DistributedDataParallel) and getattr(self, "compression", "none") == "none":
            model.register_comm_hook(state=self, hook=_timed_allreduce)
        return model, optimizer

    def backward(self, loss, model):
        self._mark("before_backward")
        super().backward(loss, model)
        self._bwd_end = time.perf_counter()

    def train_step(self, model, optimizer, micro_batches, loss_fn, grad_clip, timer):
        if self.device.type == "cuda":
            timer._sync = True  # device time per phase, as StepTimer's docstring intends for benchmarks
        self._buckets.clear()
        self._bwd_end = None
        self._measuring = self._probe_memory and len(self._records) == 1  # the second step
        self._mark("step_start")
        loss = super().train_step(model, optimizer, micro_batches, loss_fn, grad_clip, timer)
        self._measuring = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        rec: dict[str, Any] = {"t_end": time.perf_counter(), "phases": dict(timer.step)}
        if self._buckets:
            rec["bucket_launch"] = [b[0] for b in self._buckets]
            rec["bucket_done"] = [b[1] for b in self._buckets]
            rec["bucket_bytes"] = sum(b[2] for b in self._buckets)
        if self._bwd_end is not None:
            rec["bwd_end"] = self._bwd_end
        self._records.append(rec)
        return loss

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self._write()

    # -------------------------------------------------------------- output
    def _write(self) -> None:
        env = self.env
        if env is None:
            return
        peak_gpu = None
        if self.device.type == "cuda":
            peak_gpu = torch.cuda.max_memory_allocated(self.device) / 2**20
        out = {
            "rank": env.rank,
            "world_size": env.world_size,
            "shard": list(self.data_shard(env)),
            "strategy": self.name,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "peak_gpu_allocated_mb": peak_gpu,
            "memory_bytes": self._memory,
            "steps": self._records,
        }
        self._rec_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._rec_dir / f".rank{env.rank}.json.{os.getpid()}"
        tmp.write_text(json.dumps(out))
        tmp.replace(self._rec_dir / f"rank{env.rank}.json")


def _timed_allreduce(state: _ProbeMixin, bucket):
    """torch's default allreduce hook, with the launch and completion time of each bucket."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    t0 = time.perf_counter()
    nbytes = bucket.buffer().numel() * bucket.buffer().element_size()
    fut = default_hooks.allreduce_hook(None, bucket)

    def done(f):
        state._buckets.append((t0, time.perf_counter(), nbytes))
        return f.value()

    return fut.then(done)
