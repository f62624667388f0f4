"""Asynchronous parameter-server training with bounded staleness (``strategy=parameter_server``).

* ``protocol``: the messages, how parameters are sharded across servers, optimizer-state moves;
* ``server``: ``Server``, one shard and its optimizer, the staleness scheduler;
* ``worker``: ``Client``, a worker's pushes, pulls and snapshot requests;
* ``strategy``: the Strategy hooks, delegating to this rank's server or client.
"""

from disttrain.strategies.parameter_server.protocol import shard_by_bytes
from disttrain.strategies.parameter_server.strategy import ParameterServerStrategy

__all__ = ["ParameterServerStrategy", "shard_by_bytes"]
