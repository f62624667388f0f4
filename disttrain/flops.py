"""FLOPs per sample, counted once with torch's ``FlopCounterMode``, and model FLOPs utilisation.

The count runs one forward and backward of a two-sample batch through the model with its
parameters and the batch replaced by meta tensors (``torch.func.functional_call``): nothing is
computed or allocated, no gradient, buffer or random state of the real model changes. Achieved
FLOP/s is that count times the samples per second of the run; MFU divides it by the peak of every
device of the job, from a table of common GPUs (dense tensor-core peak for bf16, plain fp32 for
32-bit) or ``trainer.peak_flops``. As DeepSpeed's flops profiler and torchtitan's MFU, it counts
the model's own FLOPs: recomputation (activation checkpointing) is not added.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from disttrain import forward
from disttrain.tree import map_tensors

log = logging.getLogger("disttrain")

# (substring of torch.cuda.get_device_name, dense bf16 FLOP/s, fp32 FLOP/s), most specific first.
# Vendor datasheets; bf16 without sparsity. V100 and T4 have no bf16 tensor cores: fp16's peak.
PEAK_FLOPS: Sequence[tuple[str, float, float]] = (
    ("H200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("A10", 125e12, 31.2e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak FLOP/s for ``precision`` ("bf16" or "32"), or None when unknown (CPUs,
    GPUs not in ``PEAK_FLOPS``)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp32 in PEAK_FLOPS:
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def count_flops(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable[..., torch.Tensor] | None) -> int:
    """FLOPs of one forward and backward of ``model`` on the batch ``(inputs, targets)``,
    counted on meta tensors (the real model is neither run nor changed)."""
    from torch.utils.flop_counter import FlopCounterMode

    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(t, device="meta")

    state = {k: meta(v).requires_grad_(v.requires_grad) for k, v in model.named_parameters()}
    state.update({k: meta(v) for k, v in model.named_buffers()})
    inputs, targets = map_tensors(meta, inputs), map_tensors(meta, targets)
    # forward.call's conventions (dict inputs as keywords, targets to a forward that names them)
    key = forward.target_keyword(model) if targets is not None else None
    kwargs = {key: targets} if key is not None else {}
    args: tuple = (inputs,)
    if isinstance(inputs, dict):
        args, kwargs = (), {**inputs, **kwargs}
    with FlopCounterMode(display=False) as counter:
        out = torch.func.functional_call(model, state, args, kwargs)
        forward.loss_of(out, targets, loss_fn).backward()
    return int(counter.get_total_flops())


@dataclass
class FlopsMeter:
    """FLOPs per sample of the model (``None`` if it could not be counted) and the job's peak
    (``None`` if unknown); turns a samples-per-second rate into FLOP/s and MFU."""

    per_sample: float | None
    peak_per_device: float | None
    devices: int

    @classmethod
    def measure(
        cls, model: nn.Module, data: Dataset, loss_fn: Callable[..., torch.Tensor] | None, device: torch.device,
        precision: str, devices: int, peak_override: float | None = None,
    ) -> "FlopsMeter":
        """Count ``model``'s FLOPs per sample on the first two samples of ``data``. A model the
        meta device cannot run (data-dependent shapes, a part of a pipeline) gets no count."""
        try:
            n = min(2, len(data))  # type: ignore[arg-type]
            inputs, targets = default_collate([data[i] for i in range(n)])[:2]
            per_sample: float | None = count_flops(model, inputs, targets, loss_fn) / n
        except Exception as exc:  # counting is a report: a model it cannot handle still trains
            log.info("FLOPs not counted (%s: %s); no FLOP/s or MFU in this run", type(exc).__name__, str(exc)[:200])
            per_sample = None
        peak = peak_override if peak_override is not None else peak_flops(device, precision)
        return cls(per_sample, peak, devices)

    def achieved(self, samples_per_sec: float) -> float | None:
        return None if self.per_sample is None else self.per_sample * samples_per_sec

    def mfu(self, samples_per_sec: float) -> float | None:
        """Achieved FLOP/s over the peak of all ``devices`` of the job."""
        achieved = self.achieved(samples_per_sec)
        if achieved is None or not self.peak_per_device:
            return None
        return achieved / (self.peak_per_device * self.devices)

    def scalars(self, samples_per_sec: float) -> dict[str, float]:
        """TensorBoard scalars: ``perf/tflops`` (whole job) and ``perf/mfu`` where known."""
        out: dict[str, float] = {}
        achieved, mfu = self.achieved(samples_per_sec), self.mfu(samples_per_sec)
        if achieved is not None:
            out["perf/tflops"] = achieved / 1e12
        if mfu is not None:
            out["perf/mfu"] = mfu
        return out

    def summary(self, samples_per_sec: float) -> dict[str, Any]:
        if self.per_sample is None:
            return {}
        out: dict[str, Any] = {
            "flops_per_sample": self.per_sample,
            "achieved_flops_per_sec": self.achieved(samples_per_sec),
        }
        if self.peak_per_device:
            out["peak_flops_per_device"] = self.peak_per_device
            out["mfu"] = self.mfu(samples_per_sec)
        return out
