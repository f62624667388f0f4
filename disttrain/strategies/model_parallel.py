"""Manual model-parallel placement with micro-batch pipelining (GPipe and 1F1B).

Two forms, chosen by the placement:

* **single-process** (stages name ``device: cuda:0`` ...): the submodules move to their devices
  and a forward pre-hook on each placed module moves its inputs there, so the user's ``forward``
  runs untouched. A train step splits the batch into M micro-batches and issues them in the
  schedule's order; CUDA kernels are asynchronous and every device has its own stream, so while
  the host enqueues micro-batch i on stage k, stage k+1 is still executing micro-batch i-1.
* **multi-process** (stages name ``rank: r``; one stage per rank): every rank holds only its own
  stage's parameters and optimizer state. The model is constructed on the meta device (no
  memory) and only this rank's modules are materialised (``init: meta``, the default), or built
  whole on CPU and cut (``init: full``). Activations go forward and gradients backward point to
  point (``isend``/``recv``: gloo on CPU, NCCL on GPUs) under a GPipe or 1F1B schedule.

Either way the result equals the unsplit model trained on the whole batch (the micro-batch losses
are weighted by their share of the batch), tested in tests/test_model_parallel.py.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from disttrain import placement as pl
from disttrain.env import DistEnv
from disttrain.errors import ConfigError
from disttrain.tree import to_plain
from disttrain.strategies.base import Batch, LossFn, Strategy, require

log = logging.getLogger("disttrain")

SCHEDULES = ("gpipe", "1f1b")
INITS = ("meta", "full")
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8]
_HEADER = 10  # ndim, dtype code, up to 8 dims


def schedule_order(kind: str, num_stages: int, stage: int, m: int) -> list[tuple[str, int]]:
    """The (op, micro-batch) sequence stage ``stage`` runs: ``F`` forward, ``B`` backward.

    GPipe: all forwards, then all backwards. 1F1B: ``K-1-stage`` warm-up forwards, then one
    forward / one backward alternately, then the remaining backwards: at most ``K - stage``
    micro-batches' activations are alive at once instead of M."""
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(num_stages - 1 - stage, m)
    order = [("F", i) for i in range(warm)]
    for i in range(m - warm):
        order += [("F", warm + i), ("B", i)]
    return order + [("B", i) for i in range(m - warm, m)]


