"""A parameter server: holds one shard of the parameters and its optimizer, applies workers'
gradients as the staleness bound allows, answers their pulls, and serves checkpoint snapshots.

The whole state is made in the constructor and the server talks only through the ``Transport``
it is given, so a test drives it message by message with a fake (no processes).

Bounded staleness ``max_staleness = s`` (stale-synchronous parallel), two rules:

* clock rule: a worker's pull is answered only when it is at most ``s`` steps ahead of the
  slowest live worker;
* update rule: an update is applied only if no gradient still being computed (or queued) would
  end up more than ``s`` updates stale. Gradients that sit exactly at the bound were all computed
  on the same version; they are averaged into one update. With ``s = 0`` that is every step: one
  averaged update of all workers' gradients, i.e. synchronous SGD on the global batch. A live
  worker with no parameters out (its pull not yet arrived or not yet answered) counts as computing
  on the current version: at ``s = 0`` an update waits for it too (otherwise a worker whose pull
  comes after another's push, first or after a flushed push, would make the run sequential SGD on
  partial batches, every gradient "0 stale"). ``s = None``: fully asynchronous.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from disttrain.strategies.parameter_server import protocol as p


@dataclass
class WorkerView:
    """What a server knows of one worker."""

    rank: int
    clock: int = 0  # pushes received
    # computing (holds parameters: at the start, the initial ones) | queued (its gradient waits
    # for the bound) | idle (no parameters out: waiting for a pull, or done)
    state: str = "computing"
    version: int = 0  # the version it was last sent
    grad: torch.Tensor | None = None
    lrs: tuple[float, ...] = ()
    arrival: int = 0
    pull_since: float | None = None
    done: bool = False
    # piggybacked figures (cumulative, from the worker's latest header)
    loss: float = float("nan")
    samples: float = 0.0
    elapsed_s: float = 0.0
    wait_s: float = 0.0
    compute_s: float = 0.0


@dataclass(frozen=True)
class Resume:
    """Where a resumed server continues: its shard's version, its update count, the clocks."""

    version: int = 0
    updates: int = 0
    clock: int = 0


