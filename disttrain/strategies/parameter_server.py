"""Asynchronous parameter-server training with bounded staleness (stale-synchronous parallel).

One ``torchrun`` launch: ranks ``0..num_servers-1`` are servers, the rest workers.

* Servers hold the parameters sharded across them (greedy balance by bytes) and run the
  user's optimizer on their shard only (parameters of other shards never get a gradient there,
  so torch's optimizers skip them).
* Workers compute gradients on their own data shard. Each step a worker pushes its gradient
  shards to their servers and pulls fresh parameters, each at its own pace; a server applies a
  gradient as soon as the staleness bound allows (asynchronous SGD) and records its staleness:
  the number of updates applied to the shard between the version the worker was sent and the
  application of its gradient.
* Bounded staleness ``max_staleness = s`` is enforced by the servers, two ways:
  - clock rule: a worker's pull is answered only when it is at most ``s`` steps ahead of the
    slowest live worker;
  - update rule: an update is applied only if no gradient still being computed (or queued)
    would end up more than ``s`` updates stale. Gradients that sit exactly at the bound were
    all computed on the same version; they are averaged into one update. With ``s = 0`` that
    is every step: one averaged update of all workers' gradients, i.e. synchronous SGD on the
    global batch, identical to ``ddp``. ``s = null``: fully asynchronous, no rule.
* Transport: c10d point-to-point (``isend``/``irecv``) on a dedicated gloo group (gloo can
  receive from any source, which the server uses for request headers; on GPUs the traffic is
  staged through host memory). Tags keep headers, gradients and parameters apart.

Checkpoints during training are written by the first worker, but the servers hold the current
parameters and the optimizer state (Adam's moments, ...). At a checkpoint every worker flushes its
pending gradient and meets the others at a barrier; the writer then asks every server for a
snapshot, which a server sends once every live worker's clock has reached the writer's and its
queue is drained, so the checkpoint holds exactly the updates of the steps it is named after.
The checkpoint also holds each server's version and update count and the workers' clock (equal
at a checkpoint), which a resumed run starts from: staleness records and logs continue.

A worker's push is deferred to the start of its next step (sent in one message with the next
pull) so that its compute window runs from the reply to the next push, the straggler knob
(``trainer.slowdown``) included; before any collective (``reduce``/``barrier``) a pending push
is flushed, so a worker waiting in a collective never holds the others back (no deadlock).
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from disttrain.strategies.base import Batch, LossFn, Strategy, require

if TYPE_CHECKING:
    from disttrain.env import DistEnv
    from disttrain.observe import RunLogger
    from disttrain.timing import StepTimer

log = logging.getLogger("disttrain")
T = TypeVar("T")

# message tags (one stream each)
_HDR, _GRAD, _PARAM, _SNAP_LEN, _SNAP_DATA = 11, 12, 13, 14, 15
# header flags (_SNAP: send me your shard and its optimizer state, for a checkpoint)
_PUSH, _PULL, _DONE, _SNAP = 1, 2, 4, 8
# header layout (float64): flags, worker, clock, loss, samples, elapsed_s, wait_s, compute_s, reserved, lrs...
_H_FIXED = 9
_REPLY_PREFIX = 2  # reply: held_s, version, params...


def shard_by_bytes(sizes: Sequence[int], num_servers: int) -> list[list[int]]:
    """Assign parameter indices to servers, largest first to the least loaded one (ties: lowest
    server), then keep each shard in model order. Deterministic: every rank computes the same."""
    load = [0] * num_servers
    shards: list[list[int]] = [[] for _ in range(num_servers)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        j = min(range(num_servers), key=lambda j: (load[j], j))
        shards[j].append(i)
        load[j] += sizes[i]
    return [sorted(s) for s in shards]


@dataclass
class _Worker:
    """What a server knows of one worker."""

    rank: int
    clock: int = 0  # pushes received
    # computing (holds parameters: at the start, the initial ones, version 0) | queued (its
    # gradient waits for the bound) | idle (no parameters out: waiting for a pull, or done)
    state: str = "computing"
    version: int = 0  # version it was last sent
    grad: torch.Tensor | None = None
    lrs: list[float] = field(default_factory=list)
    arrival: int = 0
    pull_since: float | None = None
    done: bool = False
    # piggybacked figures (cumulative, from the worker's latest header)
    loss: float = float("nan")
    samples: float = 0.0
    elapsed_s: float = 0.0
    wait_s: float = 0.0
    compute_s: float = 0.0


class ParameterServerStrategy(Strategy):
    """Parameter servers on ranks ``0..num_servers-1``, asynchronous workers on the rest."""

    name = "parameter_server"

    def __init__(self, num_servers: int = 1, max_staleness: int | None = 4, log_every_n_updates: int = 50) -> None:
        super().__init__()
        self.num_servers = num_servers
        self.max_staleness = max_staleness
        self.log_every = log_every_n_updates
        self.is_server = False
        self._finished = False
        self._pg: Any = None
        self._worker_group: Any = None
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        # server-side record: (worker rank, worker clock, staleness) per applied gradient
        self.staleness_log: list[tuple[int, int, int]] = []
        self.updates = 0
        self._gathered: list[dict[str, Any]] | None = None
        # worker-side
        self._pending: dict[str, Any] | None = None
        self._clock = 0
        self._t_first: float | None = None
        self._samples = 0.0
        self._wait_s = 0.0
        self._compute_s = 0.0
        self._step_compute_t0 = 0.0
        self.versions_seen: list[list[int]] = []  # per step: the version received from each server

    # ------------------------------------------------------------------ config
    def validate(self, env: "DistEnv") -> None:
        ns, s = self.num_servers, self.max_staleness
        require(
            isinstance(ns, int) and not isinstance(ns, bool) and ns >= 1,
            f"strategy.num_servers={ns!r}: must be an integer >= 1 (ranks 0..num_servers-1 serve the "
            f"parameters); e.g. strategy.num_servers=1",
        )
        require(
            s is None or (isinstance(s, int) and not isinstance(s, bool) and s >= 0),
            f"strategy.max_staleness={s!r}: must be an integer >= 0 (0 = synchronous, s = a worker may run "
            f"at most s steps ahead of the slowest) or null (fully asynchronous); e.g. strategy.max_staleness=4",
        )
        require(
            isinstance(self.log_every, int) and self.log_every >= 1,
            f"strategy.log_every_n_updates={self.log_every!r}: must be an integer >= 1",
        )
        require(
            ns < env.world_size,
            f"strategy.num_servers={ns} >= WORLD_SIZE={env.world_size} leaves no worker: ranks 0..{ns - 1} are "
            f"servers and the rest workers, so launch at least {ns + 1} processes (torchrun "
            f"--nproc_per_node={ns + 1} or more) or lower strategy.num_servers to at most "
            f"{max(env.world_size - 1, 1)}" + (" (with one process, use strategy=single)" if env.world_size == 1 else ""),
        )

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "num_servers": self.num_servers, "max_staleness": self.max_staleness}

    # ------------------------------------------------------------------ lifecycle
    def setup(self, env: "DistEnv", device: torch.device, backend: str, timeout_s: float) -> None:
        super().setup(env, device, backend, timeout_s)
        ns = self.num_servers
        self.is_server = env.rank < ns
        self.servers = list(range(ns))
        self.workers = list(range(ns, env.world_size))
        # every rank makes every group, in the same order
        self._pg = dist.new_group(list(range(env.world_size)), backend="gloo")
        self._worker_group = dist.new_group(self.workers)

    def teardown(self) -> None:
        self._model = self._optimizer = None
        self._pending = None

    def data_shard(self, env: "DistEnv") -> tuple[int, int]:
        workers = env.world_size - int(self.num_servers)
        return max(env.rank - int(self.num_servers), 0), max(workers, 1)

    def eval_shard(self, env: "DistEnv") -> tuple[int, int]:
        if self._finished:  # every rank holds the final model: all of them evaluate
            return env.rank, env.world_size
        return self.data_shard(env)

    def reduce_group(self) -> Any:
        return None if self._finished else self._worker_group

    def writes_checkpoint(self) -> bool:
        if self.env is None:
            return True
        # during training only workers run the loop; the first one writes its copy
        return self.env.is_rank_zero if self._finished else self.env.rank == self.num_servers

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """During training (called by every worker): the servers' current parameters and optimizer
        state, fetched by the writing worker after all workers' gradients up to now are applied."""
        env = self.env
        if self._finished or env is None or not env.is_distributed or self.is_server:
            return super().state_dict(model, optimizer)
        self.barrier()  # every worker's pending gradient is on its way to the servers
        if not self.writes_checkpoint():
            return super().state_dict(model, optimizer)
        snaps = self._snapshot()
        inner = self.unwrap(model)
        current = [p.detach().clone() for p in self._params]
        opt_state = dict(optimizer.state) if optimizer is not None else {}
        try:
            for j, snap in enumerate(snaps):
                if self._numel[j]:
                    self._unflat(j, snap["params"])
                if optimizer is not None:
                    self._set_shard_optimizer_state(optimizer, snap["optimizer"])
            return {
                "model": {k: v.detach().clone() for k, v in inner.state_dict().items()},
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "parameter_server": {
                    "server_updates": [snap["updates"] for snap in snaps],
                    "server_versions": [snap["version"] for snap in snaps],
                    "worker_clock": self._clock,  # every worker's, after the barrier
                },
            }
        finally:  # this worker goes on with the parameters it was sent (its staleness bookkeeping)
            with torch.no_grad():
                for p, c in zip(self._params, current):
                    p.copy_(c)
            if optimizer is not None:
                optimizer.state.clear()
                optimizer.state.update(opt_state)

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        super().load_state_dict(model, optimizer, state)
        ps = state.get("parameter_server")
        if ps and self.env is not None and len(ps["server_versions"]) == len(self.servers):
            self._clock = int(ps["worker_clock"])
            if self.is_server:
                me = self.env.rank
                self._resume = (int(ps["server_versions"][me]), int(ps["server_updates"][me]), self._clock)

    def _shard_optimizer_state(self, j: int) -> dict[int, dict[str, Any]]:
        """The optimizer state of server ``j``'s parameters, by parameter index, on the CPU (to send)."""
        index = {id(p): i for i, p in enumerate(self._params)}
        mine = set(self.shards[j])
        return {index[id(p)]: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
                for p, st in self._optimizer.state.items() if index.get(id(p)) in mine}

    def _set_shard_optimizer_state(self, optimizer: torch.optim.Optimizer, states: dict[int, dict[str, Any]]) -> None:
        """Put what ``_shard_optimizer_state`` sent into ``optimizer``, on the parameters' devices."""
        for i, st in states.items():
            p = self._params[i]
            optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() else v) for k, v in st.items()}

    def _snapshot(self) -> list[dict[str, Any]]:
        """Ask every server for its shard and optimizer state (see the module docstring)."""
        hdr = self._header(_SNAP, float("nan"), [])
        sends = [dist.isend(hdr, dst=j, group=self._pg, tag=_HDR) for j in self.servers]
        snaps = []
        for j in self.servers:
            n = torch.zeros(1, dtype=torch.int64)
            dist.recv(n, src=j, group=self._pg, tag=_SNAP_LEN)
            data = torch.empty(int(n), dtype=torch.uint8)
            dist.recv(data, src=j, group=self._pg, tag=_SNAP_DATA)
            snaps.append(torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True))
        for w in sends:
            w.wait()
        return snaps

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        if optimizer is None:
            raise ValueError("strategy=parameter_server needs an optimizer: the servers run it on their shards")
        model = model.to(self.device)
        self._model, self._optimizer = model, optimizer
        params = list(model.parameters())
        self._params = params
        self._dtype = params[0].dtype if params else torch.float32
        for p in params:
            self._dtype = torch.promote_types(self._dtype, p.dtype)
        sizes = [p.numel() * p.element_size() for p in params]
        self.shards = shard_by_bytes(sizes, int(self.num_servers))
        self._numel = [sum(params[i].numel() for i in shard) for shard in self.shards]
        self._hdr_len = _H_FIXED + len(optimizer.param_groups)
        if self.env is not None and self.env.is_distributed and not self.is_server:
            self._reply_bufs = [torch.zeros(_REPLY_PREFIX + n, dtype=self._dtype) for n in self._numel]
        return model, optimizer

    def _flat(self, j: int, grads: bool = False) -> torch.Tensor:
        ps = [self._params[i] for i in self.shards[j]]
        if not ps:
            return torch.zeros(0, dtype=self._dtype)
        parts = []
        for p in ps:
            t = p.grad if grads else p.data
            if t is None:
                t = torch.zeros_like(p)
            parts.append(t.detach().reshape(-1).to("cpu", self._dtype))
        return torch.cat(parts)

    def _unflat(self, j: int, flat: torch.Tensor, grads: bool = False) -> None:
        off = 0
        for i in self.shards[j]:
            p = self._params[i]
            chunk = flat[off : off + p.numel()].view_as(p).to(p.device, p.dtype)
            off += p.numel()
            if grads:
                p.grad = chunk.clone()
            else:
                with torch.no_grad():
                    p.copy_(chunk)

    # ------------------------------------------------------------------ roles
    def run(self, loop: Callable[[], T], logger: "RunLogger | None" = None) -> T | None:
        if self.env is None or not self.env.is_distributed:
            return loop()
        if self.is_server:
            self._serve(logger)
            return None
        out = loop()
        self._exchange(pull=False, done=True)  # the last gradient, and goodbye
        return out

    # ------------------------------------------------------------------ worker
    def train_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        micro_batches: Sequence[Batch],
        loss_fn: LossFn,
        grad_clip: float | None,
        timer: "StepTimer",
    ) -> torch.Tensor:
        if self._t_first is None:
            self._t_first = time.perf_counter()
        self._exchange(pull=True, timer=timer)  # push the previous gradient, pull fresh parameters
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        samples = 0
        for inputs, targets in micro_batches:
            inputs, targets = self.to_device(inputs), self.to_device(targets)
            with timer.phase("forward"):
                loss = loss_fn(model(inputs), targets)
            with timer.phase("backward"):
                self.backward(loss / n, model)
            total += loss.detach()
            samples += len(targets)
        mean = total / n
        if grad_clip:
            self.clip_grad_norm(model, grad_clip)
        self._compute_s += time.perf_counter() - t0
        self._samples += samples
        # pushed at the start of the next step (or before a collective, or at the end)
        self._pending = {"loss": float(mean.item()), "lrs": [g["lr"] for g in optimizer.param_groups]}
        return mean

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        """Plug-in face (``ds.step()``): push this gradient and pull fresh parameters now."""
        if self.env is None or not self.env.is_distributed:
            return super().optimizer_step(model, optimizer, grad_clip)
        if grad_clip:
            self.clip_grad_norm(model, grad_clip)
        self._pending = {"loss": float("nan"), "lrs": [g["lr"] for g in optimizer.param_groups]}
        self._exchange(pull=True)

    def _header(self, flags: int, loss: float, lrs: list[float]) -> torch.Tensor:
        elapsed = time.perf_counter() - self._t_first if self._t_first is not None else 0.0
        vals = [flags, self.env.rank, self._clock, loss, self._samples, elapsed, self._wait_s, self._compute_s, 0.0]
        lrs = list(lrs) + [float("nan")] * (self._hdr_len - _H_FIXED - len(lrs))
        return torch.tensor(vals + lrs[: self._hdr_len - _H_FIXED], dtype=torch.float64)

    def _exchange(self, pull: bool, done: bool = False, timer: "StepTimer | None" = None) -> None:
        """One message to every server: the pending gradient (if any), a pull request (if
        ``pull``), a goodbye (if ``done``); then wait for the sends and the fresh parameters."""
        pending, self._pending = self._pending, None
        if pending is None and not pull and not done:
            return
        flags = (_PUSH if pending is not None else 0) | (_PULL if pull else 0) | (_DONE if done else 0)
        t0 = time.perf_counter()
        recvs = []
        if pull:
            recvs = [dist.irecv(self._reply_bufs[j], src=j, group=self._pg, tag=_PARAM) for j in self.servers]
        if pending is not None:
            self._clock += 1
        loss = pending["loss"] if pending is not None else float("nan")
        lrs = pending["lrs"] if pending is not None else []
        sends, keep = [], []
        for j in self.servers:
            hdr = self._header(flags, loss, lrs)
            keep.append(hdr)
            sends.append(dist.isend(hdr, dst=j, group=self._pg, tag=_HDR))
            if pending is not None and self._numel[j]:
                g = self._flat(j, grads=True)
                keep.append(g)
                sends.append(dist.isend(g, dst=j, group=self._pg, tag=_GRAD))
        for w in sends:
            w.wait()
        t1 = time.perf_counter()
        if pending is not None and self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)
        if not pull:
            if timer is not None:
                timer.add("push", t1 - t0)
            return
        for r in recvs:
            r.wait()
        t2 = time.perf_counter()
        held = max(float(b[0]) for b in self._reply_bufs)
        wait = min(held, t2 - t1)
        self._wait_s += wait
        versions = []
        for j, buf in enumerate(self._reply_bufs):
            versions.append(int(buf[1]))
            if self._numel[j]:
                self._unflat(j, buf[_REPLY_PREFIX:])
        self.versions_seen.append(versions)
        if timer is not None:
            timer.add("push", t1 - t0)
            timer.add("wait", wait)
            timer.add("pull", (t2 - t1) - wait + (time.perf_counter() - t2))

    def _flush(self) -> None:
        """Send a pending gradient before this worker blocks in a collective."""
        if self._pending is not None and not self.is_server and not self._finished:
            self._exchange(pull=False)

    def reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        self._flush()
        return super().reduce(tensor, op)

    def barrier(self) -> None:
        self._flush()
        super().barrier()

    def log_metrics(self) -> dict[str, float]:
        steps = max(self._clock, 1)
        return {"ps/wait_ms_per_step": 1e3 * self._wait_s / steps} if not self.is_server else {}

    # ------------------------------------------------------------------ server
    def _serve(self, logger: "RunLogger | None") -> None:
        me = self.env.rank
        self._mine = self.shards[me]
        self._n = self._numel[me]
        # a resumed run continues the saved version, update count and clocks (load_state_dict)
        self._version, self.updates, clock = getattr(self, "_resume", (0, 0, 0))
        self._arrivals = 0
        self._sends: list[tuple[Any, torch.Tensor]] = []
        self._w = {r: _Worker(r, clock=clock, version=self._version) for r in self.workers}
        self._snap_requests: list[tuple[int, int]] = []  # (worker rank, its clock)
        self._logger = logger
        self._window: list[int] = []
        self._window_losses: list[float] = []
        self._last_log = (time.perf_counter(), 0)
        self._t_start = time.perf_counter()
        hdr = torch.zeros(self._hdr_len, dtype=torch.float64)
        while not all(w.done for w in self._w.values()):
            dist.irecv(hdr, src=None, group=self._pg, tag=_HDR).wait()
            self._handle(hdr.clone())
            self._progress()
            self._sends = [(wk, b) for wk, b in self._sends if not wk.is_completed()]
        for wk, _ in self._sends:
            wk.wait()
        self._sends = []
        self._t_end = time.perf_counter()
        stuck = [w.rank for w in self._w.values() if w.state == "queued"]
        if stuck:
            raise RuntimeError(f"parameter server {me}: gradients of workers {stuck} were never applied")
        self._log(final=True)

    def _handle(self, msg: torch.Tensor) -> None:
        flags, r = int(msg[0]), int(msg[1])
        if flags & _SNAP:
            self._snap_requests.append((r, int(msg[2])))
            return
        w = self._w[r]
        w.loss, w.samples, w.elapsed_s, w.wait_s, w.compute_s = (float(v) for v in msg[3:8])
        if flags & _PUSH:
            g = None
            if self._n:
                g = torch.empty(self._n, dtype=self._dtype)
                dist.recv(g, src=r, group=self._pg, tag=_GRAD)
            if w.state != "computing":
                raise RuntimeError(f"parameter server: worker {r} pushed a gradient without parameters out ({w.state})")
            w.clock = int(msg[2])
            w.state, w.grad = "queued", g
            w.lrs = [float(v) for v in msg[_H_FIXED:] if not math.isnan(float(v))]
            self._arrivals += 1
            w.arrival = self._arrivals
            if not math.isnan(w.loss):
                self._window_losses.append(w.loss)
        elif w.state == "computing":  # a pull or goodbye without a gradient: parameters unused
            w.state = "idle"
        if flags & _PULL:
            w.pull_since = time.perf_counter()
        if flags & _DONE:
            w.done = True

    def _progress(self) -> None:
        """Apply what the staleness bound allows, then answer the pulls it allows."""
        s = self.max_staleness
        while True:
            moved = False
            live = [w.clock for w in self._w.values() if not w.done]
            slowest = min(live) if live else 0
            # pulls the clock rule lets through: answered below, with the current version
            answerable = [w for w in self._w.values()
                          if w.pull_since is not None and w.state == "idle" and (s is None or w.clock - slowest <= s)]
            queued = [w for w in self._w.values() if w.state == "queued"]
            if queued:
                group: list[_Worker] | None = None
                if s is None:
                    group = [min(queued, key=lambda w: w.arrival)]
                else:
                    # A worker whose pull is answerable counts as computing on the current
                    # version: at s = 0 its gradient belongs to this update, so the update waits
                    # for it (applying first would hand it the next version: sequential SGD on
                    # half batches, each gradient "0 stale", instead of one global-batch step).
                    out = [(w, w.version) for w in self._w.values() if w.state in ("computing", "queued")]
                    out += [(w, self._version) for w in answerable]
                    bound = [w for w, v in out if self._version - v >= s]
                    if not bound:
                        group = [min(queued, key=lambda w: w.arrival)]
                    elif all(w.state == "queued" for w in bound):
                        group = bound  # all computed on the same version: one averaged update
                if group:
                    self._apply(group)
                    moved = True
            for w in answerable:
                self._reply(w)
                moved = True
            if not moved:
                break
        # a snapshot waits until every live worker's gradients up to the writer's step are applied
        queued = any(w.state == "queued" for w in self._w.values())
        for req in list(self._snap_requests):
            if not queued and slowest >= req[1]:
                self._send_snapshot(req[0])
                self._snap_requests.remove(req)

    def _send_snapshot(self, dst: int) -> None:
        me = self.env.rank
        state = {
            "params": self._flat(me),
            "optimizer": self._shard_optimizer_state(me),
            "updates": self.updates,
            "version": self._version,
        }
        raw = io.BytesIO()
        torch.save(state, raw)
        data = torch.frombuffer(bytearray(raw.getvalue()), dtype=torch.uint8)
        n = torch.tensor([data.numel()], dtype=torch.int64)
        for t, tag in ((n, _SNAP_LEN), (data, _SNAP_DATA)):
            self._sends.append((dist.isend(t, dst=dst, group=self._pg, tag=tag), t))

    def _apply(self, group: list[_Worker]) -> None:
        opt = self._optimizer
        if self._n:
            grad = group[0].grad if len(group) == 1 else torch.stack([w.grad for w in group]).mean(0)
            off = 0
            for i in self._mine:
                p = self._params[i]
                p.grad = grad[off : off + p.numel()].view_as(p).to(p.device, p.dtype).clone()
                off += p.numel()
            lrs = max(group, key=lambda w: w.arrival).lrs
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr
            opt.step()
            for i in self._mine:
                self._params[i].grad = None
        for w in group:
            st = self._version - w.version
            self.staleness_log.append((w.rank, w.clock, st))
            self._window.append(st)
            w.state, w.grad = "idle", None
        self._version += 1
        self.updates += 1
        if self.updates % self.log_every == 0:
            self._log()

    def _reply(self, w: _Worker) -> None:
        buf = torch.empty(_REPLY_PREFIX + self._n, dtype=self._dtype)
        buf[0] = time.perf_counter() - w.pull_since
        buf[1] = self._version
        if self._n:
            buf[_REPLY_PREFIX:] = self._flat(self.env.rank)
        self._sends.append((dist.isend(buf, dst=w.rank, group=self._pg, tag=_PARAM), buf))
        w.state, w.version, w.pull_since = "computing", self._version, None

    def _log(self, final: bool = False) -> None:
        """TensorBoard from the servers (the logger writes on rank 0 only)."""
        lg = self._logger
        if lg is None:
            return
        step = max((w.clock for w in self._w.values()), default=0)
        now = time.perf_counter()
        t_last, u_last = self._last_log
        scalars: dict[str, float] = {"ps/updates_per_sec": (self.updates - u_last) / max(now - t_last, 1e-9)}
        if self._window:
            scalars["ps/staleness_mean"] = sum(self._window) / len(self._window)
            scalars["ps/staleness_max"] = max(self._window)
            lg.histogram(step, "ps/staleness", self._window)
        if self._window_losses:
            loss = sum(self._window_losses) / len(self._window_losses)
            scalars["train/loss"] = loss
        for w in self._w.values():
            if w.elapsed_s > 0:
                scalars[f"ps/worker{w.rank}/samples_per_sec"] = w.samples / w.elapsed_s
                scalars[f"ps/worker{w.rank}/wait_ms_per_step"] = 1e3 * w.wait_s / max(w.clock, 1)
        lg.scalars(step, scalars)
        if final and self.staleness_log:
            lg.histogram(step, "ps/staleness_all", [st for *_, st in self.staleness_log])
        self._window, self._window_losses = [], []
        self._last_log = (now, self.updates)

    # ------------------------------------------------------------------ back together
    def finish_training(self, model: nn.Module) -> None:
        """Servers send their shards (and optimizer state) to every rank; statistics are shared."""
        if self._finished or self.env is None or not self.env.is_distributed:
            self._finished = True
            return
        me = self.env.rank
        for j in self.servers:
            if not self._numel[j]:
                continue
            buf = self._flat(j) if me == j else torch.empty(self._numel[j], dtype=self._dtype)
            dist.broadcast(buf, src=j, group=self._pg)
            if me != j:
                self._unflat(j, buf)
        bufs = [b for b in self.unwrap(model).buffers()]
        if bufs:  # buffers (e.g. BatchNorm statistics) live on workers: the first one's win
            flat = torch.cat([b.detach().reshape(-1).to("cpu", torch.float64) for b in bufs])
            dist.broadcast(flat, src=self.workers[0], group=self._pg)
            off = 0
            for b in bufs:
                b.copy_(flat[off : off + b.numel()].view_as(b).to(b.device, b.dtype))
                off += b.numel()
        opt = self._optimizer
        if opt is not None:
            for j in self.servers:
                obj: list[Any] = [self._shard_optimizer_state(j) if me == j else None]
                dist.broadcast_object_list(obj, src=j, group=self._pg)
                if me != j:
                    self._set_shard_optimizer_state(opt, obj[0])
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, self._local_stats(), group=self._pg)
        self._gathered = gathered
        self._finished = True

    def _local_stats(self) -> dict[str, Any]:
        if not self.is_server:
            return {"role": "worker"}
        active = max(getattr(self, "_t_end", time.perf_counter()) - self._t_start, 1e-9)
        return {
            "role": "server",
            "staleness": [st for *_, st in self.staleness_log],
            "updates": self.updates,
            "updates_per_sec": self.updates / active,
            "workers": {w.rank: (w.samples, w.elapsed_s, w.wait_s, w.clock) for w in self._w.values()},
        }

    def summary(self) -> dict[str, Any]:
        stats = self._gathered or [self._local_stats()]
        servers = [s for s in stats if s and s.get("role") == "server"]
        if not servers:
            return {}
        stale = [st for s in servers for st in s["staleness"]]
        hist = Counter(stale)
        out: dict[str, Any] = {
            "ps_max_staleness": self.max_staleness,
            "ps_staleness_mean": round(sum(stale) / max(len(stale), 1), 3),
            "ps_staleness_max": max(stale, default=0),
            "ps_staleness_hist": " ".join(f"{k}:{hist[k]}" for k in sorted(hist)),
            "ps_server_updates_per_sec": [round(s["updates_per_sec"], 1) for s in servers],
        }
        workers = servers[0]["workers"]
        out["ps_worker_samples_per_sec"] = {r: round(v[0] / v[1], 1) if v[1] else 0.0 for r, v in workers.items()}
        out["ps_worker_wait_s"] = {r: round(v[2], 3) for r, v in workers.items()}
        return out
