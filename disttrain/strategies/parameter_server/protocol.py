"""What servers and workers say to each other, and how parameters are split between servers.

Messages (one stream per tag, so a message of one kind never blocks behind another):

* ``HEADER`` (worker -> server, float64): flags (``PUSH``: a gradient follows; ``PULL``: send me
  fresh parameters; ``DONE``: I have finished; ``SNAP``: send me your state for a checkpoint),
  the worker's rank and clock (pushes so far), figures piggybacked for the logs (last loss,
  samples, elapsed, wait and compute seconds) and the learning rate of each parameter group.
* ``GRAD`` (worker -> server): the worker's gradient for the server's shard, flattened.
* ``PARAMS`` (server -> worker): ``[held_s, version, *shard]``: how long the server held the
  pull (the staleness bound's wait), the shard's version, the parameters.
* ``SNAP_LEN`` / ``SNAP_DATA`` (server -> worker): a checkpoint snapshot, ``torch.save``d.

The transport (``Transport``) is c10d point to point on a gloo group (gloo can receive from any
source, which a server needs for headers); tests drive a Server with a fake one.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, cast

import torch
import torch.distributed as dist

HEADER, GRAD, PARAMS, SNAP_LEN, SNAP_DATA = 11, 12, 13, 14, 15
PUSH, PULL, DONE, SNAP = 1, 2, 4, 8
REPLY_PREFIX = 2  # held_s, version


def isend(tensor: torch.Tensor, dst: int, group: Any, tag: int) -> dist.Work:
    """``dist.isend`` typed as it behaves here: every rank of ``group`` gets a request back."""
    return cast(dist.Work, dist.isend(tensor, dst=dst, group=group, tag=tag))


def irecv(tensor: torch.Tensor, src: int | None, group: Any, tag: int) -> dist.Work:
    """``dist.irecv`` (``src=None``: from any rank), typed like ``isend``."""
    return cast(dist.Work, dist.irecv(tensor, src=src, group=group, tag=tag))


@dataclass
class Header:
    """A worker's request. ``lrs``: the learning rate of each of its optimizer's groups."""

    flags: int
    worker: int
    clock: int = 0
    loss: float = float("nan")
    samples: float = 0.0
    elapsed_s: float = 0.0
    wait_s: float = 0.0
    compute_s: float = 0.0
    lrs: list[float] = field(default_factory=list)

    FIXED = 9  # the fields above, plus one reserved slot

    @staticmethod
    def size(num_groups: int) -> int:
        return Header.FIXED + num_groups

    def encode(self, num_groups: int) -> torch.Tensor:
        vals = [self.flags, self.worker, self.clock, self.loss, self.samples, self.elapsed_s, self.wait_s,
                self.compute_s, 0.0]
        lrs = (list(self.lrs) + [float("nan")] * num_groups)[:num_groups]
        return torch.tensor(vals + lrs, dtype=torch.float64)

    @classmethod
    def decode(cls, t: torch.Tensor) -> "Header":
        v = t.tolist()
        return cls(int(v[0]), int(v[1]), int(v[2]), loss=float(v[3]), samples=float(v[4]),
                   elapsed_s=float(v[5]), wait_s=float(v[6]), compute_s=float(v[7]),
                   lrs=[float(x) for x in v[cls.FIXED:] if not math.isnan(x)])


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


class ShardLayout:
    """Which server holds which of the model's parameters, and how a shard travels: its tensors
    flattened, in model order, in one dtype (the widest of the model's)."""

    def __init__(self, params: Sequence[torch.Tensor], num_servers: int) -> None:
        self.params = list(params)
        dtype = self.params[0].dtype if self.params else torch.float32
        for p in self.params:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = dtype
        self.shards = shard_by_bytes([p.numel() * p.element_size() for p in self.params], num_servers)
        self.numel = [sum(self.params[i].numel() for i in shard) for shard in self.shards]

    def flatten(self, j: int, grads: bool = False) -> torch.Tensor:
        """Shard ``j`` of the parameters (or of their gradients, zeros where none) on the CPU."""
        parts = []
        for i in self.shards[j]:
            p = self.params[i]
            t = p.grad if grads else p.data
            parts.append((t if t is not None else torch.zeros_like(p)).detach().reshape(-1).to("cpu", self.dtype))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype)

    def unflatten(self, j: int, flat: torch.Tensor) -> None:
        """Copy ``flat`` (as ``flatten`` made it) into shard ``j``'s parameters."""
        off = 0
        with torch.no_grad():
            for i in self.shards[j]:
                p = self.params[i]
                p.copy_(flat[off : off + p.numel()].view_as(p).to(p.device, p.dtype))
                off += p.numel()