class Server:
    """Serves shard ``params`` (this server's own tensors, updated by ``optimizer``) to
    ``workers``. ``log(scalars, staleness, step, final)`` is called every ``log_every`` updates
    with the staleness of the updates since the last call, and at the end (``final``) with all."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        workers: Sequence[int],
        max_staleness: int | None,
        transport: p.Transport,
        num_groups: int,
        dtype: torch.dtype = torch.float32,
        resume: Resume = Resume(),
        indices: Sequence[int] = (),
        log: Callable[[dict[str, float], list[int], int, bool], None] | None = None,
        log_every: int = 50,
    ) -> None:
        self.params = list(params)
        self.indices = list(indices) or list(range(len(self.params)))  # the model's index of each
        self.optimizer = optimizer
        self.max_staleness = max_staleness
        self.transport = transport
        self.header_size = p.Header.size(num_groups)
        self.dtype = dtype
        self.numel = sum(t.numel() for t in self.params)
        self.version, self.updates = resume.version, resume.updates
        self.workers = {r: WorkerView(r, clock=resume.clock, version=resume.version) for r in workers}
        self.staleness_log: list[tuple[int, int, int]] = []  # (worker, its clock, staleness) per gradient
        self.snap_requests: list[tuple[int, int]] = []  # (worker, its clock)
        self.log, self.log_every = log, log_every
        self._arrivals = 0
        self._window: list[int] = []
        self._window_losses: list[float] = []
        self._last_log = (time.perf_counter(), self.updates)
        self.t_start = time.perf_counter()
        self.t_end: float | None = None
        # where a server's time goes: handling messages (all of it), of which the optimizer
        # (apply) and preparing and posting the answers (reply)
        self.busy_s = self.apply_s = self.reply_s = 0.0

    # ------------------------------------------------------------------ the loop
    def serve(self) -> None:
        """Until every worker has said goodbye: receive a request, then do what it allows."""
        while not all(w.done for w in self.workers.values()):
            msg = self.transport.recv_header(self.header_size)
            t0 = time.perf_counter()
            self.handle(msg)
            self.progress()
            self.busy_s += time.perf_counter() - t0
        self.finish()

    def finish(self) -> None:
        """After every worker's goodbye: complete the sends, check nothing is left, log."""
        self.transport.finish()
        self.t_end = time.perf_counter()
        stuck = [w.rank for w in self.workers.values() if w.state == "queued"]
        if stuck:
            raise RuntimeError(f"parameter server: gradients of workers {stuck} were never applied")
        self._log(final=True)

    def handle(self, msg: p.Header) -> None:
        if msg.flags & p.SNAP:
            self.snap_requests.append((msg.worker, msg.clock))
            return
        w = self.workers[msg.worker]
        w.loss, w.samples, w.elapsed_s, w.wait_s, w.compute_s = msg.loss, msg.samples, msg.elapsed_s, msg.wait_s, msg.compute_s
        if msg.flags & p.PUSH:
            grad = self.transport.recv_grad(msg.worker, self.numel, self.dtype) if self.numel else None
            if w.state != "computing":
                raise RuntimeError(f"parameter server: worker {w.rank} pushed a gradient without parameters out ({w.state})")
            w.clock, w.state, w.grad, w.lrs = msg.clock, "queued", grad, tuple(msg.lrs)
            self._arrivals += 1
            w.arrival = self._arrivals
            if msg.loss == msg.loss:  # not NaN
                self._window_losses.append(msg.loss)
        elif w.state == "computing":  # a pull or goodbye without a gradient: parameters unused
            w.state = "idle"
        if msg.flags & p.PULL:
            w.pull_since = time.perf_counter()
        if msg.flags & p.DONE:
            w.done = True

    def progress(self) -> None:
        """Apply what the staleness bound allows, then answer the pulls it allows; then the
        snapshot requests whose step every live worker's gradients have reached."""
        while True:
            moved = False
            slowest = self._slowest()
            answerable = [w for w in self.workers.values() if w.pull_since is not None and w.state == "idle"
                          and (self.max_staleness is None or w.clock - slowest <= self.max_staleness)]
            group = self._next_update()
            if group:
                self.apply(group)
                moved = True
            for w in answerable:
                self.reply(w)
                moved = True
            if not moved:
                break
        # a snapshot for step c waits for the gradients of steps <= c only: a gradient of a later
        # step may wait (at s = 0) for the writer itself, who is waiting for this snapshot
        slowest = self._slowest()
        for req in list(self.snap_requests):
            behind = any(w.state == "queued" and w.clock <= req[1] for w in self.workers.values())
            if not behind and slowest >= req[1]:
                self.transport_snapshot(req[0])
                self.snap_requests.remove(req)

    def _slowest(self) -> int:
        live = [w.clock for w in self.workers.values() if not w.done]
        return min(live) if live else 0

    def _next_update(self) -> list[WorkerView] | None:
        """The gradients to apply now as one update, or None (the bound says wait)."""
        queued = [w for w in self.workers.values() if w.state == "queued"]
        if not queued:
            return None
        s = self.max_staleness
        if s is None:
            return [min(queued, key=lambda w: w.arrival)]
        # a worker with parameters out computes on the version it was sent; one without (idle,
        # not done: between a flushed push and its next pull) will be sent the current version
        out = [(w, w.version) for w in self.workers.values() if w.state in ("computing", "queued")]
        out += [(w, self.version) for w in self.workers.values() if w.state == "idle" and not w.done]
        bound = [w for w, v in out if self.version - v >= s]
        if not bound:
            return [min(queued, key=lambda w: w.arrival)]
        if all(w.state == "queued" for w in bound):
            return bound  # all computed on the same version: one averaged update
        return None

    # ------------------------------------------------------------------ acts
    def apply(self, group: list[WorkerView]) -> None:
        t0 = time.perf_counter()
        if self.numel:
            grads = [w.grad for w in group if w.grad is not None]  # every queued worker holds one
            grad = grads[0] if len(grads) == 1 else torch.stack(grads).mean(0)
            off = 0
            for t in self.params:
                t.grad = grad[off : off + t.numel()].view_as(t).to(t.device, t.dtype).clone()
                off += t.numel()
            lrs = max(group, key=lambda w: w.arrival).lrs
            for g, lr in zip(self.optimizer.param_groups, lrs):
                g["lr"] = lr
            self.optimizer.step()
            for t in self.params:
                t.grad = None
        for w in group:
            st = self.version - w.version
            self.staleness_log.append((w.rank, w.clock, st))
            self._window.append(st)
            w.state, w.grad = "idle", None
        self.version += 1
        self.updates += 1
        self.apply_s += time.perf_counter() - t0
        if self.updates % self.log_every == 0:
            self._log()

    def reply(self, w: WorkerView) -> None:
        t0 = time.perf_counter()
        buf = torch.empty(p.REPLY_PREFIX + self.numel, dtype=self.dtype)
        buf[0] = time.perf_counter() - (w.pull_since or time.perf_counter())
        buf[1] = self.version
        if self.numel:
            buf[p.REPLY_PREFIX:] = self.flat()
        self.transport.send(w.rank, buf, p.PARAMS)
        w.state, w.version, w.pull_since = "computing", self.version, None
        self.reply_s += time.perf_counter() - t0

    def transport_snapshot(self, dst: int) -> None:
        data = p.pack(self.snapshot())
        self.transport.send(dst, torch.tensor([data.numel()], dtype=torch.int64), p.SNAP_LEN)
        self.transport.send(dst, data, p.SNAP_DATA)

    # ------------------------------------------------------------------ state
    def flat(self) -> torch.Tensor:
        if not self.params:
            return torch.zeros(0, dtype=self.dtype)
        return torch.cat([t.detach().reshape(-1).to("cpu", self.dtype) for t in self.params])

    def snapshot(self) -> dict[str, Any]:
        """This shard's parameters and optimizer state (by the model's parameter index), version
        and update count: what a checkpoint needs of this server."""
        states = p.optimizer_state(self.optimizer, self.params, range(len(self.params)))
        return {
            "params": self.flat(),
            "optimizer": {self.indices[k]: v for k, v in states.items()},
            "updates": self.updates,
            "version": self.version,
        }

    def stats(self) -> dict[str, Any]:
        active = max((self.t_end or time.perf_counter()) - self.t_start, 1e-9)
        return {
            "role": "server",
            "staleness": [st for *_, st in self.staleness_log],
            "updates": self.updates,
            "updates_per_sec": self.updates / active,
            "active_s": active,
            "busy_s": self.busy_s,
            "apply_s": self.apply_s,
            "reply_s": self.reply_s,
            "workers": {w.rank: (w.samples, w.elapsed_s, w.wait_s, w.clock, w.compute_s) for w in self.workers.values()},
        }

    def _log(self, final: bool = False) -> None:
        if self.log is None:
            return
        now = time.perf_counter()
        t_last, u_last = self._last_log
        scalars: dict[str, float] = {"ps/updates_per_sec": (self.updates - u_last) / max(now - t_last, 1e-9)}
        if self._window:
            scalars["ps/staleness_mean"] = sum(self._window) / len(self._window)
            scalars["ps/staleness_max"] = max(self._window)
        if self._window_losses:
            scalars["train/loss"] = sum(self._window_losses) / len(self._window_losses)
        for w in self.workers.values():
            if w.elapsed_s > 0:
                scalars[f"ps/worker{w.rank}/samples_per_sec"] = w.samples / w.elapsed_s
                scalars[f"ps/worker{w.rank}/wait_ms_per_step"] = 1e3 * w.wait_s / max(w.clock, 1)
        step = max((w.clock for w in self.workers.values()), default=0)
        window = [st for *_, st in self.staleness_log] if final else self._window
        self.log(scalars, window, step, final)
        self._window, self._window_losses = [], []
        self._last_log = (now, self.updates)
