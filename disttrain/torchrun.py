"""``python -m disttrain.torchrun ...``: torchrun (same arguments), but every TCP store it serves
listens on one configured address instead of all interfaces.

torch's ``TCPStore`` server binds to ``[::]`` (every interface) whatever host it is given, and
torch.distributed has no authentication: anyone who can reach the rendezvous port can join or
disturb the job. Here each store server is handed a socket already bound to one address: ``DISTTRAIN_BIND_ADDR``
if set; else loopback (``127.0.0.1``) when the job is on this machine alone (``--standalone``, or
a rendezvous endpoint on loopback); else this node's address on the network that reaches the
rendezvous host (the interface the other nodes use, found from the routing table). See
docs/reliability.md.

The workers inherit the address (``DISTTRAIN_BIND_ADDR``): their gloo and NCCL sockets and a
Horovod rendezvous listen there too (``disttrain.env.listen_address``); with the agent's store
shared (``TORCHELASTIC_USE_AGENT_STORE``) they serve no store of their own.
"""

from __future__ import annotations

import os
import signal
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
    base = dist.TCPStore  # type: ignore[attr-defined]
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
            module.TCPStore = BoundTCPStore  # type: ignore[attr-defined]


def bind_address(argv: Sequence[str]) -> str | None:
    """The address to bind to for these torchrun arguments (see the module docstring): the
    configured one, else loopback for a job on this machine alone (``--standalone``, or a
    rendezvous endpoint on loopback), else None (torch's default, every interface)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    if "--standalone" in argv:
        return "127.0.0.1"
    endpoint = _option(argv, "--rdzv-endpoint", "--rdzv_endpoint") or os.environ.get("PET_RDZV_ENDPOINT")
    host = endpoint.rsplit(":", 1)[0].strip("[]") if endpoint else _option(argv, "--master-addr", "--master_addr")
    host = host or os.environ.get("PET_MASTER_ADDR")
    if not host:
        return None
    if _is_loopback(host):
        return "127.0.0.1"
    return route_address(host)


def route_address(host: str) -> str | None:
    """This machine's address on the network that reaches ``host`` (the rendezvous): the one
    interface the other nodes can use, rather than all of them. None if it cannot be found."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP: picks the route, sends nothing
            return probe.getsockname()[0]
    except OSError:
        return None


def _option(argv: Sequence[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
    return None


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    addr = bind_address(argv)
    if addr:
        install(addr)
        os.environ.setdefault(ENV, addr)  # the workers' listeners (gloo, NCCL, Horovod) bind there too
        if not any(a.startswith(("--local-addr", "--local_addr")) for a in argv):
            # the address the agent advertises to the workers (MASTER_ADDR): the bound one
            argv = [f"--local-addr={addr}", *argv]
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except SignalException as exc:
        # torchrun passed the signal on to the workers and waited for them (--shutdown-timeout):
        # they finished their step and checkpointed (trainer.save_on_preempt); end quietly, with
        # the shell's code for death by that signal
        name = signal.Signals(exc.sigval).name
        print(f"disttrain.torchrun: stopped by {name}; the workers were asked to checkpoint and stop "
              f"(resume with trainer.resume=auto)", file=sys.stderr, flush=True)
        sys.exit(128 + int(exc.sigval))


if __name__ == "__main__":
    main()
