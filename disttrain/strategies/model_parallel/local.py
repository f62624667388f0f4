"""The one-process form: the user's modules placed over the devices of one process.

Each placed module moves to its device and gets a forward pre-hook that moves its inputs there,
so the user's ``forward`` runs untouched and activations follow the modules. A train step splits
each batch into M micro-batches and issues them in the schedule's order (GPipe: every forward,
then every backward; 1F1B: K-1 forwards ahead, then one forward / one backward). GPU kernels are
asynchronous and every device has its own stream, so while the host enqueues micro-batch i on
stage k, stage k+1 still executes micro-batch i-1: the stages overlap without processes. The
result equals the unsplit model (the micro-batch losses are weighted by their share of the batch).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from disttrain import forward
from disttrain.errors import ConfigError
from disttrain.strategies.model_parallel import placement as pl
from disttrain.strategies.model_parallel.options import Options
from disttrain.strategies.model_parallel.stats import mib
from disttrain.tree import map_tensors

log = logging.getLogger("disttrain")


def schedule_order(kind: str, num_stages: int, m: int) -> list[tuple[str, int]]:
    """The (op, micro-batch) order one process issues: ``F`` forward through every stage, ``B``
    backward. 1F1B keeps at most ``num_stages`` micro-batches' activations alive instead of M."""
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(num_stages - 1, m)
    order = [("F", i) for i in range(warm)]
    for i in range(m - warm):
        order += [("F", warm + i), ("B", i)]
    return order + [("B", i) for i in range(m - warm, m)]


