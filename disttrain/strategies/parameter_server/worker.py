"""The worker's side: push gradients, pull parameters, ask for checkpoint snapshots, and count
where its time goes (compute, waiting for the staleness bound, moving bytes).

A push is deferred to the start of the next step (sent in one message with the next pull), so
the compute window runs from the reply to the next push, everything the worker does between
steps included; before a collective a pending push is flushed, so a worker waiting in a
collective never holds the others back.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist

from disttrain.strategies.parameter_server import protocol as p

if TYPE_CHECKING:
    from disttrain.strategies.parameter_server.colocated import ColocatedServer
    from disttrain.timing import StepTimer


class Client:
    """Worker ``rank``'s link to ``servers`` for the model parameters ``layout`` describes.
    ``local``: the server shard hosted in this process (colocated layout), talked to directly."""

    def __init__(self, rank: int, servers: Sequence[int], layout: p.ShardLayout, group: Any, num_groups: int,
                 clock: int = 0) -> None:
        self.rank, self.servers, self.layout, self.group = rank, list(servers), layout, group
        self.num_groups = num_groups
        self.clock = clock  # pushes sent
        self.samples = 0.0
        self.wait_s = 0.0
        self.compute_s = 0.0
        self.t_first: float | None = None
        self.pending: tuple[float, list[float]] | None = None  # (loss, lrs) of a gradient not yet pushed
        self.versions_seen: list[list[int]] = []  # per pull: the version received from each server
        self._replies = [torch.zeros(p.REPLY_PREFIX + n, dtype=layout.dtype) for n in layout.numel]
        self.local: ColocatedServer | None = None  # set when this process's shard starts serving

    @property
    def remote(self) -> list[int]:
        """The servers in other processes (every one but this rank's own shard, if colocated)."""
        return [j for j in self.servers if self.local is None or j != self.rank]

    def header(self, flags: int, loss: float = float("nan"), lrs: Sequence[float] = ()) -> torch.Tensor:
        elapsed = time.perf_counter() - self.t_first if self.t_first is not None else 0.0
        return p.Header(flags, self.rank, self.clock, loss, self.samples, elapsed, self.wait_s, self.compute_s,
                        list(lrs)).encode(self.num_groups)

    def push_later(self, loss: float, lrs: Sequence[float], samples: int, compute_s: float) -> None:
        """Record a computed gradient (in the parameters' ``.grad``); it leaves with the next exchange."""
        self.pending = (loss, list(lrs))
        self.samples += samples
        self.compute_s += compute_s

    def exchange(self, pull: bool, done: bool = False, timer: "StepTimer | None" = None) -> bool:
        """One message to every server: the pending gradient (if any), a pull request (if
        ``pull``), a goodbye (if ``done``); then wait for the sends and the fresh parameters.
        Returns whether a gradient was pushed (its ``.grad`` may then be cleared)."""
        if self.t_first is None:
            self.t_first = time.perf_counter()
        pending, self.pending = self.pending, None
        if pending is None and not pull and not done:
            return False
        flags = (p.PUSH if pending is not None else 0) | (p.PULL if pull else 0) | (p.DONE if done else 0)
        t0 = time.perf_counter()
        remote = self.remote
        recvs = [p.irecv(self._replies[j], j, self.group, p.PARAMS) for j in remote] if pull else []
        if pending is not None:
            self.clock += 1
        loss, lrs = pending if pending is not None else (float("nan"), [])
        sends, keep = [], []
        for j in remote:
            hdr = self.header(flags, loss, lrs)
            keep.append(hdr)
            sends.append(p.isend(hdr, j, self.group, p.HEADER))
            if pending is not None and self.layout.numel[j]:
                g = self.layout.flatten(j, grads=True)
                keep.append(g)
                sends.append(p.isend(g, j, self.group, p.GRAD))
        if self.local is not None:  # this process's shard: handed over directly
            mine = self.rank
            grad = self.layout.flatten(mine, grads=True) if pending is not None and self.layout.numel[mine] else None
            self.local.submit(p.Header.decode(self.header(flags, loss, lrs)), grad)
        for w in sends:
            w.wait()
        t1 = time.perf_counter()
        if pull:
            if self.local is not None:
                self._replies[self.rank].copy_(self.local.take(p.PARAMS))
            for r in recvs:
                r.wait()
            t2 = time.perf_counter()
            held = max(float(b[0]) for b in self._replies)
            wait = min(held, t2 - t1)
            self.wait_s += wait
            self.versions_seen.append([int(b[1]) for b in self._replies])
            for j, buf in enumerate(self._replies):
                if self.layout.numel[j]:
                    self.layout.unflatten(j, buf[p.REPLY_PREFIX:])
            if timer is not None:
                timer.add("wait", wait)
                timer.add("pull", (t2 - t1) - wait + (time.perf_counter() - t2))
        if timer is not None:
            timer.add("push", t1 - t0)
        return pending is not None

    def flush(self) -> bool:
        """Send a pending gradient now (before this worker blocks in a collective)."""
        return self.exchange(pull=False) if self.pending is not None else False

    def snapshot(self) -> list[dict[str, Any]]:
        """Every server's state for a checkpoint (answered once every worker's gradients up to
        this worker's clock are applied)."""
        hdr = self.header(p.SNAP)
        sends = [p.isend(hdr, j, self.group, p.HEADER) for j in self.remote]
        if self.local is not None:
            self.local.submit(p.Header.decode(hdr), None)
        snaps = []
        for j in self.servers:
            if self.local is not None and j == self.rank:
                self.local.take(p.SNAP_LEN)
                snaps.append(p.unpack(self.local.take(p.SNAP_DATA)))
                continue
            n = torch.zeros(1, dtype=torch.int64)
            dist.recv(n, src=j, group=self.group, tag=p.SNAP_LEN)
            data = torch.empty(int(n), dtype=torch.uint8)
            dist.recv(data, src=j, group=self.group, tag=p.SNAP_DATA)
            snaps.append(p.unpack(data))
        for w in sends:
            w.wait()
        return snaps

    def stats(self) -> dict[str, Any]:
        return {"role": "worker", "clock": self.clock, "wait_s": self.wait_s, "samples": self.samples}
