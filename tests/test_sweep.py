"""disttrain.sweep: a Hydra sweep whose jobs are torchrun runs, each in its own directory.

The expansion is checked against Hydra's own basic sweeper; one real sweep (a 2-process DDP job
and a 1-process single job, otherwise identical) checks the jobs ran as planned, each in its own
directory, that DDP over 2 processes reproduces the single-process result (the DDP equivalence),
and that the summary table reports exactly what the jobs wrote."""

from __future__ import annotations

import json

import pytest
import yaml

from disttrain import sweep
from disttrain.launch import TorchrunSpec, torchrun_args


def hydra_basic_sweeper(args: list[str]) -> list[list[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(args)
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for job in batch]


@pytest.mark.parametrize("args", [
    ["optimizer.lr=0.01,0.001", "strategy=ddp,single"],
    ["strategy=ddp", "optimizer.lr=range(1,4)", "seed=choice(0,1)", "+foo=bar"],
    ["trainer.max_epochs=3", "data=digits,synthetic", "optimizer.lr=0.1"],
])
def test_expansion_is_hydras(args):
    options, jobs = sweep.expand(["-m", *args])
    assert options == {}
    assert jobs == hydra_basic_sweeper(args)


def test_tool_options_and_nproc():
    options, jobs = sweep.plan(["nproc=2", "-m", "optimizer.lr=0.01,0.001", "strategy=ddp,single",
                                "sweep_dir=/tmp/x", "job_timeout=5"])
    assert options == {"nproc": "2", "sweep_dir": "/tmp/x", "job_timeout": "5"}
    assert [(j.swept, j.nproc) for j in jobs] == [
        ({"optimizer.lr": "0.01", "strategy": "ddp"}, 2), ({"optimizer.lr": "0.01", "strategy": "single"}, 1),
        ({"optimizer.lr": "0.001", "strategy": "ddp"}, 2), ({"optimizer.lr": "0.001", "strategy": "single"}, 1),
    ]
    assert all(not any(o.startswith(k + "=") for k in sweep.TOOL_KEYS for o in j.overrides) for j in jobs)
    _, jobs = sweep.plan(["-m", "nproc=1,2", "strategy=ddp"])
    assert [j.nproc for j in jobs] == [1, 2] and all(j.overrides == ["strategy=ddp"] for j in jobs)


def test_glob_over_a_config_group():
    from disttrain.registry import CONF_DIR

    _, jobs = sweep.expand(["-m", "optimizer=glob(*,exclude=sgd)"])
    expected = sorted(p.stem for p in (CONF_DIR / "optimizer").glob("*.yaml") if p.stem != "sgd")
    assert jobs == [[f"optimizer={o}"] for o in expected]


def test_job_command_is_the_launchers(tmp_path):
    _, (job,) = sweep.plan(["nproc=3", "strategy=ddp"])
    cmd = sweep.job_command(job, tmp_path / "0")
    torchrun = cmd.index("-m", 1) + 2  # python -m torch.distributed.run <options> -m disttrain
    assert cmd[torchrun:cmd.index("disttrain") - 1] == torchrun_args(TorchrunSpec(nproc_per_node=3))
    assert cmd[-2:] == ["strategy=ddp", f"hydra.run.dir='{tmp_path / '0'}'"]


def test_table_reports_failures_and_metrics():
    jobs = [sweep.Job(0, ["a=1"], {"a": "1"}, 2, returncode=0, summary={"eval_loss": 0.5, "steps": 3}),
            sweep.Job(1, ["a=2"], {"a": "2"}, 2, returncode=1)]
    lines = sweep.table(jobs).splitlines()
    assert lines[0] == "| job | a | nproc | status | eval_loss | steps |"
    assert lines[2] == "| 0 | 1 | 2 | ok | 0.5 | 3 |"
    assert lines[3] == "| 1 | 2 | 2 | failed (1) |  |  |"


def test_bad_arguments():
    with pytest.raises(SystemExit, match="unknown option"):
        sweep.expand(["--nproc", "2"])
    with pytest.raises(SystemExit, match="cannot be swept"):
        sweep.expand(["sweep_dir=a,b"])


@pytest.mark.slow  # the plan and the table are tested above; this launches the jobs
@pytest.mark.timeout(240)
def test_real_sweep_of_torchrun_jobs(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "sweep"
    args = ["nproc=2", "-m", "strategy=ddp,single", "experiment=regression_exact", "optimizer.lr=0.05",
            "trainer.progress_bar=false", f"sweep_dir={out_dir}", "job_timeout=150"]
    monkeypatch.chdir(tmp_path)
    code = sweep.main(args)  # in this process; each job is a torchrun subprocess
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:] + "".join(
        p.read_text()[-2000:] for p in out_dir.glob("*/torchrun.log"))
    _, planned = sweep.plan(args)

    rows = json.loads((out_dir / "sweep_summary.json").read_text())
    assert [r["job"] for r in rows] == [0, 1]
    summaries = []
    for row, job in zip(rows, planned):
        job_dir = out_dir / str(job.num)
        assert row["dir"] == str(job_dir) and row["nproc"] == job.nproc and row["returncode"] == 0
        # the job ran with its own overrides, in its own directory, with the planned process count
        assert yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) == job.overrides
        log = (job_dir / "torchrun.log").read_text()
        assert log.count("disttrain: config error") == 0
        summary = json.loads((job_dir / "summary.json").read_text())
        assert {k: v for k, v in row.items() if k in summary} == {k: summary[k] for k in row if k in summary}
        summaries.append(summary)
    assert [j.nproc for j in planned] == [2, 1]
    # DDP over 2 processes on the same global batch reproduces one process (to rounding)
    ddp, single = summaries
    assert ddp["steps"] == single["steps"]
    assert ddp["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    table = (out_dir / "sweep_summary.md").read_text()
    assert table in stdout
    assert len(table.splitlines()) == 2 + len(rows)
