"""The Hydra app under a real torchrun: accuracy, one run directory, TensorBoard events, plot,
fail-fast config errors, and clean exits over repeated launches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import run_python, run_torchrun


def _only_run_dir(cwd: Path) -> Path:
    dirs = [p for p in (cwd / "outputs").iterdir() if p.is_dir()]
    assert len(dirs) == 1, f"expected exactly one run directory, found {dirs}"
    return dirs[0]


@pytest.mark.timeout(300)
def test_torchrun_two_processes_trains_digits(tmp_path):
    res = run_torchrun(["experiment=digits_ddp", "trainer.log_every_n_steps=5"], nproc=2, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:]
    run = _only_run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.95, summary
    # rank 0 wrote the config, the log, one event file and one plot; nobody else wrote anything
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "train.log").is_file()
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/samples_per_sec", "time/data_ms", "time/forward_ms",
                "time/backward_ms", "time/optimizer_ms", "eval/accuracy", "eval/loss",
                "straggler/rank", "ranks/compute_ms/rank1", "perf/tflops"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses[-1] < losses[0]
    assert acc.Scalars("eval/accuracy")[-1].value == pytest.approx(summary["eval_accuracy"])
    plots = list(run.glob("*.png"))
    assert [p.name for p in plots] == ["loss.png"]
    assert plots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpts = sorted((run / "checkpoints").glob("*.pt"))
    assert ckpts and (run / "checkpoints" / "latest").read_text().strip() == ckpts[-1].name


@pytest.mark.timeout(120)
def test_plain_python_runs_one_process(tmp_path):
    res = run_python(["-m", "disttrain", "strategy=single", "experiment=regression_exact"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    run = _only_run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] > 0 and summary["eval_mse"] < 1.0


BAD_CONFIGS = [
    # (overrides, text every rank must print): a Hydra error and a disttrain one in every run; the
    # rest with --full (each error's text is checked in-process by tests/test_validation.py)
    (["strategy=nope"], "Could not find 'strategy/nope'"),
    (["data.batch_size=63"], "data.batch_size=63 is not divisible by the 2 data-parallel ranks"),
    pytest.param(["~model._target_"], "model has no _target_", marks=pytest.mark.slow),
    pytest.param(["strategy=single"], "strategy=single runs one process but WORLD_SIZE=2", marks=pytest.mark.slow),
    pytest.param(["trainer.max_epochs=0"], "trainer.max_epochs=0: must be >= 1", marks=pytest.mark.slow),
    pytest.param(["strategy.compression=int3"], "strategy.compression='int3': expected one of", marks=pytest.mark.slow),
]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("overrides,message", BAD_CONFIGS,
                         ids=[(b.values if hasattr(b, "values") else b)[0][0] for b in BAD_CONFIGS])
def test_bad_config_fails_fast_on_every_rank(tmp_path, overrides, message):
    res = run_torchrun(overrides, nproc=2, cwd=tmp_path, timeout=120)
    assert res.returncode != 0
    assert res.stdout.count(message) >= 2, f"expected the message on both ranks:\n{res.stdout[-3000:]}"
    assert "Traceback" not in res.stdout.split(message)[0][-200:] or "Could not find" in message


@pytest.mark.timeout(400)
@pytest.mark.parametrize("nproc,repeats", [(2, 2), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_repeated_launches_exit_cleanly(tmp_path, nproc, repeats):
    """gloo's worker thread can abort the process at interpreter exit if the process group
    outlives the model; every launch must exit with code 0."""
    for i in range(repeats):
        (tmp_path / str(i)).mkdir()
        res = run_torchrun(
            ["experiment=regression_exact", "trainer.max_steps=4", "data.batch_size=32"],
            nproc=nproc, cwd=tmp_path / str(i), timeout=180,
        )
        assert res.returncode == 0, res.stdout[-3000:]
        assert "terminate called" not in res.stdout
