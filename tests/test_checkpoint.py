"""Checkpoint files: a crash at any moment of a save leaves a loadable previous checkpoint and a
pointer that never names a partial file; a crafted pickle is refused without running it."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from disttrain import checkpoint as ckpt
from tests.distributed import ROOT

# A real process that saves one checkpoint, then is SIGKILLed in the middle of saving the
# second one: after the temp file is written but before its rename, or after the rename but
# before the pointer moves.
_CRASH = textwrap.dedent(
    """
    import os, signal, sys, torch
    from disttrain import checkpoint as ckpt
    directory, when = sys.argv[1], sys.argv[2]
    ckpt.save({"step": 1, "w": torch.arange(4.0)}, directory, "step_00000001.pt")
    real_replace = os.replace
    def replace(src, dst):
        name = os.path.basename(dst)
        if (when == "before_rename" and name == "step_00000002.pt") or (when == "before_pointer" and name == "latest"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    os.replace = replace
    ckpt.save({"step": 2, "w": torch.arange(4.0) * 2}, directory, "step_00000002.pt")
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["before_rename", "before_pointer"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path, when: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, str(tmp_path), when], cwd=ROOT, capture_output=True, text=True, timeout=50,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -9, proc.stderr  # it really died mid-save
    pointer = (tmp_path / ckpt.POINTER).read_text().strip()
    assert pointer == "step_00000001.pt"  # the pointer only ever names a complete file
    assert ckpt.load(tmp_path / pointer)["step"] == 1
    path, state = ckpt.find_latest(tmp_path)
    assert path.name == pointer and torch.equal(state["w"], torch.arange(4.0))
    if when == "before_rename":  # the partial file is a hidden temp file, never a candidate
        assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001.pt"]
        assert list(tmp_path.glob(".*.tmp"))
    # the next save cleans the crashed writer's temp file up and advances the pointer
    ckpt.save({"step": 3}, tmp_path, "step_00000003.pt")
    assert not list(tmp_path.glob(".*.tmp"))
    assert ckpt.find_latest(tmp_path)[1]["step"] == 3


@pytest.mark.timeout(30)
def test_corrupt_newest_checkpoint_is_skipped_with_warning(tmp_path: Path, caplog) -> None:
    ckpt.save({"step": 1}, tmp_path, "step_00000001.pt")
    good = (tmp_path / "step_00000001.pt").read_bytes()
    (tmp_path / "step_00000002.pt").write_bytes(good[: len(good) // 2])  # truncated, e.g. copied half
    (tmp_path / ckpt.POINTER).write_text("step_00000002.pt")  # even if something pointed at it
    with caplog.at_level(logging.WARNING):
        path, state = ckpt.find_latest(tmp_path)
    assert path.name == "step_00000001.pt" and state["step"] == 1
    assert "step_00000002.pt" in caplog.text and "does not load" in caplog.text


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_malicious_checkpoint_is_refused_without_running(tmp_path: Path, container: str, caplog) -> None:
    marker = tmp_path / "pwned"
    ckpt.save({"step": 1, "w": torch.ones(2)}, tmp_path, "step_00000001.pt")
    evil = tmp_path / "step_00000002.pt"
    state = {"step": 2, "model": {"w": torch.zeros(2)}, "extra": _Payload(str(marker))}
    if container == "torch_zip":
        torch.save(state, evil)
    else:
        evil.write_bytes(pickle.dumps(state))
    (tmp_path / ckpt.POINTER).write_text(evil.name)  # as if it had been saved last
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load(evil)
    assert not marker.exists()
    # resume=auto skips it (with a warning) and takes the newest checkpoint that loads safely
    with caplog.at_level(logging.WARNING):
        path, state = ckpt.find_latest(tmp_path)
    assert path.name == "step_00000001.pt" and not marker.exists()
    assert "step_00000002.pt" in caplog.text


@pytest.mark.timeout(60)
def test_trainer_refuses_malicious_resume_path(tmp_path: Path) -> None:
    """An explicit ``trainer.resume=<file>`` naming a crafted file fails with a ConfigError that
    names it and the fix; the payload never runs."""
    from disttrain.data import synthetic_regression
    from disttrain.errors import ConfigError
    from disttrain.session import Session
    from disttrain.trainer import Trainer, TrainerConfig

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"extra": _Payload(str(marker))}, evil)
    with Session("single") as s:
        model = torch.nn.Linear(8, 1)
        trainer = Trainer(
            s, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(),
            synthetic_regression(64)[0], batch_size=16, config=TrainerConfig(max_epochs=1, resume=str(evil)),
        )
        with pytest.raises(ConfigError, match=r"(?s)evil\.pt.*refused by weights_only"):
            trainer.fit()
    assert not marker.exists()


# ------------------------------------------------------------------------ rotation and lineage
def test_rotation_keeps_this_runs_new_checkpoints_and_never_another_runs(tmp_path: Path) -> None:
    """The reported data loss: a directory already holding a higher-numbered checkpoint of an
    earlier run made every new save be deleted at once (rotation sorted by file name)."""
    ckpt.save({"step": 550}, tmp_path, "step_00000550.pt", keep_last=3, lineage="earlier-run")
    for step in range(1, 5):
        ckpt.save({"step": step}, tmp_path, f"step_{step:08d}.pt", keep_last=2, lineage="this-run")
        assert (tmp_path / f"step_{step:08d}.pt").is_file()  # the file just written is never deleted
        assert (tmp_path / ckpt.POINTER).read_text() == f"step_{step:08d}.pt"
    names = sorted(p.name for p in ckpt.list_checkpoints(tmp_path))
    assert names == ["step_00000003.pt", "step_00000004.pt", "step_00000550.pt"]


def test_rotation_removes_shards_and_spares_the_pointer_target(tmp_path: Path) -> None:
    for step in (1, 2):
        ckpt.shards_dir(tmp_path / f"step_{step:08d}.pt").mkdir(parents=True)
        ckpt.save({"sharded": True}, tmp_path, f"step_{step:08d}.pt", keep_last=1, lineage="run")
    assert not ckpt.shards_dir(tmp_path / "step_00000001.pt").exists()
    assert ckpt.shards_dir(tmp_path / "step_00000002.pt").is_dir()
    ckpt.remove_checkpoint(tmp_path / "step_00000002.pt")  # what `latest` names is never removed
    assert (tmp_path / "step_00000002.pt").is_file()


def _tiny_trainer(session, run_dir: Path, resume: str | None):
    from disttrain.data import synthetic_regression
    from disttrain.trainer import Trainer, TrainerConfig

    model = torch.nn.Linear(8, 1)
    return Trainer(
        session, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(),
        synthetic_regression(64)[0], batch_size=16, run_dir=run_dir,
        config=TrainerConfig(max_epochs=1, resume=resume, progress_bar=False),
    )


@pytest.mark.timeout(60)
def test_resume_auto_with_nothing_loadable_refuses_instead_of_starting_over(tmp_path: Path) -> None:
    """A directory whose every checkpoint fails to load is not silently reused by a fresh run
    (whose saves would mix with the old files and which a later resume=auto could pick)."""
    from disttrain.errors import ConfigError
    from disttrain.session import Session

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000550.pt").write_bytes(b"truncated")
    with Session("single") as s:
        trainer = _tiny_trainer(s, tmp_path, "auto")
        with pytest.raises(ConfigError, match=r"no checkpoint in .* loads \(1 found: \['step_00000550.pt'\]"):
            trainer.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000550.pt"]  # nothing written


@pytest.mark.timeout(60)
def test_plug_in_load_of_a_crafted_file_names_the_danger(tmp_path: Path) -> None:
    """``ds.load(evil.pt)`` refuses it and does not repeat torch's advice to retry with
    ``weights_only=False`` (the one thing never to do with that file)."""
    import disttrain

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "extra": _Payload(str(marker))}, evil)
    with disttrain.setup(strategy="single") as ds:
        model = torch.nn.Linear(2, 2)
        ds.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        with pytest.raises(pickle.UnpicklingError) as info:
            ds.load(evil)
    assert "refused by weights_only" in str(info.value) and "weights_only=False" not in str(info.value).replace(
        "do not load it with weights_only=False", "")
    assert not marker.exists()


