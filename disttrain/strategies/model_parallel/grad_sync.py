"""Data parallelism across pipeline replicas: each stage's gradients averaged over the D ranks
that hold the same stage (the ``dp`` dimension of the mesh).

Why not DDP around the stage: torch's zero-bubble schedules compute weight gradients with
``autograd.grad`` and add them to ``.grad`` by hand, which DDP's hooks never see. So the
reduction is disttrain's own, and the same for every schedule:

* parameters are packed into buckets of ``bucket_cap_mb`` (reverse registration order, as DDP:
  backward produces the last layers' gradients first), one flattened ``all_reduce`` per bucket;
* overlap where torch allows: a post-accumulate-grad hook counts each parameter's gradient
  accumulations; when every parameter of the next bucket has received all of this step's
  micro-batches, that bucket's ``all_reduce`` starts asynchronously while backward goes on.
  Buckets always start in index order, so every replica issues the same collectives in the same
  order. Gradients written by hand (zero bubble's weight pass) never fire the hook; their buckets
  start in ``finish``;
* ``finish`` starts what is left, waits, divides by D and writes back: afterwards every replica
  holds the gradient of the mean loss over the global batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn


class GradSync:
    """Bucketed, overlapped gradient averaging over ``group`` for ``params``."""

    def __init__(self, params: Sequence[nn.Parameter], group: Any, bucket_cap_mb: float) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        cap = max(1, int(bucket_cap_mb * 2**20))
        self.buckets: list[list[nn.Parameter]] = []
        nbytes = cap
        for p in reversed([p for p in params if p.requires_grad]):
            if nbytes + p.numel() * p.element_size() > cap and (not self.buckets or self.buckets[-1]):
                self.buckets.append([])
                nbytes = 0
            self.buckets[-1].append(p)
            nbytes += p.numel() * p.element_size()
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._pending = [0] * len(self.buckets)
        self._count: dict[int, int] = {}
        self._expected = 0
        self._next = 0
        self._works: list[tuple[Any, torch.Tensor, list[nn.Parameter]]] = []
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b]
        self.overlapped = 0  # buckets started during backward in the last step (for the docs' claims)

    def start_step(self, backwards_per_param: int) -> None:
        """A new step in which each parameter's gradient is accumulated ``backwards_per_param``
        times (micro-batches x accumulated batches)."""
        self._expected = backwards_per_param
        self._count.clear()
        self._pending = [len(b) for b in self.buckets]
        self._next = 0
        self._works = []

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._expected:
            return
        key = id(p)
        self._count[key] = self._count.get(key, 0) + 1
        if self._count[key] == self._expected:
            self._pending[self._bucket_of[key]] -= 1
            while self._next < len(self.buckets) and self._pending[self._next] == 0:
                self._launch(self._next)

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        self._works.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, bucket))
        self._next = i + 1

    def finish(self) -> None:
        """Start the buckets not started yet, wait for all, and install the averages."""
        self.overlapped = len(self._works)
        while self._next < len(self.buckets):
            self._launch(self._next)
        for work, flat, bucket in self._works:
            work.wait()
            flat.div_(self.size)
            offset = 0
            for p in bucket:
                n = p.numel()
                if p.grad is not None:  # a parameter no micro-batch reached stays without gradient, as unsplit
                    p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        self._works = []
        self._expected = 0

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
