"""Test-only fault injection: make one rank fail at a chosen step, to prove that failures end
the job cleanly and that a restarted job resumes exactly.

Set ``DISTTRAIN_FAULT`` to one or more comma-separated ``KIND@RANK:STEP`` specs:

* ``kill@1:7``   rank 1 SIGKILLs itself right after optimizer step 7 (a crashed node)
* ``raise@1:5``  rank 1 raises RuntimeError right after step 5 (a bug in the step)
* ``data@1:3``   rank 1 raises while loading the batches of step 3 (a bad sample / IO error)
* ``save@0:4``   rank 0 raises while saving the checkpoint of step 4 (a full disk)
* ``sleep@1:3`` rank 1 sleeps ``DISTTRAIN_FAULT_SLEEP_S`` seconds (default 30) right after step 3,
  before the collectives of the log step: a hang that ends (the watchdog's test)
* ``term@0:5``   rank 0 sends SIGTERM to its parent (the torchrun agent) right after step 5, as a
  scheduler stopping the job would (the agent forwards it to every worker)

A fault fires only on the first attempt of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` 0 or
unset), so a job launched with ``--max-restarts`` recovers on the next attempt. Unset, this module
does nothing (one environment lookup per call).
"""

from __future__ import annotations

import os
import signal
import time

ENV = "DISTTRAIN_FAULT"
_POINTS = {"sleep": "step", "kill": "step", "raise": "step", "data": "data", "save": "save", "term": "step"}


class InjectedFault(RuntimeError):
    """The exception an injected ``raise``/``data``/``save`` fault raises."""


def _specs() -> list[tuple[str, int, int]]:
    raw = os.environ.get(ENV, "").strip()
    out = []
    for spec in filter(None, (s.strip() for s in raw.split(","))):
        try:
            kind, where = spec.split("@")
            rank, step = where.split(":")
            if kind not in _POINTS:
                raise ValueError(kind)
            out.append((kind, int(rank), int(step)))
        except ValueError:
            raise ValueError(
                f"{ENV}={raw!r}: expected comma-separated KIND@RANK:STEP with KIND one of {sorted(_POINTS)}"
            ) from None
    return out


def inject(point: str, rank: int, step: int) -> None:
    """Fire the faults configured for ``point`` (``step``, ``data`` or ``save``) on ``rank`` at ``step``."""
    if ENV not in os.environ or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) != 0:
        return
    for kind, r, s in _specs():
        if _POINTS[kind] != point or r != rank or s != step:
            continue
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "sleep":
            time.sleep(float(os.environ.get("DISTTRAIN_FAULT_SLEEP_S", "30")))
            return
        if kind == "term":
            os.kill(os.getppid(), signal.SIGTERM)
            return
        raise InjectedFault(f"injected fault {kind}@{rank}:{step} ({ENV}) on rank {rank} at step {step}")
