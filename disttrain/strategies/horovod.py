"""Horovod as an engine behind the Strategy interface: ``hvd.DistributedOptimizer`` (gradient
allreduce over Horovod's own gloo ring, overlapped with backward), parameters and optimizer
state broadcast from rank 0 at start, optional fp16 compression, and gradient accumulation as
Horovod's ``backward_passes_per_step`` (from the Session's ``gradient_accumulation_steps``).

Launch it like every other strategy::

    torchrun --nproc_per_node=2 -m disttrain strategy=horovod

Under torchrun, rank 0 starts Horovod's gloo rendezvous server and every rank learns its address
through torch's process group, sets the ``HOROVOD_*`` rank/size variables and calls
``hvd.init()`` - no ``horovodrun`` needed. With Horovod's own launcher::

    horovodrun -np 2 --gloo python -m disttrain.horovodrun strategy=horovod

(``disttrain.horovodrun`` maps ``HOROVOD_RANK``/``HOROVOD_SIZE``/... to the variables disttrain
reads, then runs the usual CLI; no torch process group is started then: every collective
disttrain needs goes through Horovod).

Install: ``bash scripts/install_horovod.sh`` (builds Horovod 0.28.1 for this torch; docs/engines.md).
"""

from __future__ import annotations

import os
import socket
import types
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from disttrain.env import DistEnv, listen_address
from disttrain.errors import ConfigError
from disttrain.strategies.base import Strategy, require

INSTALL_HINT = (
    "build and install it with: bash scripts/install_horovod.sh (Horovod 0.28.1 with PyTorch and Gloo; "
    "needs cmake and a C++17 compiler; the built wheel is cached in ~/.cache/disttrain/wheels); see docs/engines.md"
)

_COMPRESSION = ("none", "fp16")
_LAUNCHED_BY_HOROVODRUN = "HOROVOD_GLOO_RENDEZVOUS_ADDR"