# ---------------------------------------------------------------------- optimizer state moves
def optimizer_state(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                    indices: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The optimizer's state of ``params[i]`` for ``i`` in ``indices``, keyed by ``i``, on the CPU."""
    out = {}
    for i in indices:
        st = optimizer.state.get(params[i])
        if st:
            out[i] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    return out


def set_optimizer_state(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                        states: dict[int, dict[str, Any]]) -> None:
    """Put what ``optimizer_state`` returned into ``optimizer``, on each parameter's device."""
    for i, st in states.items():
        p = params[i]
        optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() else v) for k, v in st.items()}


def mirror_optimizer(optimizer: torch.optim.Optimizer, model_params: Sequence[torch.Tensor],
                     indices: Sequence[int], copies: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """The user's optimizer rebuilt over ``copies`` (copies of ``model_params[i]``, ``i`` in
    ``indices``): same class, same parameter groups with every hyperparameter of each group, and
    the state it holds for those parameters. Groups with none of the shard's parameters are kept
    empty, so group ``g`` of the copy is group ``g`` of the original (learning rates line up)."""
    where = {id(model_params[i]): c for i, c in zip(indices, copies)}
    groups = []
    for g in optimizer.param_groups:
        mine = [where[id(p)] for p in g["params"] if id(p) in where]
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": mine})
    first = next((g for g in groups if g["params"]), None)
    if first is None:
        return type(optimizer)([torch.zeros(1, requires_grad=True)], **_constructor_args(optimizer))
    mirror = type(optimizer)([first], **_constructor_args(optimizer))
    mirror.param_groups.clear()
    for g in groups:  # every group, empty ones too: indices line up with the workers' lrs
        mirror.param_groups.append(g)
    for i, c in zip(indices, copies):
        st = optimizer.state.get(model_params[i])
        if st:
            mirror.state[c] = {k: (v.detach().clone().to(c.device) if torch.is_tensor(v) else v) for k, v in st.items()}
    return mirror


def _constructor_args(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The constructor arguments of ``optimizer`` that its ``defaults`` record and its
    constructor accepts (AdamW records ``decoupled_weight_decay`` but does not take it)."""
    import inspect

    accepted = set(inspect.signature(type(optimizer).__init__).parameters)
    return {k: v for k, v in optimizer.defaults.items() if k in accepted}


# ---------------------------------------------------------------------- transport
class Transport(Protocol):
    """How a Server talks to workers (c10d here; a fake in tests)."""

    def recv_header(self, size: int) -> Header: ...

    def recv_grad(self, src: int, numel: int, dtype: torch.dtype) -> torch.Tensor: ...

    def send(self, dst: int, tensor: torch.Tensor, tag: int) -> None: ...

    def finish(self) -> None: ...


class C10dTransport:
    """Point to point over one gloo process group. Sends are asynchronous; their buffers are kept
    until complete (``finish`` waits for all)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self._sends: list[tuple[Any, torch.Tensor]] = []

    def recv_header(self, size: int) -> Header:
        buf = torch.zeros(size, dtype=torch.float64)
        irecv(buf, None, self.group, HEADER).wait()
        return Header.decode(buf)

    def recv_grad(self, src: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = torch.empty(numel, dtype=dtype)
        dist.recv(buf, src=src, group=self.group, tag=GRAD)
        return buf

    def send(self, dst: int, tensor: torch.Tensor, tag: int) -> None:
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        self._sends.append((isend(tensor, dst, self.group, tag), tensor))

    def finish(self) -> None:
        for w, _ in self._sends:
            w.wait()
        self._sends = []


def pack(obj: Any) -> torch.Tensor:
    """``obj`` (tensors, numbers, containers) as a uint8 tensor, for a snapshot message."""
    raw = io.BytesIO()
    torch.save(obj, raw)
    return torch.frombuffer(bytearray(raw.getvalue()), dtype=torch.uint8)


def unpack(data: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)
