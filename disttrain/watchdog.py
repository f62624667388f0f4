"""Hangs explained: a watchdog thread per rank that notices a step or a collective taking longer
than ``trainer.hang_timeout_s`` (well below the process group's timeout), has every rank dump its
Python stacks and its last collectives to ``<run_dir>/hang/``, and names the rank that did not
arrive at which collective.

The collectives are torch's own flight recorder (``TORCH_FR_BUFFER_SIZE``; on gloo as on NCCL):
every collective any code issues on a process group, DDP's gradient buckets included, with its
process group, sequence number, op, sizes and dtypes, and whether it completed. The ranks talk
through the job's key-value store, never through a collective (the process group is the thing
that is stuck): the first rank to notice sets a flag; every rank's watchdog sees it within a
poll, dumps, and posts a short account (its step, the last collectives it enqueued per process
group, the innermost frames of its main thread); the first rank that noticed gathers the
accounts and prints the diagnosis, e.g. ``rank 1 did not arrive at collective #12 of process
group 0 (gloo:all_reduce, sizes [[1]]) that ranks [0] entered``. It reports once per run and
changes nothing: the job then goes on, or ends on the process group's timeout as before.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("disttrain")

FR_ENV = "TORCH_FR_BUFFER_SIZE"
HISTORY = 64  # collectives kept per rank by the flight recorder unless TORCH_FR_BUFFER_SIZE says otherwise


def enable_flight_recorder(entries: int = HISTORY) -> None:
    """Keep torch's record of the last ``entries`` collectives; must run before the process group
    is created. A value the user set in the environment wins (0 turns the record off)."""
    os.environ.setdefault(FR_ENV, str(entries))


def hang_key(env: Any) -> str:
    """This run's (and this restart's) namespace in the job's store."""
    return f"disttrain/hang/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{env.restart_count}"


def recorded_collectives() -> dict[str, Any]:
    """This process's flight-recorder dump (entries without stack traces, per-group status);
    empty when the recorder is off or torch lacks it."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace  # type: ignore[attr-defined]

        return pickle.loads(_dump_fr_trace(includeCollectives=True, includeStackTraces=False))
    except Exception:  # no process group, recorder off, a torch without it: nothing recorded
        return {}


def summarise(entry: dict[str, Any]) -> dict[str, Any]:
    """One flight-recorder entry as the fields a person reads."""
    return {
        "pg": str(entry.get("process_group", ("?",))[0]),
        "seq": int(entry.get("collective_seq_id", -1)),
        "op": str(entry.get("profiling_name", "?")),
        "sizes": entry.get("input_sizes"),
        "dtypes": entry.get("input_dtypes"),
        "completed": bool(entry.get("retired")),
        "age_s": max(time.time() - entry.get("time_created_ns", 0) / 1e9, 0.0),
        "p2p": bool(entry.get("is_p2p")),
    }


def python_stacks() -> str:
    """Every thread's Python stack, innermost last (as a traceback reads)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"--- thread {names.get(ident, ident)} ---\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