class LocalDevices:
    """Stages on the devices of this process (see the module docstring)."""

    layout = "full"

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.device = torch.device("cpu")
        self.resolved: list[list[str]] = []
        self.specs: list[pl.StageSpec] = list(opts.specs or [])
        self.stage_devices: list[torch.device] = []
        self.current = -1
        self.stage_fwd: dict[int, float] = {}
        self.memory: list[dict[str, float]] | None = None
        self.steps, self.span = 0, 0.0
        self._t_enter = 0.0

    def setup(self, device: torch.device) -> None:
        self.device = device

    def teardown(self) -> None:
        """Nothing to release: no process group of its own."""

    def set_logger(self, logger: Any) -> None:
        """The one-process form logs through the standard logger only."""

    def data_shard(self) -> tuple[int, int]:
        return 0, 1

    def to_device(self, x: Any) -> Any:
        return x  # the pre-hooks move inputs to each stage's device

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def replica_key(self) -> str:
        return ""

    # ------------------------------------------------------------------ placing
    def build_model(self, factory: Callable[[], nn.Module]) -> nn.Module:
        return self.place(factory())

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        if not getattr(model, "_dt_placed", False):
            model = self.place(model)
        return model, optimizer

    def devices(self) -> list[str]:
        if self.opts.devices:
            return list(self.opts.devices)
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]

    def place(self, model: nn.Module) -> nn.Module:
        """Every check first (nothing moves on an error), then modules to their devices."""
        if not self.specs:
            self.specs = pl.propose_by_bytes(model, self.devices())
            log.info("model_parallel: placement: auto proposes (pin it in your config):\n%s", pl.to_yaml(self.specs))
        self.resolved = pl.resolve(model, self.specs)
        self.stage_devices = [torch.device(s.device) if s.device is not None else self.device for s in self.specs]
        for k, names in enumerate(self.resolved):
            for n in names:
                m = model.get_submodule(n)
                m.to(self.stage_devices[k])
                m.register_forward_pre_hook(self._enter_hook(k), with_kwargs=True)
                m.register_forward_hook(self._leave_hook(k))
        model._dt_placed = True  # type: ignore[attr-defined,assignment]
        return model

    def _enter_hook(self, k: int) -> Callable:
        dev = self.stage_devices[k]

        def hook(_m: nn.Module, args: tuple, kwargs: dict):
            self.current, self._t_enter = k, time.perf_counter()
            return _move(args, dev), _move(kwargs, dev)
        return hook

    def _leave_hook(self, k: int) -> Callable:
        def hook(*_: Any) -> None:
            if self.stage_devices[k].type == "cpu":  # CUDA work is asynchronous: host time means nothing
                self.stage_fwd[k] = self.stage_fwd.get(k, 0.0) + time.perf_counter() - self._t_enter
            self.current = -1
        return hook

    # ------------------------------------------------------------------ one step
    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence,
                   loss_fn: Callable, grad_clip: float | None, timer: Any) -> torch.Tensor:
        chunks = self._split(micro_batches)
        params = list(model.parameters())
        ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.stage_fwd = {}
        t0 = time.perf_counter()
        stash: dict[int, tuple[torch.Tensor, dict[int, int]]] = {}
        live: dict[int, int] = {}
        peak: dict[int, int] = {}
        total: torch.Tensor | None = None  # on the last stage's device: no host sync per micro-batch
        t_f = t_b = 0.0
        for op, i in schedule_order(self.opts.schedule, len(self.resolved), len(chunks)):
            if op == "F":
                x, y, w = chunks[i]
                saved: dict[int, int] = {}
                t1 = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(self._pack(saved, ptrs), lambda t: t):
                    out = forward.call(model, x, y)
                    loss = forward.loss_of(out, y.to(forward.prediction_of(out).device), loss_fn)
                t_f += time.perf_counter() - t1
                part = loss.detach().double() * w
                total = part if total is None else total + part.to(total.device)
                stash[i] = (loss * w, saved)
                for s, b in saved.items():
                    live[s] = live.get(s, 0) + b
                    peak[s] = max(peak.get(s, 0), live[s])
            else:
                weighted, saved = stash.pop(i)
                t1 = time.perf_counter()
                weighted.backward()
                t_b += time.perf_counter() - t1
                for s, b in saved.items():
                    live[s] -= b
        self.steps += 1
        self.span += time.perf_counter() - t0
        timer.add("forward", t_f)
        timer.add("backward", t_b)
        grads = {id(p): p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None}
        with timer.phase("optimizer"):
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.memory is None and self.opts.report:
            self.memory = self._memory(model, optimizer, grads, peak)
        assert total is not None
        return total.float()

    def _pack(self, saved: dict[int, int], params: set[int]) -> Callable:
        seen: set[tuple[int, int]] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                key = (t.data_ptr(), t.numel())  # a view of a larger batch counts its own elements only
                if t.untyped_storage().data_ptr() not in params and key not in seen and self.current >= 0:
                    seen.add(key)
                    saved[self.current] = saved.get(self.current, 0) + t.numel() * t.element_size()
            except (RuntimeError, NotImplementedError):
                pass
            return t
        return pack

    def _split(self, micro_batches: Sequence) -> list[tuple[Any, Any, float]]:
        """Each batch into M chunks, each weighted by its share of all samples (so the weighted
        sum of mean losses is the whole step's mean loss, whatever the chunk sizes)."""
        m = self.opts.microbatches
        total = sum(len(b[0]) for b in micro_batches)
        out = []
        for inputs, targets in micro_batches:
            if len(inputs) < m:
                raise ConfigError(
                    f"a batch of {len(inputs)} samples cannot be split into strategy.microbatches={m}: use a batch "
                    f"size of at least {m} (a multiple of it)"
                )
            for x, y in zip(torch.tensor_split(inputs, m), torch.tensor_split(targets, m)):
                out.append((x, y, len(x) / total))
        return out

    def _memory(self, model: nn.Module, optimizer: torch.optim.Optimizer, grads: dict[int, int],
                peak: dict[int, int]) -> list[dict[str, float]]:
        """Per stage: bytes of parameters, gradients, optimizer state, activation peak."""
        state = {id(p): sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
                 for p, st in optimizer.state.items()}
        rows = []
        for k, names in enumerate(self.resolved):
            ps = list({id(p): p for n in names for p in model.get_submodule(n).parameters()}.values())
            rows.append({"params_bytes": float(sum(p.numel() * p.element_size() for p in ps)),
                         "grads_bytes": float(sum(grads.get(id(p), 0) for p in ps)),
                         "optimizer_bytes": float(sum(state.get(id(p), 0) for p in ps)),
                         "activation_peak_bytes": float(peak.get(k, 0))})
        lines = [f"model_parallel memory per stage ({self.opts.schedule}, M={self.opts.microbatches}):"]
        for k, (spec, e) in enumerate(zip(self.specs, rows)):
            lines.append(f"  stage {k} [{', '.join(spec.names)}] on {self.stage_devices[k]}: params "
                         f"{mib(e['params_bytes'])}, grads {mib(e['grads_bytes'])}, optimizer "
                         f"{mib(e['optimizer_bytes'])}, activations peak {mib(e['activation_peak_bytes'])}")
        log.info("\n".join(lines))
        return rows

    def metrics(self) -> dict[str, float]:
        out = {f"pipeline/stage{k}_forward_ms": 1e3 * v for k, v in self.stage_fwd.items()}
        if self.steps:
            out["pipeline/step_ms"] = 1e3 * self.span / self.steps
        self.steps, self.span = 0, 0.0
        return out

    def eval_forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return model(inputs)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def check_in_sync(self, model: nn.Module) -> list[str]:
        return []  # one process: nothing to compare with

    def bubble_fraction(self) -> float:
        return float("nan")  # one process: the overlap is the devices' (asynchronous kernels), not measured here

    def memory_report(self) -> list[dict[str, float]] | None:
        return self.memory

    def summary(self) -> dict[str, Any]:
        return {"stage_params_bytes": [int(e["params_bytes"]) for e in self.memory]} if self.memory else {}

    def describe(self) -> dict[str, Any]:
        return {"stages": len(self.specs) or len(self.devices())}

    # ------------------------------------------------------------------ checkpoints: the whole model, one file
    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Any) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None}

    def load_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Any,
                        manifest: dict[str, Any]) -> None:
        self.restore(model, optimizer, manifest)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])

    def export_state_dict(self, model: nn.Module) -> dict[str, Any]:
        return model.state_dict()


def _move(x: Any, dev: torch.device) -> Any:
    return map_tensors(lambda t: t.to(dev, non_blocking=True) if t.device != dev else t, x)