@pytest.mark.timeout(60)
def test_checkpoint_of_another_layout_names_the_strategy_change(tmp_path: Path) -> None:
    """A pipeline (or sharded) checkpoint resumed by a whole-model strategy is refused with a
    message naming both strategies, not a KeyError from deep inside a state dict."""
    import disttrain
    from disttrain.errors import ConfigError

    path = tmp_path / "step_00000004.pt"
    ckpt.save({"extra": {"meta": {"strategy": "model_parallel", "layout": "pipeline", "format": 3}}},
              tmp_path, path.name)
    with disttrain.setup(strategy="single") as ds:
        model = torch.nn.Linear(2, 2)
        ds.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        with pytest.raises(ConfigError, match="written by strategy='model_parallel'.*resume with strategy=model_parallel"):
            ds.load(path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["metadata", "value"])
def test_sharded_checkpoint_refuses_code_in_metadata_and_values(tmp_path: Path, where: str) -> None:
    """torch.distributed.checkpoint unpickles its ``.metadata`` file and non-tensor values with
    plain pickle; ``checkpoint.load_sharded`` allow-lists the first and loads the second
    ``weights_only``. A payload in either never runs; a clean checkpoint round-trips."""
    marker = tmp_path / "pwned"
    directory = tmp_path / "step_00000001.shards"
    state = {"w": torch.arange(4.0), "extra": {"note": "hello" if where == "metadata" else _Payload(str(marker))}}
    ckpt.save_sharded(state, directory)
    assert not marker.exists()  # saving pickles the payload object, it does not run it
    if where == "metadata":
        clean = {"w": torch.zeros(4), "extra": {"note": ""}}
        ckpt.load_sharded(clean, directory)
        assert torch.equal(clean["w"], torch.arange(4.0)) and clean["extra"]["note"] == "hello"
        metadata = pickle.loads((directory / ".metadata").read_bytes())
        metadata.storage_meta = _Payload(str(marker))
        (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(Exception) as info:
        ckpt.load_sharded({"w": torch.zeros(4), "extra": {"note": ""}}, directory)
    assert "refused" in str(info.value) or "Unsupported global" in str(info.value) or "weights_only" in str(info.value)
    assert not marker.exists()
