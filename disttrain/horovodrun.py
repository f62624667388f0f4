"""``horovodrun -np N --gloo python -m disttrain.horovodrun <overrides>``: the Hydra app under
Horovod's own launcher (``torchrun -m disttrain strategy=horovod`` needs none of this)."""

from __future__ import annotations

import os


def main() -> None:
    """``horovodrun -np N --gloo python -m disttrain.horovodrun <overrides>``: map
    Horovod's launcher variables to the ones disttrain reads, then run the usual CLI."""
    e = os.environ
    if "HOROVOD_RANK" in e and "RANK" not in e:
        e["RANK"], e["WORLD_SIZE"] = e["HOROVOD_RANK"], e["HOROVOD_SIZE"]
        e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"] = e.get("HOROVOD_LOCAL_RANK", "0"), e.get("HOROVOD_LOCAL_SIZE", "1")
        e["GROUP_RANK"] = e.get("HOROVOD_CROSS_RANK", "0")
        e["MASTER_ADDR"] = e.get("HOROVOD_GLOO_RENDEZVOUS_ADDR", "127.0.0.1")
    e.setdefault("OMP_NUM_THREADS", "1")  # horovodrun does not set one thread per process
    from disttrain.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