def import_horovod(what: str = "strategy=horovod") -> Any:
    """``import horovod.torch`` or a ConfigError saying how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise ConfigError(f"{what} needs Horovod, which is not installed ({exc}): {INSTALL_HINT}") from exc
    return hvd


class HorovodStrategy(Strategy):
    """Data parallelism with Horovod. ``compression``: ``none`` or ``fp16`` (gradients are sent
    as fp16, halving the allreduce bytes and rounding them)."""

    name = "horovod"

    def __init__(self, compression: str = "none", rendezvous_timeout_s: float = 120.0) -> None:
        super().__init__()
        self.compression = compression
        self.rendezvous_timeout_s = float(rendezvous_timeout_s)
        self.hvd: Any = None
        self._server: Any = None
        self._initialized = False
        self._synchronized = False  # gradients already allreduced (clip_grad_norm synchronised them)

    # ------------------------------------------------------------------ lifecycle
    def validate(self, env: DistEnv) -> None:
        require(
            self.compression in _COMPRESSION,
            f"strategy.compression={self.compression!r}: expected one of {list(_COMPRESSION)} "
            f"(fp16 sends gradients as fp16)",
        )
        self.hvd = import_horovod()

    def setup(self, env: DistEnv, device: torch.device, backend: str, timeout_s: float) -> None:
        hvd = self.hvd
        by_horovodrun = _LAUNCHED_BY_HOROVODRUN in os.environ and "DISTTRAIN_HOROVOD_BOOTSTRAP" not in os.environ
        if env.is_distributed and not by_horovodrun:
            # torchrun (or any launcher setting RANK/WORLD_SIZE): torch's group carries the
            # rendezvous address from rank 0 to the others.
            super().setup(env, device, backend, timeout_s)
            self._bootstrap_from_torch(env)
        else:
            self.env, self.device = env, device
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(int(self.rendezvous_timeout_s)))
        hvd.init()
        self._initialized = True
        if hvd.size() != env.world_size or hvd.rank() != env.rank:
            raise RuntimeError(
                f"Horovod sees rank {hvd.rank()} of {hvd.size()} but the launcher said rank {env.rank} of "
                f"{env.world_size}: launch with torchrun, or with horovodrun through python -m disttrain.horovodrun"
            )

    def _bootstrap_from_torch(self, env: DistEnv) -> None:
        """Everything ``horovodrun`` would set up, derived from torchrun's environment."""
        me = {"host": socket.gethostname(), "rank": env.rank, "local_rank": env.local_rank, "node": env.node_rank}
        everyone: list[Any] = [None] * env.world_size
        dist.all_gather_object(everyone, me)
        nodes = sorted({p["node"] for p in everyone})
        local_size = {n: sum(p["node"] == n for p in everyone) for n in nodes}
        address: list[Any] = [None]
        if env.rank == 0:
            from horovod.runner.common.util.hosts import SlotInfo

            slots = [
                SlotInfo(
                    hostname=f"node{p['node']}", rank=p["rank"], local_rank=p["local_rank"],
                    cross_rank=nodes.index(p["node"]), size=env.world_size,
                    local_size=local_size[p["node"]], cross_size=len(nodes),
                )
                for p in sorted(everyone, key=lambda p: p["rank"])
            ]
            self._server, port = _bound_rendezvous_server(listen_address(env))
            self._server.init(slots)
            address = [(env.master_addr if env.num_nodes > 1 else "127.0.0.1", port)]
        dist.broadcast_object_list(address, src=0)
        host, port = address[0]
        os.environ.update(
            HOROVOD_GLOO_RENDEZVOUS_ADDR=str(host),
            HOROVOD_GLOO_RENDEZVOUS_PORT=str(port),
            HOROVOD_CONTROLLER="gloo",
            HOROVOD_CPU_OPERATIONS="gloo",
            HOROVOD_HOSTNAME=f"node{env.node_rank}",
            HOROVOD_RANK=str(env.rank),
            HOROVOD_SIZE=str(env.world_size),
            HOROVOD_LOCAL_RANK=str(env.local_rank),
            HOROVOD_LOCAL_SIZE=str(local_size[env.node_rank]),
            HOROVOD_CROSS_RANK=str(nodes.index(env.node_rank)),
            HOROVOD_CROSS_SIZE=str(len(nodes)),
            DISTTRAIN_HOROVOD_BOOTSTRAP="1",  # these came from us, not from horovodrun
        )
        if env.num_nodes == 1:
            os.environ.setdefault("HOROVOD_GLOO_IFACE", "lo")

    def teardown(self) -> None:
        if self._initialized:
            self.hvd.shutdown()
            self._initialized = False
        if self._server is not None:
            self._server.stop()
            self._server = None

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        hvd = self.hvd
        model = model.to(self.device)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        if optimizer is None:
            return model, None
        compression = hvd.Compression.fp16 if self.compression == "fp16" else hvd.Compression.none
        optimizer = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            compression=compression,
            backward_passes_per_step=self.run_options.gradient_accumulation_steps,
            op=hvd.Average,
        )
        # Horovod initialises an empty optimizer state by a step with zero gradients, which for
        # Adam counts a step and changes every later update's bias correction (found by the
        # plug-in oracle test). Fresh optimizers are alike on every rank: broadcast only a state
        # some rank already holds (loaded before prepare).
        if self.reduce(torch.tensor(float(bool(optimizer.state))), "max").item():
            hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        self._hvd_optimizer = optimizer
        # torch's zero_grad(set_to_none=...) signature, which Horovod's override lacks
        optimizer.zero_grad = types.MethodType(_zero_grad, optimizer)  # type: ignore[method-assign]
        return model, optimizer

    # ------------------------------------------------------------------ one step
    # Gradient sync is Horovod's: its hooks allreduce each gradient after
    # ``backward_passes_per_step`` backward passes, so set_grad_sync stays the base no-op.

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the *averaged* gradients: wait for Horovod's allreduce first."""
        optimizer = self._optimizer_of(model)
        if optimizer is not None and not self._synchronized:
            optimizer.synchronize()
            self._synchronized = True
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        self._hvd_optimizer = optimizer
        if grad_clip:
            self.clip_grad_norm(model, grad_clip)
        if self._synchronized:
            with optimizer.skip_synchronize():  # type: ignore[attr-defined]  # hvd.DistributedOptimizer
                optimizer.step()
        else:
            optimizer.step()
        self._synchronized = False

    def _optimizer_of(self, model: nn.Module) -> Any:
        return getattr(self, "_hvd_optimizer", None)

    # ------------------------------------------------------------------ collectives (Horovod's)
    def reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        ops = {"sum": self.hvd.Sum, "mean": self.hvd.Average, "max": self.hvd.Max, "min": self.hvd.Min}
        if op not in ops:
            raise ValueError(f"reduce op {op!r}: expected one of {sorted(ops)}")
        if not self._initialized or self.hvd.size() == 1:
            return tensor
        return self.hvd.allreduce(tensor.detach().cpu(), op=ops[op]).to(tensor.device)

    def barrier(self) -> None:
        if self._initialized and self.hvd.size() > 1:
            self.hvd.barrier()

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        return {"compression": self.compression}



def _bound_rendezvous_server(address: str) -> tuple[Any, int]:
    """Horovod's HTTP rendezvous server, listening on ``address`` only (``RendezvousServer.start``
    binds every interface). Horovod 0.28.1 is its last release, so the attributes set here are
    stable; the server is otherwise used exactly as ``start`` leaves it."""
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer, RendezvousServer
    from horovod.runner.util.threads import in_thread

    server = RendezvousServer()
    server._httpd = RendezvousHTTPServer((address, 0), RendezvousHandler, False)
    server._listen_thread = in_thread(target=server._httpd.serve_forever)
    return server, server._httpd.server_address[1]


def _zero_grad(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
    if getattr(self, "_handles", None):
        raise AssertionError(
            "optimizer.zero_grad() was called after loss.backward() but before optimizer.step(): "
            "Horovod's allreduce is still in flight"
        )
    torch.optim.Optimizer.zero_grad(self, set_to_none=set_to_none)
