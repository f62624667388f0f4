"""Where rank and world size come from, which device and backend to use, and the process group.

``DistEnv.from_environ()`` reads, in order of precedence:

* torchrun / torch.distributed.elastic (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``, ``GROUP_RANK``), on one node or many (``srun torchrun`` under
  SLURM, ``torchrun`` in each pod of a Kubeflow ``PyTorchJob``): torchrun sets per-process values that
  take precedence over whatever the scheduler set.
* a Kubeflow ``PyTorchJob`` whose container runs ``python -m disttrain`` without torchrun: the
  operator sets ``RANK`` (the pod's index, master first), ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT`` and ``PET_*`` variables (``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``, ...); each pod is
  then one process (local rank 0) and one node.
* other launchers that set ``RANK`` and ``WORLD_SIZE`` only: local rank ``RANK % LOCAL_WORLD_SIZE``.
* SLURM without torchrun (``srun python -m disttrain``): ``SLURM_PROCID``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS``, ``SLURM_NODEID``, the tasks on this node from ``SLURM_STEP_TASKS_PER_NODE`` /
  ``SLURM_TASKS_PER_NODE`` (``2(x3),1``) or ``SLURM_NTASKS_PER_NODE``, and the first host of
  ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` as the master address (port: from the job id,
  unless ``MASTER_ADDR`` / ``MASTER_PORT`` are exported).
* nothing: a single process (world size 1), e.g. plain ``python -m disttrain``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """One process's place in the job. Frozen: read once, passed explicitly, never a global."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "single"  # torchrun | pytorchjob | env | slurm | single
    restart_count: int = 0
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got WORLD_SIZE={self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank {self.rank} is outside world size {self.world_size}: check RANK/WORLD_SIZE "
                f"(or SLURM_PROCID/SLURM_NTASKS) set by your launcher ({self.source})"
            )
        if not 0 <= self.local_rank < max(self.local_world_size, 1):
            raise ValueError(
                f"local rank {self.local_rank} is outside local world size {self.local_world_size}"
            )

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "DistEnv":
        """Read the environment a launcher set; see the module docstring for precedence."""
        e = os.environ if environ is None else environ
        if "RANK" in e and "WORLD_SIZE" in e:
            world = int(e["WORLD_SIZE"])
            rank = int(e["RANK"])
            torchrun = "TORCHELASTIC_RUN_ID" in e or "LOCAL_RANK" in e
            if not torchrun and _is_pytorchjob(e):
                return cls._from_pytorchjob(e, rank, world)
            local_world = int(e.get("LOCAL_WORLD_SIZE", world))
            return cls(
                rank=rank,
                local_rank=int(e.get("LOCAL_RANK", rank % max(local_world, 1))),
                world_size=world,
                local_world_size=local_world,
                node_rank=int(e.get("GROUP_RANK", e.get("NODE_RANK", rank // max(local_world, 1)))),
                master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(e.get("MASTER_PORT", DEFAULT_PORT)),
                source="torchrun" if torchrun else "env",
                restart_count=int(e.get("TORCHELASTIC_RESTART_COUNT", 0)),
                extra={k: v for k, v in e.items() if k.startswith("TORCHELASTIC_")},
            )
        if "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
            world = int(e["SLURM_NTASKS"])
            rank = int(e["SLURM_PROCID"])
            node = int(e["SLURM_NODEID"]) if "SLURM_NODEID" in e else None
            local_world = _slurm_tasks_per_node(e, world, node)
            nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST", "")
            return cls(
                rank=rank,
                local_rank=int(e.get("SLURM_LOCALID", 0)),
                world_size=world,
                local_world_size=local_world,
                node_rank=node if node is not None else rank // max(local_world, 1),
                master_addr=e.get("MASTER_ADDR") or _first_slurm_host(nodelist),
                master_port=int(e.get("MASTER_PORT") or _slurm_port(e)),
                source="slurm",
                restart_count=int(e.get("SLURM_RESTART_COUNT", 0)),
            )
        return cls()

    @classmethod
    def _from_pytorchjob(cls, e: Mapping[str, str], rank: int, world: int) -> "DistEnv":
        """One process per pod: the operator's RANK is the pod's index (master 0, worker i -> i+1)."""
        nproc = e.get("PET_NPROC_PER_NODE", "1")
        if nproc.isdigit() and int(nproc) > 1:
            raise ValueError(
                f"PyTorchJob sets nprocPerNode={nproc} (WORLD_SIZE={world} processes) but this pod runs "
                f"disttrain without torchrun, so it starts only one: run `torchrun -m disttrain ...` as the "
                f"container's command (see launchers/kubernetes/)"
            )
        return cls(
            rank=rank,
            local_rank=0,
            world_size=world,
            local_world_size=1,
            node_rank=int(e.get("PET_NODE_RANK", rank)),
            master_addr=e.get("MASTER_ADDR") or e.get("PET_MASTER_ADDR", "127.0.0.1"),
            master_port=int(e.get("MASTER_PORT") or e.get("PET_MASTER_PORT") or DEFAULT_PORT),
            source="pytorchjob",
        )

    # ----------------------------------------------------------------- derived facts
    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(self.local_world_size, 1))

    def device(self, accelerator: str = "auto") -> torch.device:
        """``auto``: this process's GPU (cuda:LOCAL_RANK) if CUDA is available, else CPU."""
        if accelerator not in ("auto", "cpu", "cuda"):
            raise ValueError(f"accelerator={accelerator!r}: expected one of auto, cpu, cuda")
        if accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise ValueError("accelerator=cuda but torch.cuda.is_available() is False; use accelerator=cpu")
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise ValueError(
                    f"local rank {self.local_rank} needs cuda:{self.local_rank} but only {count} GPU(s) are "
                    f"visible: launch at most {count} processes per node (--nproc_per_node={count})"
                )
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def backend(self, device: torch.device, backend: str = "auto") -> str:
        """NCCL for CUDA devices, gloo for CPU, unless the caller names one."""
        if backend != "auto":
            return backend
        return "nccl" if device.type == "cuda" else "gloo"


def configure_threads(device: torch.device, num_threads: int | None = None) -> int:
    """One intra-op thread per process on CPU by default: torch's default (one per core in every
    process) oversubscribes the cores as soon as two processes share a machine."""
    if device.type != "cpu" and num_threads is None:
        return torch.get_num_threads()
    n = num_threads or 1
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    return n


def agent_store(timeout_s: float = 60.0):
    """A client of torchrun's agent TCP store (the rendezvous store every rank of a launch
    shares, restarts included), or None outside torchrun. Ranks use it to agree on things before
    a process group exists: the run directory, whether every rank has checked its config."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist

    return dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=_dt.timedelta(seconds=timeout_s),
    )


BIND_ENV = "DISTTRAIN_BIND_ADDR"


def listen_address(env: DistEnv) -> str:
    """The address this process's listeners bind to (gloo/NCCL pair sockets, a store or a
    Horovod rendezvous it serves): ``DISTTRAIN_BIND_ADDR`` if set; loopback when the whole job
    runs on one machine; otherwise ``""`` (every interface, torch's default: set
    ``DISTTRAIN_BIND_ADDR`` to the node's private-network address to narrow it)."""
    if os.environ.get(BIND_ENV):
        return os.environ[BIND_ENV]
    return "127.0.0.1" if env.num_nodes == 1 else ""


def interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` (``127.0.0.1`` -> ``lo``), or None."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name
    return None


def bind_listeners(env: DistEnv) -> None:
    """Make gloo and NCCL listen on ``listen_address(env)`` (through their ``*_SOCKET_IFNAME``
    variables, unless the user set them): on one machine nothing listens beyond loopback."""
    address = listen_address(env)
    iface = interface_of(address) if address else None
    if iface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)


def init_process_group(env: DistEnv, backend: str, timeout_s: float, device: torch.device) -> bool:
    """Start the default process group if the job has more than one process. Idempotent."""
    import torch.distributed as dist

    if not env.is_distributed or dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    bind_listeners(env)
    kwargs: dict = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    timeout = _dt.timedelta(seconds=timeout_s)
    store = agent_store(timeout_s)
    if store is not None:
        # torch (2.13) assumes torchrun makes a new store for each restart and so adds no
        # per-attempt prefix, but the rendezvous store outlives restarts: a restarted group then
        # reads the previous attempt's (dead) gloo addresses and fails with "Connection refused".
        # Namespacing the keys by the restart count makes every attempt rendezvous afresh.
        kwargs["store"] = dist.PrefixStore(f"/disttrain/attempt_{env.restart_count}", store)
    else:
        kwargs["store"] = _own_store(env, timeout)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs)
    return True


def _own_store(env: DistEnv, timeout: _dt.timedelta):
    """Without torchrun's agent store: rank 0 serves a TCPStore on ``MASTER_PORT``, listening on
    ``listen_address`` only (``init_method="env://"`` would listen on every interface)."""
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if env.rank != 0:
        return dist.TCPStore(host, port, env.world_size, is_master=False, timeout=timeout)
    from disttrain.torchrun import bound_listen_socket

    address = listen_address(env) or ("::" if ":" in host else "0.0.0.0")
    sock = bound_listen_socket(address, port)
    return dist.TCPStore(host, port, env.world_size, is_master=True, timeout=timeout, master_listen_fd=sock.detach())


def destroy_process_group() -> None:
    """End the default process group, if any. Callers release models and optimizers first: a DDP
    reducer or pending work outliving its group is what lets gloo's thread abort the process at exit."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _is_pytorchjob(e: Mapping[str, str]) -> bool:
    """The Kubeflow training operator sets these ``PET_*`` variables (torchrun reads them as its
    defaults) in every PyTorchJob pod, next to RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    return any(k in e for k in ("PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "PET_NNODES"))


# --------------------------------------------------------------------- SLURM helpers
def _slurm_tasks_per_node(e: Mapping[str, str], world: int, node: int | None = None) -> int:
    """Tasks on this node. ``SLURM_STEP_TASKS_PER_NODE`` (this srun step) or ``SLURM_TASKS_PER_NODE``
    list every node in SLURM's compressed form, e.g. ``4(x2)`` or ``2(x3),1``: pick this node's entry."""
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        counts = _expand_slurm_counts(e.get(var, ""))
        if counts:
            return counts[node] if node is not None and 0 <= node < len(counts) else counts[0]
    if e.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(e["SLURM_NTASKS_PER_NODE"])
    nodes = int(e.get("SLURM_STEP_NUM_NODES") or e.get("SLURM_JOB_NUM_NODES") or e.get("SLURM_NNODES") or 1)
    return max(1, world // max(nodes, 1))


def _expand_slurm_counts(value: str) -> list[int]:
    """``2(x3),1`` -> ``[2, 2, 2, 1]``; ``""`` or garbage -> ``[]``."""
    counts: list[int] = []
    for part in filter(None, value.split(",")):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return []
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``node[003-005,007],gpu1`` -> ``node003``,
    ``rack[1-2]-gpu[01-08]`` -> ``rack1-gpu01`` (what ``scontrol show hostnames | head -1`` prints)."""
    if not nodelist:
        return "127.0.0.1"
    depth, first = 0, nodelist
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first host expression
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            first = nodelist[:i]
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def _slurm_port(e: Mapping[str, str]) -> int:
    """A port derived from the job id, so every task of one job agrees without talking."""
    job = int(e.get("SLURM_JOB_ID", "0") or 0)
    return 15000 + job % 20000
