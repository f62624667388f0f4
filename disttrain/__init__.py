"""disttrain: distributed training for ordinary PyTorch code.

    import disttrain
    ds = disttrain.setup(strategy="ddp")
    model, optimizer, loader = ds.prepare(model, optimizer, loader)
    ...
    ds.backward(loss)
"""

from disttrain.env import DistEnv
from disttrain.errors import ConfigError, NonFiniteLossError
from disttrain.session import Session, setup
from disttrain.strategies.base import Strategy
from disttrain.trainer import Trainer, TrainerConfig

__all__ = ["ConfigError", "DistEnv", "NonFiniteLossError", "Session", "Strategy", "Trainer", "TrainerConfig", "setup"]
__version__ = "0.1.0"