def main_frames(depth: int = 4) -> list[str]:
    """The innermost ``depth`` frames of the main thread, one line each."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    if frame is None:
        return []
    return [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_stack(frame)[-depth:]]


def diagnose(accounts: dict[int, dict[str, Any]], world_size: int) -> str:
    """Which rank did not arrive at which collective, from every rank's account (a rank missing
    from ``accounts`` did not answer)."""
    lines = []
    groups: dict[str, dict[int, int]] = {}
    for rank, acc in accounts.items():
        for pg, last in acc.get("last_enqueued", {}).items():
            groups.setdefault(pg, {})[rank] = int(last)
    for pg, last in sorted(groups.items()):
        top = max(last.values())
        behind = sorted(r for r, s in last.items() if s < top)
        if not behind:
            continue
        ahead = sorted(r for r, s in last.items() if s == top)
        for rank in behind:
            missing = last[rank] + 1
            entry = _entry(accounts[ahead[0]], pg, missing) or {}
            what = f"{entry.get('op', 'a collective')}, sizes {entry.get('sizes')}" if entry else "a collective"
            lines.append(
                f"rank {rank} did not arrive at collective #{missing} of process group {pg} ({what}) that ranks "
                f"{ahead} entered{_where(accounts[rank])}"
            )
    silent = [r for r in range(world_size) if r not in accounts]
    if silent:
        lines.append(f"ranks {silent} did not answer (blocked outside Python, or dead): they are the likely culprits")
    if not lines:
        pending = [
            f"rank {r}: #{e['seq']} {e['op']} on group {e['pg']} open for {e['age_s']:.0f}s"
            for r, acc in sorted(accounts.items()) for e in acc.get("collectives", []) if not e["completed"]
        ]
        if pending:
            lines.append("every rank entered the same collectives, which did not complete: " + "; ".join(pending))
        else:
            slow = ", ".join(f"rank {r} in step {a.get('step')}{_where(a)}" for r, a in sorted(accounts.items()))
            lines.append(f"no collective is pending; a step is taking too long: {slow}")
    return "\n".join(lines)


def _entry(account: dict[str, Any], pg: str, seq: int) -> dict[str, Any] | None:
    return next((e for e in account.get("collectives", []) if e["pg"] == pg and e["seq"] == seq), None)


def _where(account: dict[str, Any]) -> str:
    frames = account.get("frames") or []
    step = account.get("step")
    parts = ([f"last step {step}"] if step is not None else []) + ([f"now at {frames[-1]}"] if frames else [])
    return f" ({', '.join(parts)})" if parts else ""


class Watchdog:
    """The per-rank watchdog. ``beat(step)`` at the start of every step; ``idle()`` outside the
    loop (collectives are still watched). ``store``: the job's key-value store (None for one
    process: the rank then only dumps its own stacks). Inert when ``timeout_s`` is None."""

    def __init__(
        self, timeout_s: float | None, rank: int, world_size: int, out_dir: Path | None, store: Any = None,
        key: str = "disttrain/hang", poll_s: float = 0.5,
    ) -> None:
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.out_dir, self.store, self.key, self.poll_s = out_dir, store, key, poll_s
        self.step: int | None = None
        self._since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.report: str | None = None  # the diagnosis, on the rank that wrote it
        self.dumped = False

    def start(self) -> "Watchdog":
        if self.timeout_s is not None and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="disttrain-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * self.poll_s)
            self._thread = None

    def beat(self, step: int) -> None:
        """A step starts: it must end (``idle``) within the timeout."""
        self.step, self._since = step, time.monotonic()

    def idle(self) -> None:
        """Between steps: only collectives are watched (the last step is still reported)."""
        self._since = None

    # ------------------------------------------------------------------ the thread
    def _watch(self) -> None:
        assert self.timeout_s is not None
        while not self._stop.wait(self.poll_s):
            try:
                reason = self._overdue(self.timeout_s)
                flagged = self.store is not None and self.store.check([f"{self.key}/flag"])
                if reason is None and not flagged:
                    continue
                first = reason is not None and self._claim(reason)
                self._dump()
                if first:
                    self._report()
            except Exception as exc:  # the watchdog reports; it must never take the rank down
                log.warning("rank %d: hang watchdog failed: %s: %s", self.rank, type(exc).__name__, exc)
            return

    def _overdue(self, timeout_s: float) -> str | None:
        if self._since is not None and time.monotonic() - self._since > timeout_s:
            return f"step {self.step} has run for more than {timeout_s:g}s"
        for e in recorded_collectives().get("entries", []):
            s = summarise(e)
            if not s["completed"] and not s["p2p"] and s["age_s"] > timeout_s:
                return f"collective #{s['seq']} {s['op']} on group {s['pg']} has waited {s['age_s']:.0f}s"
        return None

    def _claim(self, reason: str) -> bool:
        """Raise the flag; True for the first rank to do so (it writes the diagnosis)."""
        log.warning("rank %d: %s (trainer.hang_timeout_s=%g): dumping stacks and collectives", self.rank, reason,
                    self.timeout_s)
        if self.store is None:
            return True
        first = self.store.add(f"{self.key}/claim", 1) == 1
        self.store.set(f"{self.key}/flag", json.dumps({"rank": self.rank, "reason": reason}))
        return first

    def account(self) -> dict[str, Any]:
        """What this rank tells the others: its step, its last collectives, where it is."""
        fr = recorded_collectives()
        return {
            "rank": self.rank,
            "step": self.step,
            "last_enqueued": {pg: st.get("last_enqueued_collective", -1) for pg, st in fr.get("pg_status", {}).items()},
            "collectives": [summarise(e) for e in fr.get("entries", [])][-8:],
            "frames": main_frames(),
        }

    def _dump(self) -> None:
        self.dumped = True
        acc = self.account()
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fr = recorded_collectives()
            (self.out_dir / f"rank{self.rank}_stacks.txt").write_text(python_stacks())
            (self.out_dir / f"rank{self.rank}_collectives.json").write_text(
                json.dumps([summarise(e) for e in fr.get("entries", [])], indent=1, default=str) + "\n"
            )
        if self.store is not None:
            self.store.set(f"{self.key}/account/{self.rank}", json.dumps(acc, default=str))

    def _report(self, wait_s: float = 10.0) -> None:
        accounts: dict[int, dict[str, Any]] = {self.rank: self.account()}
        if self.store is not None:
            keys = {r: f"{self.key}/account/{r}" for r in range(self.world_size)}
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and not self.store.check(list(keys.values())):
                time.sleep(self.poll_s / 5)
            for r, k in keys.items():
                if self.store.check([k]):
                    accounts[r] = json.loads(self.store.get(k))
        self.report = diagnose(accounts, self.world_size)
        log.error("hang diagnosis (stacks and collectives of every rank in %s):\n%s", self.out_dir, self.report)
        if self.out_dir is not None:
            (self.out_dir / "diagnosis.txt").write_text(self.report + "\n")


def hung_ranks(report: str) -> Sequence[int]:
    """The ranks a diagnosis names as not arriving (for tools and tests that read it)."""
    import re

    return sorted({int(m) for m in re.findall(r"rank (\d+) did not arrive", report)})
