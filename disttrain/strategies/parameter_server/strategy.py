"""``strategy=parameter_server``: the Strategy hooks, each delegating to this rank's role objects.

One ``torchrun`` launch. Servers (``server.Server``: a shard of the parameters and its optimizer)
and workers (``worker.Client``: compute gradients on their own data shard, push them, pull fresh
parameters, each at its own pace) are placed by ``layout.RankLayout``: ``colocated`` (every rank
trains and hosts one shard on a thread, ``colocated.ColocatedServer``) or ``dedicated`` (ranks
``0..num_servers-1`` only serve). How the shards are cut and what travels: ``protocol``. See
docs/parameter_server.md.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from disttrain.strategies.base import Batch, LossFn, Strategy, require
from disttrain.strategies.parameter_server import protocol as p
from disttrain.strategies.parameter_server.colocated import ColocatedServer, LocalTransport
from disttrain.strategies.parameter_server.layout import KINDS, RankLayout
from disttrain.strategies.parameter_server.server import Resume, Server
from disttrain.strategies.parameter_server.worker import Client

if TYPE_CHECKING:
    from disttrain.env import DistEnv
    from disttrain.observe import RunLogger
    from disttrain.timing import StepTimer

log = logging.getLogger("disttrain")
T = TypeVar("T")


class ParameterServerStrategy(Strategy):
    """Parameter servers and asynchronous workers with the staleness bound ``max_staleness`` (0:
    synchronous, equal to ddp; None: fully asynchronous). ``servers``: ``colocated`` (every rank
    trains and serves one shard) or ``dedicated`` (ranks ``0..num_servers-1`` only serve)."""

    name = "parameter_server"

    def __init__(self, servers: str = "colocated", num_servers: int | None = None, max_staleness: int | None = 4,
                 log_every_n_updates: int = 50) -> None:
        super().__init__()
        self.servers_kind = servers
        self.num_servers = num_servers
        self.max_staleness = max_staleness
        self.log_every = log_every_n_updates
        self.is_server = False  # a dedicated server rank: serves, never trains
        self.ranks: RankLayout | None = None
        self.servers: list[int] = []
        self.workers: list[int] = []
        self.host: ColocatedServer | None = None  # colocated: this process's shard, served on a thread
        self.layout: p.ShardLayout | None = None
        self.client: Client | None = None  # worker ranks
        self.server: Server | None = None  # server ranks, while and after serving
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._pg: Any = None  # every rank: the messages
        self._worker_group: Any = None  # workers: their collectives during training
        self._resume = Resume()
        self._finished = False
        self._served = False  # colocated: this rank's worker has said goodbye
        self._in_run = False  # inside run(): dedicated servers are serving
        self._gathered: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ what setup and wrap provide
    @property
    def _dist(self) -> "DistEnv":
        return _ready(self.env, "setup()")

    @property
    def _shards(self) -> p.ShardLayout:
        return _ready(self.layout, "the model is prepared")

    @property
    def _opt(self) -> torch.optim.Optimizer:
        return _ready(self._optimizer, "the model is prepared")

    @property
    def _client(self) -> Client:
        return _ready(self.client, "the model is prepared (training ranks only)")

    @property
    def _serving(self) -> Server:
        return _ready(self.server, "serving starts (server shards only)")

    # ------------------------------------------------------------------ config
    def validate(self, env: "DistEnv") -> None:
        kind, ns, s = self.servers_kind, self.num_servers, self.max_staleness
        require(
            kind in KINDS,
            f"strategy.servers={kind!r}: expected colocated (every rank trains and hosts one server shard) or "
            f"dedicated (ranks 0..num_servers-1 only serve); e.g. strategy.servers=colocated",
        )
        if kind == "colocated":
            require(
                ns is None,
                f"strategy.num_servers={ns!r} with strategy.servers=colocated: colocated servers are one per rank; "
                f"for {ns} dedicated server ranks set strategy.servers=dedicated, or drop strategy.num_servers",
            )
        else:
            ns = 1 if ns is None else ns
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
        if kind == "colocated":
            return
        assert ns is not None  # dedicated: defaulted to 1 above
        require(
            ns < env.world_size,
            f"strategy.num_servers={ns} >= WORLD_SIZE={env.world_size} leaves no worker: ranks 0..{ns - 1} are "
            f"servers and the rest workers, so launch at least {ns + 1} processes (torchrun "
            f"--nproc_per_node={ns + 1} or more) or lower strategy.num_servers to at most "
            f"{max(env.world_size - 1, 1)}" + (" (with one process, use strategy=single)" if env.world_size == 1 else ""),
        )

    # ------------------------------------------------------------------ lifecycle
    def setup(self, env: "DistEnv", device: torch.device, backend: str, timeout_s: float) -> None:
        super().setup(env, device, backend, timeout_s)
        self.ranks = RankLayout.build(self.servers_kind, env.world_size, self.num_servers)
        self.is_server = not self.ranks.trains(env.rank)
        self.servers, self.workers = list(self.ranks.servers), list(self.ranks.workers)
        if not env.is_distributed:  # one process: plain training
            return
        # every rank makes every group, in the same order. The messages have a gloo group of
        # their own; colocated workers are every rank, so their collectives use the default group
        self._pg = dist.new_group(list(range(env.world_size)), backend="gloo")
        if self.ranks.kind == "dedicated":
            self._worker_group = dist.new_group(self.workers)

    def teardown(self) -> None:
        if self.host is not None and not self._served:  # the plug-in face: the user's loop is over
            try:
                self._stop_serving()
            except Exception as exc:  # a peer already gone: nothing left to serve
                log.warning("parameter_server: ending this rank's server shard: %s", exc)
        self._model = self._optimizer = None
        self.client = self.server = self.host = None

    @property
    def distributed(self) -> bool:
        return self.env is not None and self.env.is_distributed

    def data_shard(self, env: "DistEnv") -> tuple[int, int]:
        return RankLayout.build(self.servers_kind, env.world_size, self.num_servers).data_shard(env.rank)

    def eval_shard(self, env: "DistEnv") -> tuple[int, int]:
        if self._finished:  # every rank holds the final model: all of them evaluate
            return env.rank, env.world_size
        return self.data_shard(env)

    def reduce_group(self) -> Any:
        return None if self._finished else self._worker_group

    def writes_checkpoint(self) -> bool:
        if self.env is None:
            return True
        # during training only workers run the loop; the first one writes
        return self.env.is_rank_zero if self._finished else bool(self.workers) and self.env.rank == self.workers[0]

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        if optimizer is None:
            raise ValueError("strategy=parameter_server needs an optimizer: the servers run it on their shards")
        model = model.to(self.device)
        self._model, self._optimizer = model, optimizer
        self.layout = p.ShardLayout(list(model.parameters()), max(len(self.servers), 1))
        if self.distributed and not self.is_server:
            self.client = Client(self._dist.rank, self.servers, self._shards, self._pg, len(optimizer.param_groups),
                                 clock=self._resume.clock)
        return model, optimizer

    def _ensure_serving(self, logger: "RunLogger | None" = None) -> None:
        """Colocated: start serving this rank's shard, once, with the model as it is now (after
        any resume). The Trainer's ``run`` starts it; a plain plug-in loop (prepare, backward,
        step) starts it at its first step, and ``close``/``finish_training`` end it."""
        if self.servers_kind != "colocated" or self.client is None or self.host is not None:
            return
        transport = LocalTransport(self._pg, self._dist.rank)
        self.server = self._make_server(transport, logger)
        self.host = self._client.local = ColocatedServer(self._serving, transport)
        self._served = False
        self.host.start()

    def _stop_serving(self) -> None:
        """Colocated: this worker's last gradient and goodbye; then serve the others until they
        are done too, and take this rank's shard back into the model."""
        self._served = True
        self._client.exchange(pull=False, done=True)
        if self.host is not None:
            self.host.join()
            self._take_back()

    # ------------------------------------------------------------------ roles
    def run(self, loop: Callable[[], T], logger: "RunLogger | None" = None) -> T | None:
        if not self.distributed:
            return loop()
        if self.is_server:  # dedicated: serve this rank's shard until every worker is done
            self.server = self._make_server(p.C10dTransport(self._pg), logger)
            self.server.serve()
            self._take_back()
            return None
        self._ensure_serving(logger)
        self._in_run = True
        out = loop()
        self._stop_serving()
        return out

    def _make_server(self, transport: p.Transport, logger: "RunLogger | None") -> Server:
        """This rank's shard: copies of its parameters and a mirror of the user's optimizer."""
        me, layout, opt = self._dist.rank, self._shards, self._opt
        mine = layout.shards[me]
        copies = [nn.Parameter(layout.params[i].detach().clone()) for i in mine]
        return Server(
            copies, p.mirror_optimizer(opt, layout.params, mine, copies), self.workers, self.max_staleness,
            transport, len(opt.param_groups), dtype=layout.dtype, resume=self._resume,
            indices=mine, log=_tensorboard(logger) if logger is not None else None, log_every=self.log_every,
        )

    def _take_back(self) -> None:
        """The served shard's result into the model and the user's optimizer (``finish_training``
        then broadcasts every shard from its server)."""
        mine, server = self._shards.shards[self._dist.rank], self._serving
        with torch.no_grad():
            for i, c in zip(mine, server.params):
                self._shards.params[i].copy_(c)
        p.set_optimizer_state(self._opt, self._shards.params, server.snapshot()["optimizer"])

    # ------------------------------------------------------------------ a worker's step
    def train_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        micro_batches: Sequence[Batch],
        loss_fn: LossFn,
        grad_clip: float | None,
        timer: "StepTimer",
    ) -> torch.Tensor:
        client = self.client
        if client is None:  # one process: plain training
            return super().train_step(model, optimizer, micro_batches, loss_fn, grad_clip, timer)
        self._ensure_serving()
        client.exchange(pull=True, timer=timer)  # push the previous gradient, pull fresh parameters
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        mean, samples = self.forward_backward(model, micro_batches, loss_fn, timer)
        if grad_clip:
            self.clip_grad_norm(model, grad_clip)
        # pushed at the start of the next step (or before a collective, or at the end)
        client.push_later(float(mean.item()), [g["lr"] for g in optimizer.param_groups], samples,
                          time.perf_counter() - t0)
        return mean

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        """Plug-in face (``ds.step()``): push this gradient and pull fresh parameters now."""
        if self.distributed and self.servers_kind == "dedicated" and not self._in_run:
            raise RuntimeError(
                "strategy=parameter_server with servers=dedicated: the server ranks serve only inside "
                "ds.run(loop) (wrap the training loop in a function and call ds.run on every rank, then "
                "ds.finish_training()); or use servers=colocated (the default), which runs the loop as it is"
            )
        if self.client is None:
            return super().optimizer_step(model, optimizer, grad_clip)
        if grad_clip:
            self.clip_grad_norm(model, grad_clip)
        self._ensure_serving()
        self.client.push_later(float("nan"), [g["lr"] for g in optimizer.param_groups], 0, 0.0)
        self.client.exchange(pull=True)

    def _flush(self) -> None:
        if self.client is not None and not self._finished and self.client.flush() and self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)

    def reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        self._flush()  # a worker waiting in a collective must not hold a gradient back
        return super().reduce(tensor, op)

    def barrier(self) -> None:
        self._flush()
        super().barrier()

    def log_metrics(self) -> dict[str, float]:
        if self.client is None:
            return {}
        return {"ps/wait_ms_per_step": 1e3 * self.client.wait_s / max(self.client.clock, 1)}

    # ------------------------------------------------------------------ checkpoints
    def export_state_dict(self, model: nn.Module) -> dict[str, Any] | None:
        """During training, the servers' current parameters (fetched as for a checkpoint:
        collective over the workers, every gradient pushed so far applied); after, the model."""
        state = self.state_dict(model, None)["model"]
        return state if self.env is None or self.env.is_rank_zero else None

    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """During training (called by every worker): the servers' current parameters and optimizer
        state, fetched by the writing worker after all workers' gradients up to now are applied."""
        if self._finished or self.client is None:
            return super().state_dict(model, optimizer)
        self.barrier()  # every worker's pending gradient is on its way to the servers
        if not self.writes_checkpoint():
            return super().state_dict(model, optimizer)
        layout = self._shards
        self._ensure_serving()
        snaps = self._client.snapshot()
        current = [q.detach().clone() for q in layout.params]
        opt_state = dict(optimizer.state) if optimizer is not None else {}
        try:
            for j, snap in enumerate(snaps):
                if layout.numel[j]:
                    layout.unflatten(j, snap["params"])
                if optimizer is not None:
                    p.set_optimizer_state(optimizer, layout.params, snap["optimizer"])
            return {
                "model": {k: v.detach().clone() for k, v in self.unwrap(model).state_dict().items()},
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "parameter_server": {
                    "server_updates": [snap["updates"] for snap in snaps],
                    "server_versions": [snap["version"] for snap in snaps],
                    "worker_clock": self._client.clock,  # every worker's, after the barrier
                },
            }
        finally:  # this worker goes on with the parameters it was sent (its staleness bookkeeping)
            with torch.no_grad():
                for q, c in zip(layout.params, current):
                    q.copy_(c)
            if optimizer is not None:
                optimizer.state.clear()
                optimizer.state.update(opt_state)

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        super().load_state_dict(model, optimizer, state)
        ps = state.get("parameter_server")
        if ps and self.env is not None and len(ps["server_versions"]) == len(self.servers):
            clock = int(ps["worker_clock"])
            if self.client is not None:
                self.client.clock = clock
            me = self.env.rank
            if me in self.servers:  # shard me is served by rank me
                self._resume = Resume(int(ps["server_versions"][me]), int(ps["server_updates"][me]), clock)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"servers": str(self.servers_kind), "num_servers": len(self.servers)}

    # ------------------------------------------------------------------ back together
    def finish_training(self, model: nn.Module) -> None:
        """Servers send their shards (and optimizer state) to every rank; statistics are shared."""
        if self._finished or not self.distributed:
            self._finished = True
            return
        if self.host is not None and not self._served:  # the plug-in face, after the user's loop
            self._stop_serving()
        me, layout = self._dist.rank, self._shards
        for j in self.servers:
            if not layout.numel[j]:
                continue
            buf = layout.flatten(j) if me == j else torch.empty(layout.numel[j], dtype=layout.dtype)
            dist.broadcast(buf, src=j, group=self._pg)
            if me != j:
                layout.unflatten(j, buf)
        bufs = list(self.unwrap(model).buffers())
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
                obj: list[Any] = [p.optimizer_state(opt, layout.params, layout.shards[j]) if me == j else None]
                dist.broadcast_object_list(obj, src=j, group=self._pg)
                if me != j:
                    p.set_optimizer_state(opt, layout.params, obj[0])
        mine = self.server.stats() if self.server is not None else (self.client.stats() if self.client else {})
        if self.server is not None and self.client is not None:  # colocated: both roles here
            mine["worker"] = self.client.stats()
        gathered: list[Any] = [None] * self._dist.world_size
        dist.all_gather_object(gathered, mine, group=self._pg)
        self._gathered = gathered
        self._finished = True

    # ------------------------------------------------------------------ what a user reads
    @property
    def staleness_log(self) -> list[tuple[int, int, int]]:
        """``(worker, its clock, staleness)`` of every gradient this rank's server applied."""
        return list(self.server.staleness_log) if self.server is not None else []

    @property
    def updates(self) -> int:
        return self.server.updates if self.server is not None else 0

    @property
    def shards(self) -> list[list[int]]:
        return self.layout.shards if self.layout is not None else []

    def summary(self) -> dict[str, Any]:
        stats = self._gathered or [self.server.stats() if self.server is not None else {}]
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
        out["ps_worker_compute_s"] = {r: round(v[4], 3) for r, v in workers.items()}
        # where the servers' time goes (per server: handling messages, of which optimizer, replies)
        out["ps_servers"] = str(self.servers_kind)
        out["ps_server_busy_s"] = [round(s["busy_s"], 3) for s in servers]
        out["ps_server_apply_s"] = [round(s["apply_s"], 3) for s in servers]
        out["ps_server_reply_s"] = [round(s["reply_s"], 3) for s in servers]
        return out


def _tensorboard(logger: "RunLogger") -> Callable[[dict[str, float], list[int], int, bool], None]:
    """A server's log callback writing to TensorBoard (the logger writes on rank 0 only)."""

    def write(scalars: dict[str, float], staleness: list[int], step: int, final: bool) -> None:
        logger.scalars(step, scalars)
        if staleness:
            logger.histogram(step, "ps/staleness_all" if final else "ps/staleness", staleness)

    return write


def _ready(value: T | None, what: str) -> T:
    if value is None:
        raise RuntimeError(f"strategy=parameter_server: used before {what}")
    return value