class _Stage(nn.Module):
    """This rank's modules, kept under their fully qualified names (so ``state_dict`` keys are the
    unsplit model's), applied in placement order."""

    def __init__(self, source: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.order = list(names)
        for name in names:
            parent: nn.Module = self
            *path, last = name.split(".")
            for part in path:
                if not hasattr(parent, part) or not isinstance(getattr(parent, part), nn.Module):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(last, source.get_submodule(name))

    def forward(self, x: Any) -> Any:
        for name in self.order:
            x = self.get_submodule(name)(x)
        return x


class _SavedBytes:
    """Bytes saved for backward (activations; parameters excluded), per micro-batch, through
    ``saved_tensors_hooks``: a device-independent measure of activation memory."""

    def __init__(self) -> None:
        self.params: set[int] = set()
        self.seen: set[int] = set()
        self.nbytes = 0
        self.stage: Callable[[], int] = lambda: 0
        self.per_stage: dict[int, int] = {}

    def start(self, params: Sequence[torch.Tensor]) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen, self.per_stage = set(), {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            key = (t.data_ptr(), t.numel())  # a view of a larger batch counts its own elements only
            if t.untyped_storage().data_ptr() not in self.params and key not in self.seen:
                self.seen.add(key)
                s = self.stage()
                self.per_stage[s] = self.per_stage.get(s, 0) + t.numel() * t.element_size()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


class ModelParallelStrategy(Strategy):
    """``strategy=model_parallel``: see the module docstring and docs/model_parallel.md.

    Options: ``placement`` (``auto`` or a list of stages), ``microbatches`` (M), ``schedule``
    (``gpipe`` | ``1f1b``), ``devices`` (for ``placement: auto`` in one process; default every
    GPU, else ``[cpu]``), ``init`` (``meta`` | ``full``, multi-process form), ``report``."""

    name = "model_parallel"

    def __init__(
        self,
        placement: Any = "auto",
        microbatches: int = 4,
        schedule: str = "gpipe",
        devices: Sequence[str] | None = None,
        init: str = "meta",
        report: bool = True,
    ) -> None:
        super().__init__()
        self.placement_cfg = to_plain(placement)
        self.microbatches = microbatches
        self.schedule = str(schedule).lower()
        self.devices = to_plain(devices)
        self.init = str(init)
        self.report = bool(report)
        self.multi = False
        self.num_stages = 1
        self.specs: list[pl.StageSpec] | None = None  # None until resolved for placement: auto
        self.resolved: list[list[str]] | None = None
        self.stage_index = 0
        self.stage_ranks: list[int] = [0]
        self._skeleton: nn.Module | None = None  # the whole model on meta (multi-process chain check)
        self._chain_checked = False
        self._logger: Any = None
        self._saved = _SavedBytes()
        self._window = self._new_window()
        self._run_totals = self._new_window()
        self._memory: list[dict[str, float]] | None = None
        self._stage_fwd: dict[int, float] = {}

    # ------------------------------------------------------------------ lifecycle
    def validate(self, env: DistEnv) -> None:
        require(
            self.schedule in SCHEDULES,
            f"strategy.schedule={self.schedule!r}: expected one of {list(SCHEDULES)}",
        )
        require(
            isinstance(self.microbatches, int) and not isinstance(self.microbatches, bool) and self.microbatches >= 1,
            f"strategy.microbatches={self.microbatches!r}: expected an integer >= 1 (the number of micro-batches "
            f"each batch is split into; 4 x the number of stages keeps the bubble small)",
        )
        require(self.init in INITS, f"strategy.init={self.init!r}: expected one of {list(INITS)}")
        self.multi = env.world_size > 1
        specs = pl.parse(self.placement_cfg, env.world_size)
        if specs is None:
            if self.multi:
                self.num_stages = env.world_size
            else:
                devs = self._auto_devices()
                for i, d in enumerate(devs):
                    pl.check_device(d, f"strategy.devices[{i}]")
                self.num_stages = len(devs)
        else:
            pl.check_environment(specs, env.world_size)
            self.num_stages = len(specs)
        self.specs = specs
        require(
            not (self.schedule == "1f1b" and self.microbatches < self.num_stages),
            f"strategy.microbatches={self.microbatches} is fewer than the {self.num_stages} pipeline stages, which "
            f"schedule=1f1b needs: set strategy.microbatches>={self.num_stages} (or schedule=gpipe)",
        )

    def setup(self, env: DistEnv, device: torch.device, backend: str, timeout_s: float) -> None:
        super().setup(env, device, backend, timeout_s)
        if self.multi:
            self.stage_ranks = [s.rank for s in self.specs] if self.specs else list(range(env.world_size))
            self.stage_index = self.stage_ranks.index(env.rank)

    def run(self, loop: Callable[[], Any], logger: Any = None) -> Any:
        self._logger = logger
        return loop()

    # ------------------------------------------------------------------ data
    def data_shard(self, env: DistEnv) -> tuple[int, int]:
        return 0, 1  # every stage iterates the same batches (first uses inputs, last targets)

    def eval_shard(self, env: DistEnv) -> tuple[int, int]:
        return 0, 1

    # ------------------------------------------------------------------ model
    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def build_model(self, factory: Callable[[], nn.Module]) -> nn.Module:
        if not self.multi:
            return self._place_single(factory())
        with torch.device("meta"):
            skeleton = factory()  # structure only: no memory, no random numbers drawn
        self._resolve(skeleton)
        names = self.resolved[self.stage_index]
        if self.init == "full":
            full = factory()  # the same initial weights as strategy=single; the rest is dropped below
            stage = _Stage(full, names)
            del full
        else:
            import copy

            stage = _Stage(skeleton, names)
            stage = copy.deepcopy(stage)  # the skeleton stays on meta for the chain check
            _materialise(stage)
        self._skeleton = skeleton
        return stage.to(self.device)

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        if not self.multi:
            if not getattr(model, "_dt_placed", False):
                model = self._place_single(model)
            return model, optimizer
        if isinstance(model, _Stage):
            return model.to(self.device), optimizer
        # plug-in face: the user built the whole model; keep this rank's stage and rebuild the optimizer
        self._resolve(model)
        stage = _Stage(model, self.resolved[self.stage_index]).to(self.device)
        if optimizer is not None:
            log.warning(
                "model_parallel: rebuilding %s over this rank's stage with its defaults (build the model through "
                "strategy.build_model to keep your parameter groups)", type(optimizer).__name__,
            )
            optimizer = type(optimizer)(stage.parameters(), **optimizer.defaults)
        return stage, optimizer

    def _auto_devices(self) -> list[str]:
        if self.devices:
            return [str(d) for d in self.devices]
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]

    def _resolve(self, model: nn.Module) -> None:
        """Specs (proposing them for ``auto``) and module names per stage; ConfigError if wrong."""
        if self.specs is None:
            where: list[Any] = list(range(self.num_stages)) if self.multi else self._auto_devices()
            self.specs = pl.propose(model, where, "rank" if self.multi else "device")
            if self.env is None or self.env.is_rank_zero:
                log.info("model_parallel: placement: auto proposes (pin it in your config):\n%s", pl.to_yaml(self.specs))
        self.resolved = pl.resolve(model, self.specs)

    def _place_single(self, model: nn.Module) -> nn.Module:
        self._resolve(model)  # every check before anything moves
        self.num_stages = len(self.resolved)
        self._stage_devices = [
            torch.device(s.device) if s.device is not None else self.device for s in self.specs
        ]
        self._current = [0]
        for k, names in enumerate(self.resolved):
            dev = self._stage_devices[k]
            for n in names:
                m = model.get_submodule(n)
                m.to(dev)
                m.register_forward_pre_hook(self._enter_hook(k, dev), with_kwargs=True)
                m.register_forward_hook(self._leave_hook(k))
        self._saved.stage = lambda: self._current[0]
        model._dt_placed = True  # type: ignore[attr-defined]
        return model

    def _enter_hook(self, k: int, dev: torch.device):
        def hook(_m: nn.Module, args: tuple, kwargs: dict):
            self._current[0] = k
            self._t_enter = time.perf_counter()
            return _move(args, dev), _move(kwargs, dev)
        return hook

    def _leave_hook(self, k: int):
        def hook(_m: nn.Module, _args: tuple, _out: Any) -> None:
            if self._stage_devices[k].type == "cpu":  # CUDA work is asynchronous: host time means nothing
                self._stage_fwd[k] = self._stage_fwd.get(k, 0.0) + time.perf_counter() - self._t_enter
            self._current[0] = -1
        return hook

    def to_device(self, x: Any) -> Any:
        return x if not self.multi else super().to_device(x)  # one process: the pre-hooks move inputs

    # ------------------------------------------------------------------ one step
    def train_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        micro_batches: Sequence[Batch],
        loss_fn: LossFn,
        grad_clip: float | None,
        timer: Any,
    ) -> torch.Tensor:
        chunks = self._split(micro_batches)
        params = list(model.parameters())
        self._saved.start(params)
        t0 = time.perf_counter()
        if self.multi:
            if not self._chain_checked:
                self._check_chain(micro_batches[0][0])
            loss, busy, live_peak = self._pipeline_multi(model, chunks, loss_fn)
        else:
            loss, busy, live_peak = self._pipeline_single(model, chunks, loss_fn)
        wall = time.perf_counter() - t0
        stats = self._gather_stats(loss, busy, wall, live_peak)
        loss = stats[self.num_stages - 1][0].to(torch.float32).to(self.device)
        self._account(stats)
        timer.add("forward", busy[0])
        timer.add("backward", busy[1])
        timer.add("pipeline_wait", max(wall - busy[0] - busy[1], 0.0))
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        with timer.phase("optimizer"):
            self.optimizer_step(model, optimizer, grad_clip)
            optimizer.zero_grad(set_to_none=True)
        if self._memory is None and self.report:
            self._report_memory(model, optimizer, grads, stats)
        return loss.detach()

    def _split(self, micro_batches: Sequence[Batch]) -> list[tuple[Any, Any, float]]:
        """Each batch into M chunks, each weighted by its share of all samples (so the weighted
        sum of mean losses is the whole step's mean loss, whatever the chunk sizes)."""
        total = sum(len(b[0]) for b in micro_batches)
        out = []
        for inputs, targets in micro_batches:
            if len(inputs) < self.microbatches:
                raise ConfigError(
                    f"a batch of {len(inputs)} samples cannot be split into strategy.microbatches="
                    f"{self.microbatches}: use a batch size of at least {self.microbatches} (a multiple of it)"
                )
            for x, y in zip(torch.tensor_split(inputs, self.microbatches), torch.tensor_split(targets, self.microbatches)):
                out.append((x, y, len(x) / total))
        return out

    def _pipeline_single(self, model: nn.Module, chunks: list, loss_fn: LossFn):
        order = schedule_order(self.schedule, self.num_stages, 0, len(chunks))
        stash: dict[int, tuple[torch.Tensor, dict[int, int]]] = {}
        live: dict[int, int] = {}
        peak: dict[int, int] = {}
        total = None
        self._stage_fwd = {}
        t_f = t_b = 0.0
        for op, i in order:
            if op == "F":
                x, y, w = chunks[i]
                t0 = time.perf_counter()
                self._saved.per_stage = {}
                with self._saved.hooks():
                    out = model(x)
                    loss = loss_fn(out, y.to(out.device))
                t_f += time.perf_counter() - t0
                total = loss.detach() * w if total is None else total + loss.detach().to(total.device) * w
                stash[i] = (loss * w, dict(self._saved.per_stage))
                for s, b in stash[i][1].items():
                    live[s] = live.get(s, 0) + b
                    peak[s] = max(peak.get(s, 0), live[s])
            else:
                loss_w, saved = stash.pop(i)
                t0 = time.perf_counter()
                loss_w.backward()
                t_b += time.perf_counter() - t0
                for s, b in saved.items():
                    live[s] -= b
        self._peaks = peak
        return total, (t_f, t_b), peak.get(self.num_stages - 1, 0)

    def _pipeline_multi(self, model: nn.Module, chunks: list, loss_fn: LossFn):
        k, s = self.num_stages, self.stage_index
        order = schedule_order(self.schedule, k, s, len(chunks))
        stash: dict[int, tuple[Any, Any, int]] = {}
        sends: list[Any] = []
        busy_f = busy_b = 0.0
        live = peak = 0
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for op, i in order:
            if op == "F":
                if self.is_first:
                    x = chunks[i][0].to(self.device)
                else:
                    x = self._recv_act()
                    if x.is_floating_point():
                        x.requires_grad_()
                self._saved.seen = set()
                self._saved.per_stage = {}
                t0 = self._now()
                with self._saved.hooks():
                    y = model(x)
                    if self.is_last:
                        _, tgt, w = chunks[i]
                        loss = loss_fn(y, tgt.to(y.device))
                        total += loss.detach().double() * w
                        y = loss * w
                busy_f += self._now() - t0
                if not self.is_last:
                    sends += self._send_act(y.detach())
                nbytes = sum(self._saved.per_stage.values())
                live += nbytes
                peak = max(peak, live)
                stash[i] = (x, y, nbytes)
            else:
                x, y, nbytes = stash.pop(i)
                grad = None
                if not self.is_last:
                    grad = torch.empty_like(y)
                    dist.recv(grad, src=self.stage_ranks[s + 1])
                t0 = self._now()
                if y.requires_grad:
                    torch.autograd.backward(y, grad)
                busy_b += self._now() - t0
                if not self.is_first:
                    g = x.grad if x.grad is not None else torch.zeros_like(x)
                    sends.append((dist.isend(g.contiguous(), dst=self.stage_ranks[s - 1]), g))
                live -= nbytes
        for work, _ in sends:
            work.wait()
        return total, (busy_f, busy_b), peak

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ point to point
    def _send_act(self, t: torch.Tensor) -> list[Any]:
        t = t.contiguous()
        if t.dim() > _HEADER - 2 or t.dtype not in _DTYPES:
            raise RuntimeError(f"model_parallel: cannot send an activation of shape {tuple(t.shape)} and dtype {t.dtype}")
        header = torch.zeros(_HEADER, dtype=torch.int64, device=t.device)
        header[0], header[1] = t.dim(), _DTYPES.index(t.dtype)
        if t.dim():
            header[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        dst = self.stage_ranks[self.stage_index + 1]
        return [(dist.isend(header, dst=dst), header), (dist.isend(t, dst=dst), t)]

    def _recv_act(self) -> torch.Tensor:
        src = self.stage_ranks[self.stage_index - 1]
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, src=src)
        h = header.tolist()
        t = torch.empty(h[2 : 2 + h[0]], dtype=_DTYPES[h[1]], device=self.device)
        dist.recv(t, src=src)
        return t

    def eval_forward(self, model: nn.Module, inputs: Any, targets: Any = None) -> torch.Tensor | None:
        if not self.multi:
            return model(inputs)
        x = self.to_device(inputs) if self.is_first else self._recv_act()
        y = model(x)
        if self.is_last:
            return y
        for work, _ in self._send_act(y.detach()):
            work.wait()
        return None

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        if self.multi:
            raise RuntimeError(
                "strategy=model_parallel across processes schedules forward and backward itself: use "
                "session.train_step(model, optimizer, [batch], loss_fn) (the Trainer does) instead of backward()"
            )
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        if not self.multi:
            return super().clip_grad_norm(model, max_norm)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            sq += g.detach().double().pow(2).sum()
        dist.all_reduce(sq)  # stages hold disjoint parameters: the global norm sums their squares
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return norm.float()

    def check_in_sync(self, model: nn.Module) -> list[str]:
        return []  # stages hold different parameters by design

    # ------------------------------------------------------------------ chain check
    def _check_chain(self, inputs: Any) -> None:
        self._chain_checked = True
        if self._skeleton is None or not torch.is_tensor(inputs):
            return
        order = [n for names in self.resolved for n in names]
        problem = pl.check_chain(self._skeleton, order, inputs[:1])
        if problem:  # the same verdict on every rank: all raise, none hangs
            raise ConfigError(f"strategy.placement: {problem}")

    # ------------------------------------------------------------------ metrics
    @staticmethod
    def _new_window() -> dict[str, Any]:
        return {"steps": 0, "span": 0.0, "busy": {}}

    def _gather_stats(self, loss: Any, busy: tuple[float, float], wall: float, peak: int) -> list[torch.Tensor]:
        """One small all_gather per step: the last stage's loss for every rank, and each stage's
        busy time, wall time and activation peak for the metrics."""
        local = torch.tensor(
            [float(loss) if loss is not None else 0.0, busy[0], busy[1], wall, float(peak)],
            dtype=torch.float64,
        )
        if not self.multi:
            rows = [local.clone() for _ in range(self.num_stages)]
            fwd = dict(self._stage_fwd)
            for k in range(self.num_stages):  # per-stage forward time (CPU devices); loss from the last
                rows[k][1] = fwd.get(k, 0.0)
                rows[k][2] = 0.0
                rows[k][4] = float(getattr(self, "_peaks", {}).get(k, 0))
            if loss is not None:
                rows[-1][0] = float(loss)
            return rows
        comm = local.to(self.device)
        out = [torch.empty_like(comm) for _ in range(dist.get_world_size())]
        dist.all_gather(out, comm)
        return [out[r].cpu() for r in self.stage_ranks]

    def _account(self, stats: list[torch.Tensor]) -> None:
        span = max(float(row[3]) for row in stats)  # ranks start aligned (the previous gather)
        for w in (self._window, self._run_totals):
            w["steps"] += 1
            w["span"] += span
            for k, row in enumerate(stats):
                w["busy"][k] = w["busy"].get(k, 0.0) + float(row[1]) + float(row[2])

    @staticmethod
    def _bubble(w: dict[str, Any]) -> dict[str, float]:
        if not w["steps"] or w["span"] <= 0:
            return {}
        out = {}
        fracs = []
        for k, b in sorted(w["busy"].items()):
            frac = max(0.0, 1.0 - b / w["span"])
            fracs.append(frac)
            out[f"pipeline/stage{k}_busy_ms"] = 1e3 * b / w["steps"]
            out[f"pipeline/stage{k}_bubble_fraction"] = frac
        out["pipeline/bubble_fraction"] = sum(fracs) / len(fracs)
        out["pipeline/step_ms"] = 1e3 * w["span"] / w["steps"]
        return out

    def bubble_fraction(self) -> float:
        """Mean over stages of the idle share of the pipeline's step time, over the whole run."""
        return self._bubble(self._run_totals).get("pipeline/bubble_fraction", float("nan"))

    def log_metrics(self) -> dict[str, float]:
        out = self._bubble(self._window) if self.multi else {
            k: v for k, v in self._bubble(self._window).items() if k.endswith("busy_ms") or k.endswith("step_ms")
        }
        self._window = self._new_window()
        return out

    def _report_memory(self, model: nn.Module, optimizer: torch.optim.Optimizer, grads: int, stats: list) -> None:
        """Per stage: bytes of parameters, gradients, optimizer state, and the measured peak of
        activations saved for backward under this schedule. Logged once, after the first step."""
        opt_state = {id(p): sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
                     for p, st in optimizer.state.items()}
        if self.multi:
            params = list(model.parameters())
            local = [
                sum(p.numel() * p.element_size() for p in params), float(grads),
                sum(opt_state.get(id(p), 0) for p in params),
                torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0,
            ]
            t = torch.tensor(local, dtype=torch.float64, device=self.device)
            out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(out, t)
            rows = [out[r].cpu().tolist() for r in self.stage_ranks]
        else:
            rows = []
            for names in self.resolved:
                ps = {id(p): p for n in names for p in model.get_submodule(n).parameters()}.values()
                pb = sum(p.numel() * p.element_size() for p in ps)
                gb = sum(p.numel() * p.element_size() for p in ps if p.requires_grad)
                rows.append([pb, gb, sum(opt_state.get(id(p), 0) for p in ps), 0])
        self._memory = []
        for k, (pb, gb, ob, cuda_peak) in enumerate(rows):
            entry = {"params_bytes": pb, "grads_bytes": gb, "optimizer_bytes": ob,
                     "activation_peak_bytes": float(stats[k][4])}
            if cuda_peak:
                entry["cuda_peak_allocated_bytes"] = cuda_peak
            self._memory.append(entry)
        if self.env is None or self.env.is_rank_zero:
            lines = [f"model_parallel memory per stage ({self.schedule}, M={self.microbatches}):"]
            for k, (spec, e) in enumerate(zip(self.specs, self._memory)):
                lines.append(
                    f"  stage {k} [{', '.join(spec.names)}] {spec.where()}: params {_mb(e['params_bytes'])}, grads "
                    f"{_mb(e['grads_bytes'])}, optimizer {_mb(e['optimizer_bytes'])}, activations peak "
                    f"{_mb(e['activation_peak_bytes'])}"
                    + (f", cuda peak {_mb(e['cuda_peak_allocated_bytes'])}" if "cuda_peak_allocated_bytes" in e else "")
                )
            text = "\n".join(lines)
            log.info(text)
            if self._logger is not None:
                self._logger.text("model_parallel/memory", text.replace("\n", "  \n"))
                self._logger.text("model_parallel/placement", pl.to_yaml(self.specs).replace("\n", "  \n"))
                self._logger.scalars(
                    0, {f"memory/stage{k}_{n}": v for k, e in enumerate(self._memory) for n, v in e.items()}
                )

    def memory_report(self) -> list[dict[str, float]] | None:
        return self._memory

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.multi and self._run_totals["steps"]:
            out["bubble_fraction"] = round(self.bubble_fraction(), 4)
        if self._memory:
            out["stage_params_bytes"] = [int(e["params_bytes"]) for e in self._memory]
            out["stage_activation_peak_bytes"] = [int(e["activation_peak_bytes"]) for e in self._memory]
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Single-process: the model as usual. Multi-process: rank 0 gathers every stage, so the
        file holds the whole model under the unsplit model's keys (loadable by strategy=single)
        and each stage's optimizer state under ``optimizer.pipeline_stages[<stage>]``. Other
        ranks return their own stage in the same layout."""
        if not self.multi:
            return super().state_dict(model, optimizer)
        local_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        local_opt = _to_cpu(optimizer.state_dict()) if optimizer is not None else None
        mine = (self.stage_index, local_model, local_opt)
        gathered: list[Any] | None = [None] * dist.get_world_size() if self.env.is_rank_zero else None
        dist.gather_object(mine, gathered, dst=0)
        parts = gathered if gathered is not None else [mine]
        merged: dict[str, Any] = {}
        stages: dict[str, Any] = {}
        for idx, m, o in parts:
            merged.update(m)
            stages[str(idx)] = o
        return {
            "model": merged,
            "optimizer": {"pipeline_stages": stages} if optimizer is not None else None,
            "placement": [list(names) for names in self.resolved],
        }

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        if not self.multi:
            return super().load_state_dict(model, optimizer, state)
        want = model.state_dict().keys()
        missing = [k for k in want if k not in state["model"]]
        if missing:
            raise ConfigError(
                f"checkpoint has no {missing[:5]} for pipeline stage {self.stage_index}: it was written for a "
                f"different model; resume with the model it was trained with"
            )
        model.load_state_dict({k: state["model"][k] for k in want})
        opt = state.get("optimizer")
        if optimizer is None or opt is None:
            return
        if "pipeline_stages" not in opt:
            log.warning("model_parallel: checkpoint has no per-stage optimizer state; optimizer starts fresh")
            return
        if state.get("placement") is not None and [list(n) for n in state["placement"]] != self.resolved:
            raise ConfigError(
                f"checkpoint was written with placement {state['placement']} but this run uses {self.resolved}: "
                f"resume with the same placement (the weights alone load under any placement through strategy=single)"
            )
        optimizer.load_state_dict(opt["pipeline_stages"][str(self.stage_index)])

    def replica_key(self, env: DistEnv) -> str:
        return f"pipeline stage {self.stage_index}" if self.multi else ""

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"pipeline_placement": repr(self.resolved)} if self.multi else {}

    def check_resume(self, meta: dict[str, Any]) -> None:
        saved = meta.get("pipeline_placement")
        if self.multi and saved is not None and saved != repr(self.resolved):
            raise ConfigError(
                f"the checkpoint was written by a pipeline with stages {saved}, this run has {self.resolved}: resume "
                f"with the same strategy.placement (the weights alone load under any placement through strategy=single)"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.name, "schedule": self.schedule, "microbatches": self.microbatches,
            "stages": self.num_stages, "init": self.init,
        }


# ---------------------------------------------------------------------- helpers
def _move(x: Any, dev: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(dev, non_blocking=True) if x.device != dev else x
    if isinstance(x, tuple):
        return tuple(_move(v, dev) for v in x)
    if isinstance(x, list):
        return [_move(v, dev) for v in x]
    if isinstance(x, dict):
        return {k: _move(v, dev) for k, v in x.items()}
    return x


def _to_cpu(x: Any) -> Any:
    if torch.is_tensor(x):
        return x.detach().cpu().clone()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _materialise(stage: nn.Module) -> None:
    """Allocate this stage's parameters on CPU and initialise every module with its own
    ``reset_parameters()`` under a generator seeded from the run's seed and the module's fully
    qualified name: the initial weights depend on the seed and the model, not on the placement."""
    stage.to_empty(device="cpu")
    base = torch.initial_seed()
    for name, m in stage.named_modules():
        direct = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if not direct:
            continue
        if not hasattr(m, "reset_parameters"):
            raise ConfigError(
                f"module {name!r} ({type(m).__name__}) holds parameters or buffers but has no reset_parameters(), so "
                f"it cannot be initialised after construction on the meta device: set strategy.init=full (build the "
                f"whole model on CPU once and keep this rank's stage)"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((base * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
            m.reset_parameters()


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"
