"""Which ranks serve parameter shards and which train (``strategy.servers``).

* ``colocated`` (the default, as ps-lite and BytePS run it): every rank trains and also hosts one
  server shard on a background thread (``colocated.ColocatedServer``), so the parameter server
  uses exactly the processes and cores data parallelism uses.
* ``dedicated``: ranks ``0..num_servers-1`` only serve, the others only train.

Shard ``j`` is always served by rank ``j`` (``servers == [0, 1, ..., len(servers) - 1]``), so a
shard index is its server's rank in either layout.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("colocated", "dedicated")


@dataclass(frozen=True)
class RankLayout:
    kind: str
    servers: tuple[int, ...]  # the rank serving shard j is servers[j] == j
    workers: tuple[int, ...]

    @classmethod
    def build(cls, kind: str, world_size: int, num_servers: int | None) -> "RankLayout":
        if kind == "colocated":
            ranks = tuple(range(world_size))
            return cls(kind, ranks, ranks)
        ns = int(num_servers or 1)
        return cls(kind, tuple(range(ns)), tuple(range(ns, world_size)))

    def serves(self, rank: int) -> bool:
        return rank in self.servers

    def trains(self, rank: int) -> bool:
        return rank in self.workers

    def data_shard(self, rank: int) -> tuple[int, int]:
        """(index, count) of ``rank``'s slice of the training data among the workers (a
        dedicated server gets a slice it never reads, so every rank builds the same loader)."""
        return (self.workers.index(rank) if rank in self.workers else 0), max(len(self.workers), 1)
