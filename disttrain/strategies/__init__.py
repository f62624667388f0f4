"""Strategies: how a train step is parallelised. Each config in ``conf/strategy/`` names one by
``_target_``; a user's own strategy plugs in the same way."""

from disttrain.strategies.base import Strategy
from disttrain.strategies.ddp import DDPStrategy
from disttrain.strategies.single import SingleStrategy

__all__ = ["DDPStrategy", "SingleStrategy", "Strategy"]
