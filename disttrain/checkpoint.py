"""Checkpoint files: written atomically, found through a pointer advanced last, loaded safely.

Layout of a checkpoint directory::

    ckpt/step_00000100.pt       complete checkpoints (written to a temp file, fsynced, renamed)
    ckpt/step_00000100.shards/  for strategies that shard their state (FSDP, pipeline stages,
                                ZeRO): every rank's shard, written before the .pt file, which is
                                then a small manifest and the checkpoint's completion marker
    ckpt/latest                 text file naming the newest complete checkpoint (replaced atomically)
    ckpt/index.json             which run lineage wrote which checkpoint, in writing order
                                (kept by rotating saves: ``keep_last``)

A crash at any moment leaves either the old pointer and old files, or the new ones: never a
pointer to a partial file. Loading uses ``torch.load(weights_only=True)``, which refuses pickles
that would run code; sharded checkpoints are read through ``torch.distributed.checkpoint`` with
its two pickle paths (the ``.metadata`` file and non-tensor values) restricted the same way.

Rotation (``keep_last``) deletes only checkpoints of the writer's own *lineage* (a run and the
runs resumed from it), oldest written first, and never the one ``latest`` names: a directory that
also holds another run's files keeps them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

POINTER = "latest"
INDEX = "index.json"
SHARDS_SUFFIX = ".shards"


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


def shards_dir(path: Path) -> Path:
    """Where the shards of checkpoint ``path`` live: ``step_N.pt`` -> ``step_N.shards/``."""
    path = Path(path)
    return path.with_name(path.stem + SHARDS_SUFFIX)


def save(
    state: dict[str, Any], directory: Path, name: str, keep_last: int | None = None, lineage: str | None = None
) -> Path:
    """Write ``state`` as ``directory/name`` atomically, then advance the ``latest`` pointer and
    record ``name`` under ``lineage`` in the index. With ``keep_last``, the lineage's older
    checkpoints beyond that many (by writing order) are deleted afterwards, shards included."""
    directory = Path(directory)
    buf = io.BytesIO()
    torch.save(state, buf)
    _remove_stale_temp_files(directory)
    path = directory / name
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_bytes(directory / POINTER, name.encode())
    if keep_last:
        rotate(directory, name, keep_last, lineage or "")
    return path


def rotate(directory: Path, name: str, keep_last: int, lineage: str) -> None:
    """Record ``name`` in the index under ``lineage``, then delete that lineage's checkpoints
    beyond the newest ``keep_last`` written. Files the index does not list (written without
    rotation, or by another tool) and other lineages' files are never touched."""
    entries = [e for e in read_index(directory) if e["name"] != name and (directory / e["name"]).exists()]
    entries.append({"name": name, "lineage": lineage, "time": time.time()})
    mine = [e for e in entries if e.get("lineage") == lineage]
    for old in mine[:-keep_last]:
        remove_checkpoint(directory / old["name"])
        entries.remove(old)
    atomic_write_bytes(directory / INDEX, json.dumps(entries, indent=1).encode())


def read_index(directory: Path) -> list[dict[str, Any]]:
    """The index's entries (oldest written first); ``[]`` if there is none or it is unreadable."""
    try:
        entries = json.loads((Path(directory) / INDEX).read_text())
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)]
    except (OSError, ValueError):
        return []


def remove_checkpoint(path: Path) -> None:
    """Delete checkpoint ``path`` and its shards, unless ``latest`` names it."""
    path = Path(path)
    pointer = path.parent / POINTER
    with contextlib.suppress(OSError):
        if pointer.read_text().strip() == path.name:
            return
    with contextlib.suppress(OSError):
        path.unlink()
    shutil.rmtree(shards_dir(path), ignore_errors=True)


def load(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors, numbers, strings and containers
    only. A file that needs arbitrary unpickling is refused before any of it runs."""
    try:
        return torch.load(Path(path), map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's own message advises retrying with weights_only=False: exactly what must not be done
        raise pickle.UnpicklingError(f"{path}: {describe_load_error(exc)}") from None


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


# ---------------------------------------------------------------------- sharded state (DCP)
def save_sharded(state: dict[str, Any], directory: Path) -> None:
    """Every rank writes its part of ``state`` (tensors, DTensors, plain values) into
    ``directory`` with ``torch.distributed.checkpoint``: no rank gathers another's shard.
    Collective over the default group. A partial directory of an earlier crashed save under the
    same name is cleared first. The caller writes the manifest (the completion marker) after."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
    if distributed:
        dist.barrier()
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=not distributed)
    except CheckpointException as exc:  # a BaseException: turn it into an ordinary error
        raise RuntimeError(f"{directory}: writing the sharded checkpoint failed: {str(exc)[-500:]}") from None


def load_sharded(state: dict[str, Any], directory: Path) -> None:
    """Load ``directory`` (written by ``save_sharded``, at any world size) into ``state`` in
    place: each rank reads the parts its tensors' placements need (resharding as DCP does).
    Refuses code: the metadata file is unpickled with an allow-list of DCP's own classes, and
    non-tensor values load with ``weights_only=True`` (torch's default planner allows any pickle)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    sharded_metadata(directory)  # a clear error before DCP's collective plan
    distributed = dist.is_available() and dist.is_initialized()
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=_SafeReader(str(directory)), planner=_safe_planner(), no_dist=not distributed)
    except CheckpointException as exc:  # a BaseException: callers' `except Exception` would miss it
        if "Unsupported global" in str(exc) or "UnpicklingError" in str(exc):
            raise pickle.UnpicklingError(f"{directory}: {describe_load_error(pickle.UnpicklingError())}") from None
        raise RuntimeError(f"{directory}: the sharded checkpoint does not load: {str(exc)[-500:]}") from None


def sharded_metadata(directory: Path) -> Any:
    """DCP's metadata of a ``save_sharded`` directory (each value's name, size, dtype and where
    its shards lie), unpickled with an allow-list of DCP's own classes."""
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"{directory} holds no sharded checkpoint (no .metadata file)")
    with open(directory / ".metadata", "rb") as f:
        return _RestrictedUnpickler(f).load()


def write_full(path: Path, model_state: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    """Write a whole model for inference or another strategy, atomically: one file
    ``{"model": state_dict on the CPU, "extra": extra}``, loadable with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save({"model": {k: v.detach().cpu() for k, v in model_state.items()}, "extra": extra}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata: its own dataclasses, torch sizes/dtypes/layouts, paths."""

    _MODULES = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}
    _NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
              ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"), ("builtins", "set"),
              ("builtins", "frozenset"), ("builtins", "slice")}

    def find_class(self, module: str, name: str) -> Any:
        ok = (module in self._MODULES and not name.startswith("__")) or (module, name) in self._NAMES
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            ok = True
        if not ok:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name} from a checkpoint's metadata: a sharded disttrain checkpoint "
                f"never needs it; the file may be malicious"
            )
        return super().find_class(module, name)


def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _RestrictedUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _SafeReader(path: str) -> Any:
    return _safe_reader_class()(path)


def _safe_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


# ---------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """This process's random states (Python, NumPy, torch CPU and CUDA) in a form that
    ``weights_only`` loading accepts: tensors, ints, floats, tuples and lists only."""
    py: Any = random.getstate()
    np_state: Any = np.random.get_state()
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

