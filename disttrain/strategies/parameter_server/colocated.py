"""A server shard living inside a worker process (``strategy.servers: colocated``).

The shard's ``Server`` runs on a background thread that receives the other workers' messages
over the server process group (a gloo group of its own, so server traffic never interleaves with
the workers' collectives on the default group). The worker in the same process cannot send to
itself over gloo: its messages are handed to the Server directly (``submit``) and the Server's
answers to it go through in-memory mailboxes (``take``). One lock serialises the Server's state
machine between the two threads; the thread waits for messages without holding it.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import torch

from disttrain.strategies.parameter_server import protocol as p
from disttrain.strategies.parameter_server.server import Server


class LocalTransport(p.C10dTransport):
    """A colocated Server's transport: c10d for the other ranks, mailboxes for its own."""

    def __init__(self, group: Any, me: int) -> None:
        super().__init__(group)
        self.me = me
        self.mail: dict[int, queue.Queue[torch.Tensor]] = {t: queue.Queue() for t in (p.PARAMS, p.SNAP_LEN, p.SNAP_DATA)}
        self.local_grad: torch.Tensor | None = None  # the gradient the local worker's header announces

    def recv_grad(self, src: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if src == self.me:
            grad, self.local_grad = self.local_grad, None
            if grad is None:
                raise RuntimeError("parameter server: the local worker announced a gradient it did not hand over")
            return grad
        return super().recv_grad(src, numel, dtype)

    def send(self, dst: int, tensor: torch.Tensor, tag: int) -> None:
        if dst == self.me:
            self.mail[tag].put(tensor)
        else:
            super().send(dst, tensor, tag)


class ColocatedServer:
    """``server`` (built over a ``LocalTransport``) served on a thread of this worker process."""

    def __init__(self, server: Server, transport: LocalTransport) -> None:
        self.server, self.transport = server, transport
        self.me = transport.me
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self._remote = [w for r, w in server.workers.items() if r != self.me]
        self._thread = threading.Thread(target=self._serve, name=f"ps-server-{self.me}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        """Until every other worker has said goodbye (this process's worker says it directly)."""
        try:
            while not all(w.done for w in self._remote):
                msg = self.transport.recv_header(self.server.header_size)
                t0 = time.perf_counter()
                with self.lock:
                    self.server.handle(msg)
                    self.server.progress()
                    self.server.busy_s += time.perf_counter() - t0
        except BaseException as exc:  # handed to the worker thread (take, join)
            self.error = exc

    # ------------------------------------------------------------------ the local worker's side
    def submit(self, msg: p.Header, grad: torch.Tensor | None) -> None:
        """The local worker's message (and its gradient for this shard, if it pushes)."""
        self._check()
        with self.lock:
            t0 = time.perf_counter()
            self.transport.local_grad = grad
            self.server.handle(msg)
            self.server.progress()
            self.server.busy_s += time.perf_counter() - t0

    def take(self, tag: int) -> torch.Tensor:
        """The Server's next answer to the local worker of kind ``tag`` (blocks without using the
        CPU; fails if the server thread died)."""
        box = self.transport.mail[tag]
        while True:
            try:
                return box.get(timeout=0.5)
            except queue.Empty:
                self._check()

    def join(self) -> None:
        """After this process's worker said goodbye: wait for the others', then finish."""
        while self._thread.is_alive():
            self._thread.join(0.5)
        self._check()
        with self.lock:
            self.server.finish()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"parameter server thread of rank {self.me} failed: {self.error!r}") from self.error
