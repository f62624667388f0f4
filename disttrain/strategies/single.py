"""One process, whole model: the reference every other strategy is tested against."""

from __future__ import annotations

from disttrain.env import DistEnv
from disttrain.strategies.base import Strategy, require


class SingleStrategy(Strategy):
    """Plain single-process training (the base class's behaviour)."""

    name = "single"

    def validate(self, env: DistEnv) -> None:
        require(
            env.world_size == 1,
            f"strategy=single runs one process but WORLD_SIZE={env.world_size}: use strategy=ddp "
            f"(or launch with --nproc_per_node=1)",
        )
