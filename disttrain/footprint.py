"""A model's memory before launch, and what a run really used after its first steps.

:func:`measure` builds nothing itself: it takes a model made on the ``meta`` device (shapes and
dtypes, no storage) and counts

* parameters and gradients (every parameter that requires grad gets one of its own size);
* optimizer state, by running the user's real optimizer for one step on the meta parameters
  (Adam's ``exp_avg``/``exp_avg_sq`` and its ``step`` scalars, SGD's momentum buffers: whatever
  the optimizer keeps, counted, not guessed from a table);
* activations per micro-batch: the bytes autograd saves for backward during one forward and loss
  on a meta micro-batch (``saved_tensors_hooks``), each storage once, parameters excluded.

:class:`MemoryWatch` compares an estimate with what a real run measures after its first steps:
the bytes the allocator holds (CUDA: ``memory_allocated``/``max_memory_allocated``; CPU: glibc's
``mallinfo2``).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from disttrain import forward

log = logging.getLogger("disttrain")
MiB = 2**20


@dataclass(frozen=True)
class Footprint:
    """Bytes of one whole (unsharded) model: parameters, gradients, optimizer state, and the
    activations one micro-batch of ``micro_batch`` samples saves for backward."""

    params: int
    grads: int
    optimizer: int
    activations: int
    micro_batch: int
    param_count: int


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_state_by_param(model: nn.Module,
                             make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> list[int]:
    """Bytes of state ``make_optimizer(model)`` keeps after one step for each of
    ``model.parameters()`` (in that order), counted on meta tensors."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer = make_optimizer(model)
    optimizer.step()
    out = [sum(_tensor_bytes(v) for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))
           for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def optimizer_state_bytes(model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> int:
    """Bytes of state ``make_optimizer(model)`` keeps after one step, counted on meta tensors."""
    return sum(optimizer_state_by_param(model, make_optimizer))


def activation_bytes(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable[..., torch.Tensor] | None) -> int:
    """Bytes autograd saves for backward in one forward + loss of ``model`` on ``inputs``, each
    storage counted once, parameters (and views of them) excluded."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, torch.UntypedStorage] = {}  # strong references: no storage id is reused meanwhile

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward.call(model, inputs, targets)
        forward.loss_of(out, targets, loss_fn)
    return sum(s.nbytes() for s in saved.values())


def measure(model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], inputs: Any,
            targets: Any, loss_fn: Callable[..., torch.Tensor] | None, micro_batch: int) -> Footprint:
    """The :class:`Footprint` of ``model`` (built on the meta device) with its micro-batch
    ``inputs``/``targets`` (moved to meta here)."""
    params = list(model.parameters())
    to_meta = lambda x: x.to("meta") if torch.is_tensor(x) else x  # noqa: E731
    inputs = {k: to_meta(v) for k, v in inputs.items()} if isinstance(inputs, dict) else to_meta(inputs)
    return Footprint(
        params=sum(_tensor_bytes(p) for p in params),
        grads=sum(_tensor_bytes(p) for p in params if p.requires_grad),
        optimizer=optimizer_state_bytes(model, make_optimizer),
        activations=activation_bytes(model, inputs, to_meta(targets), loss_fn),
        micro_batch=micro_batch,
        param_count=sum(p.numel() for p in params),
    )


# ---------------------------------------------------------------------- per rank
@dataclass(frozen=True)
class RankEstimate:
    """One rank's bytes under a strategy. ``in_flight``: micro-batches whose activations are
    alive at once (1 for data parallel; a pipeline stage holds several). ``step``: the ranks
    ``ranks[0], ranks[0] + step, ... ranks[1]`` hold it (a pipeline stage's data-parallel
    replicas). ``activations_peak``: the bytes of activations alive at the worst moment when that
    is not ``activations x in_flight`` (a pipeline rank holding stages of unequal activations)."""

    role: str
    ranks: tuple[int, int]  # first and last rank (inclusive) with this estimate
    params: float
    grads: float
    optimizer: float
    activations: float
    in_flight: int = 1
    buffers: float = 0.0  # what the engine allocates beside the model states (communication buckets)
    note: str = ""
    step: int = 1
    activations_peak: float | None = None

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers

    @property
    def live_activations(self) -> float:
        """Activation bytes alive at the peak."""
        return self.activations * self.in_flight if self.activations_peak is None else self.activations_peak

    @property
    def total(self) -> float:
        return self.states + self.live_activations

    def holds(self, rank: int) -> bool:
        return self.ranks[0] <= rank <= self.ranks[1] and (rank - self.ranks[0]) % self.step == 0

    @property
    def span(self) -> str:
        a, b = self.ranks
        if a == b:
            return f"{a}"
        if self.step == 1:
            return f"{a}-{b}"
        members = list(range(a, b + 1, self.step))
        return ",".join(map(str, members)) if len(members) <= 4 else f"{a}-{b}/{self.step}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "states": self.states, "total": self.total}


def for_rank(rows: list[RankEstimate], rank: int) -> RankEstimate | None:
    """The estimate that holds for ``rank``."""
    return next((r for r in rows if r.holds(rank)), None)


def table(rows: list[RankEstimate]) -> str:
    """The estimate as a text table, in MiB."""
    head = (f"{'role':<22} {'ranks':<8} {'params':>10} {'grads':>10} {'optimizer':>10} {'buffers':>10} {'act/micro':>10} "
            f"{'in flight':>9} {'total':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.role:<22} {r.span:<8} {r.params / MiB:>10.3f} {r.grads / MiB:>10.3f} {r.optimizer / MiB:>10.3f} "
                     f"{r.buffers / MiB:>10.3f} {r.activations / MiB:>10.3f} {r.in_flight:>9d} {r.total / MiB:>10.3f}" + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines) + ("\n(MiB per rank; total = params + grads + optimizer + buffers + activations x in flight"
                               + (", or the activations' peak where a note says so)" if any(r.activations_peak is not None for r in rows) else ")"))


# ---------------------------------------------------------------------- measured
class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def allocated_bytes(device: torch.device) -> int:
    """Bytes the allocator holds now: CUDA's ``memory_allocated``; on CPU glibc's ``mallinfo2``
    (heap in use + mmapped blocks; torch's large CPU tensors are mmapped), 0 where unavailable."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)
    except (OSError, AttributeError):
        return 0


class MemoryWatch:
    """Made before the model is built (records the allocator's baseline); measures step
    ``at_step`` of the real run and logs measured vs estimated bytes for this rank, once:

    * model states: the allocator's growth since the baseline after that step (parameters,
      gradients, optimizer state, and whatever the engine keeps with them: buckets, flat copies);
    * activations: the allocator's growth across that step's first forward (hooks on the model,
      ``attach``), i.e. what the forward and its loss keep for backward;
    * peak: on CUDA ``max_memory_allocated`` since the baseline; on CPU states + activations.

    ``counted``: where the strategy counts its own tensors instead (model_parallel: a pipeline
    rank's stages run traced copies, not the model's forward, and the whole model exists before
    the cut), a callable giving ``(model-state bytes, activation peak bytes)`` at ``at_step``.
    """

    def __init__(self, estimate: RankEstimate, device: torch.device, at_step: int = 2,
                 counted: Callable[[], tuple[float, float] | None] | None = None) -> None:
        self.estimate, self.device, self.at_step, self.counted = estimate, device, at_step, counted
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.base = allocated_bytes(device)
        self.measured: dict[str, Any] = {}
        self._armed = at_step == 1
        self._fwd: list[int] = []

    def attach(self, model: nn.Module) -> None:
        """Hooks around ``model``'s forward that measure the forward of step ``at_step``."""
        def pre(*_: Any) -> None:
            if self._armed and not self._fwd:
                self._fwd.append(allocated_bytes(self.device))

        def post(*_: Any) -> None:
            if self._armed and len(self._fwd) == 1:
                self._fwd.append(allocated_bytes(self.device))
                self._armed = False

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)

    def observe(self, step: int) -> None:
        """Called after every optimizer step (``step`` counts from 1)."""
        self._armed = self._armed or step == self.at_step - 1
        if step != self.at_step or self.measured:
            return
        counted = self.counted() if self.counted is not None else None
        states: float = allocated_bytes(self.device) - self.base
        acts: float = self._fwd[1] - self._fwd[0] if len(self._fwd) == 2 else float("nan")
        peak: float
        if counted is not None:
            states, acts = counted
            peak = states + acts
        elif self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            peak = states + acts
        e = self.estimate
        err = lambda m, x: m / x - 1 if x else float("nan")  # noqa: E731
        self.measured = {"step": step, "states_bytes": states, "activations_bytes": acts, "peak_bytes": peak,
                         "estimated_states_bytes": e.states, "estimated_activations_bytes": e.live_activations,
                         "estimated_peak_bytes": e.total, "states_error": err(states, e.states),
                         "activations_error": err(acts, e.live_activations), "peak_error": err(peak, e.total)}
        m = self.measured
        log.info("memory at step %d (%s): model states measured %.2f MiB vs estimated %.2f MiB (%+.1f%%); activations "
                 "%.2f vs %.2f MiB (%+.1f%%); peak %.2f vs %.2f MiB (%+.1f%%)", step, e.role, states / MiB, e.states / MiB,
                 100 * m["states_error"], acts / MiB, e.live_activations / MiB, 100 * m["activations_error"],
                 peak / MiB, e.total / MiB, 100 * m["peak_error"])

    def summary(self) -> dict[str, Any]:
        return {"memory": dict(self.measured)} if self.measured else {}
