"""Checkpoint files: written atomically, found through a pointer advanced last, loaded safely.

Layout of a checkpoint directory::

    ckpt/step_00000100.pt   complete checkpoints (written to a temp file, fsynced, renamed)
    ckpt/latest             text file naming the newest complete checkpoint (replaced atomically)

A crash at any moment leaves either the old pointer and old files, or the new ones: never a
pointer to a partial file. Loading uses ``torch.load(weights_only=True)``, which refuses pickles
that would run code.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

POINTER = "latest"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save(state: dict[str, Any], directory: Path, name: str, keep_last: int | None = None) -> Path:
    """Write ``state`` as ``directory/name`` atomically, then advance the ``latest`` pointer.
    With ``keep_last``, older complete checkpoints beyond that many are deleted afterwards."""
    directory = Path(directory)
    buf = io.BytesIO()
    torch.save(state, buf)
    _remove_stale_temp_files(directory)
    path = directory / name
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_bytes(directory / POINTER, name.encode())
    if keep_last:
        for old in list_checkpoints(directory)[:-keep_last]:
            with contextlib.suppress(OSError):
                old.unlink()
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors, numbers, strings and containers
    only. A file that needs arbitrary unpickling is refused before any of it runs."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def describe_load_error(exc: BaseException) -> str:
    """One line saying why a checkpoint did not load (torch's own message for a refused
    pickle suggests ``weights_only=False``, which is exactly what must not be done with it)."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return (
            "refused by weights_only loading: unpickling it would import or call code, which a "
            "disttrain checkpoint never needs; the file may be malicious, do not load it with weights_only=False"
        )
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint files in ``directory``, oldest first (temp files excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.pt") if not p.name.startswith("."))


def find_latest(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads, with its state. The pointer's target
    is tried first; a partial or corrupt file is skipped with a warning, never returned."""
    directory = Path(directory)
    candidates = list(reversed(list_checkpoints(directory)))
    pointer = directory / POINTER
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for path in candidates:
        try:
            return path, load(path)
        except Exception as exc:  # corrupt, truncated, or refused by weights_only
            log.warning("skipping checkpoint %s: it does not load (%s)", path, describe_load_error(exc))
    return None


# ---------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """This process's random states (Python, NumPy, torch CPU and CUDA) in a form that
    ``weights_only`` loading accepts: tensors, ints, floats, tuples and lists only."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": (py[0], list(py[1]), py[2]),
        "numpy": (str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo ``capture_rng``: set this process's random states to ``state``."""
    if state.get("python") is not None:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if state.get("numpy") is not None:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _remove_stale_temp_files(directory: Path) -> None:
    """Temp files left by a writer that crashed mid-save (only one rank writes at a time)."""
    if directory.is_dir():
        for tmp in directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

