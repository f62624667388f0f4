"""Synchronous data parallelism with torch DistributedDataParallel (NCCL on GPUs, gloo on CPU).

Every rank holds the whole model, reads its own shard of each batch, and gradients are averaged
by bucketed allreduce overlapped with backward. The result equals one process training on the
gathered batch (tests/test_ddp_oracle.py).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from disttrain.env import DistEnv
from disttrain.strategies.base import Strategy, require

_COMPRESSION = ("none", "fp16", "bf16")


class DDPStrategy(Strategy):
    """torch DDP. Options mirror ``DistributedDataParallel``'s; ``compression`` installs torch's
    fp16/bf16 gradient compression comm hook (halves allreduce bytes, rounds gradients)."""

    name = "ddp"

    def __init__(
        self,
        bucket_cap_mb: float = 25.0,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = True,
        forward_sync_buffers: bool = True,
        compression: str = "none",
    ) -> None:
        super().__init__()
        self.options = dict(
            bucket_cap_mb=bucket_cap_mb,
            find_unused_parameters=find_unused_parameters,
            static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view,
            forward_sync_buffers=forward_sync_buffers,
        )
        self.compression = compression
        self._wrapped: list[weakref.ref[DistributedDataParallel]] = []

    def validate(self, env: DistEnv) -> None:
        require(
            self.compression in _COMPRESSION,
            f"strategy.compression={self.compression!r}: expected one of {list(_COMPRESSION)}",
        )
        require(
            float(self.options["bucket_cap_mb"]) > 0,
            f"strategy.bucket_cap_mb={self.options['bucket_cap_mb']}: must be > 0 (torch's default is 25)",
        )

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        model = model.to(self.device)
        if self.env is None or not self.env.is_distributed:
            return model, optimizer  # one process: nothing to synchronise
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, **self.options)  # type: ignore[arg-type]  # checked in validate
        if self.compression != "none":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            hook = default_hooks.fp16_compress_hook if self.compression == "fp16" else default_hooks.bf16_compress_hook
            ddp.register_comm_hook(state=None, hook=hook)
        self._wrapped.append(weakref.ref(ddp))
        return ddp, optimizer

    def teardown(self) -> None:
        """Drop each DDP module's reducer (which holds the process group), so the group really
        ends when the Session destroys it, even if the user still holds the model. A group kept
        alive into interpreter shutdown is what lets gloo's thread abort the process at exit."""
        for ref in self._wrapped:
            ddp = ref()
            if ddp is not None and hasattr(ddp, "reducer"):
                del ddp.reducer
                ddp.process_group = None  # type: ignore[assignment]
        self._wrapped.clear()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def set_grad_sync(self, model: nn.Module, enabled: bool) -> None:
        # What DDP.no_sync() toggles; read by DDP's forward, so it is set before the forward.
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = enabled

