"""``python -m disttrain.torchrun ...``: torchrun (same arguments), but every TCP store it serves
listens on one configured address instead of all interfaces.

torch's ``TCPStore`` server binds to ``[::]`` (every interface) whatever host it is given, and
torch.distributed has no authentication: anyone who can reach the rendezvous port can join or
disturb the job. Here each store server is handed a socket already bound to the address from
``DISTTRAIN_BIND_ADDR``; when that is unset, ``--standalone`` (single-node) runs bind to the
loopback address ``127.0.0.1``, and multi-node runs keep torch's behaviour (set
``DISTTRAIN_BIND_ADDR`` to the node's private-network address, see docs/reliability.md).

The workers themselves listen on nothing disttrain opens: with the agent's store shared
(``TORCHELASTIC_USE_AGENT_STORE``) they are its clients, and gloo/NCCL connect to the addresses
the rendezvous gives them.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Sequence

import torch.distributed as dist

ENV = "DISTTRAIN_BIND_ADDR"


def bound_listen_socket(addr: str, port: int) -> socket.socket:
    """A listening TCP socket on ``addr:port`` (``port`` 0: a free one)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(1024)
    return sock


def install(bind_addr: str) -> None:
    """Make every ``TCPStore`` server created in this process listen on ``bind_addr`` only."""
    base = dist.TCPStore
    if getattr(base, "_disttrain_bind", None) is not None:
        return

    class BoundTCPStore(base):  # type: ignore[misc, valid-type]
        _disttrain_bind = bind_addr

        def __init__(self, host_name: str, port: int = 0, *args: Any, **kwargs: Any) -> None:
            names = ("world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant", "master_listen_fd")
            kwargs.update(zip(names, args))
            if kwargs.get("is_master") and kwargs.get("master_listen_fd") is None:
                sock = bound_listen_socket(bind_addr, int(port or 0))
                port = sock.getsockname()[1]
                kwargs["master_listen_fd"] = sock.detach()  # the store owns the descriptor now
            super().__init__(host_name, port, **kwargs)

    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend as c10d_backend
    import torch.distributed.elastic.rendezvous.static_tcp_rendezvous as static_backend

    dist.TCPStore = BoundTCPStore  # type: ignore[misc]
    for module in (c10d_backend, static_backend):
        if getattr(module, "TCPStore", None) is base:
            module.TCPStore = BoundTCPStore


def bind_address(argv: Sequence[str]) -> str | None:
    """The address to bind to for these torchrun arguments (see the module docstring)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    return "127.0.0.1" if "--standalone" in argv else None


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    addr = bind_address(argv)
    if addr:
        install(addr)
        if "--standalone" in argv and not any(a.startswith("--local-addr") for a in argv):
            # the address the agent advertises to the workers (MASTER_ADDR): the bound one
            argv = [f"--local-addr={addr}", *argv]
    from torch.distributed.run import main as torchrun_main

    torchrun_main(argv)


if __name__ == "__main__":
    main()
