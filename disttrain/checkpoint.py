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
import tempfile
from pathlib import Path
from typing import Any

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
            log.warning("skipping checkpoint %s: it does not load (%s: %s)", path, type(exc).__name__, exc)
    return None


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

