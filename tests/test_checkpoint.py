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
    from disttrain.errors import ConfigError
    from disttrain.session import Session
    from disttrain.trainer import Trainer, TrainerConfig
    from disttrain.data import synthetic_regression

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
