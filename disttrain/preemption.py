"""Stop cleanly when the scheduler says so: SIGTERM (torchrun forwards it to every worker when it
is itself stopped: Kubernetes, ``scancel``, Ctrl-C on the agent) or SIGUSR1 (SLURM's
``--signal=USR1@90`` warning before the time limit or a preemption).

A signal only sets a flag. After each optimizer step the Trainer asks ``should_stop(step)``;
the ranks agree, through the job's key-value store (no collective, so asynchronous workers are
not forced into lockstep), on one step at which every training rank stops: one past the highest
step at which any rank saw the request. Every rank finishes the step it is in, the job writes a
checkpoint, and the process exits with ``EXIT_PREEMPTED`` (75, "try again later"), which the
SLURM recipe turns into a requeue; ``trainer.resume=auto`` then continues exactly.

Why one past the highest: ranks in lockstep (DDP) see each other's posts before the next step's
collective completes, so by that step every rank has learned the stop step and none has passed it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Sequence

log = logging.getLogger("disttrain")

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after writing its checkpoint; exit with EXIT_PREEMPTED."""

    def __init__(self, step: int, signal_name: str, checkpoint: str | None) -> None:
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no run directory)"
        super().__init__(
            f"stopped on {signal_name} after step {step}; {where} written: run again with trainer.resume=auto to "
            f"continue exactly"
        )


class StopRequest:
    """Signal handlers plus the agreement on a stop step. ``store`` is the job's key-value store
    (torchrun's agent store, or the process group's), ``ranks`` the training ranks; with no store
    (one process) the step a signal arrives at is the stop step."""

    def __init__(self, store: Any, rank: int, ranks: Sequence[int], key: str, wait_s: float = 60.0) -> None:
        self.store, self.rank, self.ranks = store, rank, list(ranks)
        self.key, self.wait_s = key, wait_s
        self.received: int | None = None  # the signal number, once one arrived
        self.stop_at: int | None = None
        self._posted = False
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ signals
    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handler(self, signum: int, _frame: Any) -> None:
        self.received = self.received or signum

    def request(self, signum: int = signal.SIGTERM) -> None:
        """What a signal does (for callers that learn of a stop otherwise)."""
        self.received = self.received or signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "request"

    # ------------------------------------------------------------------ agreement
    def should_stop(self, step: int) -> bool:
        """Whether this rank stops after ``step`` (called after every optimizer step)."""
        if self.stop_at is not None:
            return step >= self.stop_at
        if self.store is None:
            if self.received:
                self.stop_at = step
            return self.stop_at is not None
        flag = f"{self.key}/flag"
        if self.received and not self._posted:
            self.store.set(flag, "1")
        elif not self._posted and not self.store.check([flag]):
            return False
        if not self._posted:
            if not self.received:
                self.received = signal.SIGTERM  # another rank's request
            self.store.set(f"{self.key}/step/{self.rank}", str(step))
            self._posted = True
            log.warning("rank %d: %s received, stopping at a step every rank agrees on", self.rank, self.signal_name)
        keys = [f"{self.key}/step/{r}" for r in self.ranks]
        if not self.store.check(keys):
            return False  # keep training until every rank has posted (none waits in a collective)
        self.stop_at = max(int(self.store.get(k)) for k in keys) + 1
        return step >= self.stop_at


def job_store() -> Any:
    """The store every rank of this job shares: torchrun's agent store, else the default process
    group's; None for one process."""
    from disttrain.env import agent_store

    store = agent_store(timeout_s=30.0)
    if store is not None:
        return store
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    return None


def stop_key(restart_count: int) -> str:
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    return f"disttrain/stop/{run}/{restart_count}"
