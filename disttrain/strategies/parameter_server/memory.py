"""Memory before launch for ``strategy=parameter_server`` (``python -m disttrain.estimate``): per
rank, from the real shard assignment (``protocol.ShardLayout`` over the model's parameters: whole
tensors, largest first to the least loaded server, so shards are uneven).

* ``colocated``: rank ``r`` is a worker (the model's parameters P, gradients G, activations A, no
  optimizer state: the servers step) and hosts shard ``r``: a copy of its parameters, the
  gradient it applies, and the optimizer state for them.
* ``dedicated``: server ``j`` (ranks ``0..num_servers-1``) holds shard ``j``'s parameters,
  gradient and optimizer state; every other rank is a worker, P + G + A.

A worker's buffers: the reply buffer it keeps for every shard's pulled parameters (``Client``:
P in the shards' dtype, plus 2 header elements per shard). Not counted: the flattened gradients
in flight to the servers (up to G per step), gradients queued at a server while the staleness
bound holds them (up to one shard-sized gradient per worker).
"""

from __future__ import annotations

from typing import Sequence

from disttrain.footprint import RankEstimate


def rank_estimates(kind: str, world: int, shards: Sequence[Sequence[int]], param_bytes: Sequence[int],
                   grad_bytes: Sequence[int], optim_bytes: Sequence[int], activations: float,
                   reply_bytes: float) -> list[RankEstimate]:
    """``shards[j]``: the parameter indices server ``j`` holds; ``*_bytes[i]``: parameter ``i``'s
    bytes; ``activations``: one worker's per micro-batch; ``reply_bytes``: a worker's buffers."""
    whole_p, whole_g = float(sum(param_bytes)), float(sum(grad_bytes))

    def part(sizes: Sequence[int], j: int) -> float:
        return float(sum(sizes[i] for i in shards[j]))

    if kind == "colocated":
        return [RankEstimate(f"worker + shard {r}", (r, r), whole_p + part(param_bytes, r), whole_g + part(grad_bytes, r),
                             part(optim_bytes, r), activations, buffers=reply_bytes,
                             note=f"shard {r}: {len(shards[r])} tensor(s); buffers: pulled parameters")
                for r in range(world)]
    ns = len(shards)
    servers = [RankEstimate(f"server {j}", (j, j), part(param_bytes, j), part(grad_bytes, j), part(optim_bytes, j), 0.0,
                            in_flight=0, note=f"shard {j}: {len(shards[j])} tensor(s)") for j in range(ns)]
    return servers + [RankEstimate("worker", (ns, world - 1), whole_p, whole_g, 0.0, activations, buffers=reply_bytes,
                                   note="buffers: pulled parameters")]
