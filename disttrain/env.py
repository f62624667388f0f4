"""Where rank and world size come from, which device and backend to use, and the process group.

``DistEnv.from_environ()`` reads, in order of precedence:

* torchrun / torch.distributed.elastic (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``, ``GROUP_RANK``). A Kubeflow ``PyTorchJob`` sets ``RANK`` (the pod's
  node rank when it launches torchrun in each pod), ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; when
  torchrun runs inside the pod it overwrites them with per-process values, so both read correctly.
* SLURM without torchrun (``srun python -m disttrain``): ``SLURM_PROCID``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS``, ``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``, and the first host of
  ``SLURM_JOB_NODELIST`` as the master address.
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
    source: str = "single"  # torchrun | slurm | single
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
            local_world = int(e.get("LOCAL_WORLD_SIZE", world))
            rank = int(e["RANK"])
            return cls(
                rank=rank,
                local_rank=int(e.get("LOCAL_RANK", rank % max(local_world, 1))),
                world_size=world,
                local_world_size=local_world,
                node_rank=int(e.get("GROUP_RANK", e.get("NODE_RANK", rank // max(local_world, 1)))),
                master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(e.get("MASTER_PORT", DEFAULT_PORT)),
                source="torchrun" if "TORCHELASTIC_RUN_ID" in e or "LOCAL_RANK" in e else "env",
                restart_count=int(e.get("TORCHELASTIC_RESTART_COUNT", 0)),
                extra={k: v for k, v in e.items() if k.startswith("TORCHELASTIC_")},
            )
        if "SLURM_PROCID" in e and "SLURM_NTASKS" in e:
            world = int(e["SLURM_NTASKS"])
            local_world = _slurm_tasks_per_node(e, world)
            rank = int(e["SLURM_PROCID"])
            return cls(
                rank=rank,
                local_rank=int(e.get("SLURM_LOCALID", 0)),
                world_size=world,
                local_world_size=local_world,
                node_rank=int(e.get("SLURM_NODEID", rank // max(local_world, 1))),
                master_addr=e.get("MASTER_ADDR") or _first_slurm_host(e.get("SLURM_JOB_NODELIST", "")),
                master_port=int(e.get("MASTER_PORT", _slurm_port(e))),
                source="slurm",
                restart_count=int(e.get("SLURM_RESTART_COUNT", 0)),
            )
        return cls()

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


def init_process_group(env: DistEnv, backend: str, timeout_s: float, device: torch.device) -> bool:
    """Start the default process group if the job has more than one process. Idempotent."""
    import torch.distributed as dist

    if not env.is_distributed or dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=_dt.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return True


def destroy_process_group() -> None:
    """End the default process group, if any. Callers release models and optimizers first: a DDP
    reducer or pending work outliving its group is what lets gloo's thread abort the process at exit."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------- SLURM helpers
def _slurm_tasks_per_node(e: Mapping[str, str], world: int) -> int:
    if "SLURM_NTASKS_PER_NODE" in e:
        return int(e["SLURM_NTASKS_PER_NODE"])
    tpn = e.get("SLURM_TASKS_PER_NODE", "")  # e.g. "4(x2)" or "2,1"
    m = re.match(r"(\d+)", tpn)
    if m:
        return int(m.group(1))
    nodes = int(e.get("SLURM_JOB_NUM_NODES", e.get("SLURM_NNODES", 1)))
    return max(1, world // max(nodes, 1))


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``node[003-005,007],gpu1`` -> ``node003``."""
    if not nodelist:
        return "127.0.0.1"
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _slurm_port(e: Mapping[str, str]) -> int:
    """A port derived from the job id, so every task of one job agrees without talking."""
    job = int(e.get("SLURM_JOB_ID", "0") or 0)
    return 15000 + job % 20000
