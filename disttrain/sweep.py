"""Hydra sweeps of distributed runs: every job of the sweep is its own torchrun launch.

    python -m disttrain.sweep nproc=2 -m optimizer.lr=0.01,0.001 strategy=ddp,single

expands the overrides exactly as Hydra's basic sweeper does (cartesian product of ``a,b`` lists,
``range(...)``, ``choice(...)``, ``glob(...)`` over config groups), then runs job after job as
``torchrun --standalone --nproc-per-node=N -m disttrain <job overrides> hydra.run.dir=<sweep dir>/<n>``
(the torchrun line comes from :mod:`disttrain.launch`). Each job has its own directory with its own
``.hydra/``, checkpoints, TensorBoard events and ``summary.json``. At the end the sweep's final
metrics are gathered into ``<sweep dir>/sweep_summary.json`` and ``sweep_summary.md`` (a table, also
printed), one row per job.

Options of the tool itself (``key=value``, not passed to disttrain):

* ``nproc=N`` processes per job (default 2; may itself be swept: ``nproc=1,2``). ``strategy=single``
  jobs always run one process.
* ``sweep_dir=PATH`` (default ``multirun/<timestamp>``), ``job_timeout=SECONDS`` (default none),
  ``dry_run=true`` (print the commands only).

``-m`` / ``--multirun`` is accepted and implied. A failed job is recorded (return code, last lines of
its output in ``<job dir>/torchrun.log``) and the sweep goes on; the exit code is 1 if any job failed.
To sweep on a SLURM cluster with a job per sweep point instead, use Hydra's submitit launcher:
``python -m disttrain -m hydra/launcher=slurm ...`` (conf/hydra/launcher/, docs/launching.md).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from disttrain.launch import ROOT, TorchrunSpec, command, this_python_torchrun

TOOL_KEYS = ("nproc", "sweep_dir", "job_timeout", "dry_run")


@dataclass
class Job:
    num: int
    overrides: list[str]          # passed to disttrain (Hydra overrides)
    swept: dict[str, str]         # the values that vary across the sweep, for the table
    nproc: int
    dir: Path | None = None
    returncode: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def _conf_options(group: str) -> list[str]:
    from disttrain.registry import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def expand(args: Sequence[str]) -> tuple[dict[str, str], list[list[str]]]:
    """Split the command line into the tool's options and the sweep's jobs (each a list of
    ``key=value`` overrides, tool keys included), in Hydra's basic-sweeper order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    args = [a for a in args if a not in ("-m", "--multirun")]
    bad = [a for a in args if a.startswith("-")]
    if bad:
        raise SystemExit(f"disttrain.sweep: unknown option(s) {bad}: pass Hydra overrides key=value, nproc=N, sweep_dir=PATH")
    parsed = OverridesParser.create().parse_overrides(list(args))
    options: dict[str, str] = {}
    axes: list[list[str]] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise SystemExit(f"disttrain.sweep: {o.input_line}: interval sweeps need an optimizing sweeper plugin")
            value = o.value()
            if isinstance(value, Glob):  # glob(*) over a config group's options
                values = value.filter(_conf_options(key.lstrip("+~")))
            else:
                values = list(o.sweep_string_iterator())
            if key in ("sweep_dir", "job_timeout", "dry_run"):
                raise SystemExit(f"disttrain.sweep: {key} cannot be swept")
            axes.append([f"{key}={v}" for v in values])
        elif key in TOOL_KEYS:
            options[key] = o.get_value_element_as_str()
        else:
            axes.append([(o.input_line or "").strip()])
    return options, [list(combo) for combo in itertools.product(*axes)]


def plan(args: Sequence[str], sweep_dir: Path | None = None) -> tuple[dict[str, str], list[Job]]:
    options, combos = expand(args)
    jobs = []
    values: dict[str, set[str]] = {}
    for combo in combos:
        for ov in combo:
            k, _, v = ov.partition("=")
            values.setdefault(k, set()).add(v)
    swept_keys = {k for k, vs in values.items() if len(vs) > 1}
    for num, combo in enumerate(combos):
        kv = dict(ov.partition("=")[::2] for ov in combo)
        nproc = int(kv.pop("nproc", options.get("nproc", 2)))
        overrides = [ov for ov in combo if not ov.startswith("nproc=")]
        if kv.get("strategy") == "single":
            nproc = 1
        jobs.append(Job(num, overrides, {k: v for k, v in kv.items() if k in swept_keys}, nproc))
    return options, jobs


def job_command(job: Job, job_dir: Path) -> list[str]:
    return command(
        TorchrunSpec(nproc_per_node=job.nproc),
        [*job.overrides, f"hydra.run.dir='{job_dir}'"],
        torchrun=this_python_torchrun(),
    )


def run_job(job: Job, job_dir: Path, timeout: float | None) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("DISTTRAIN_RUN_ID", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    cmd = job_command(job, job_dir)
    with open(job_dir / "torchrun.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            job.returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            job.returncode = -signal.SIGKILL
            log.write(f"\ndisttrain.sweep: job {job.num} killed after {timeout}s\n")
    summary = job_dir / "summary.json"
    if job.returncode == 0 and summary.is_file():
        job.summary = json.loads(summary.read_text())


def metric_columns(jobs: Sequence[Job]) -> list[str]:
    cols = sorted({k for j in jobs for k in j.summary if k.startswith("eval_")})
    return cols + [k for k in ("steps", "samples_per_sec") if any(k in j.summary for j in jobs)]


def table(jobs: Sequence[Job]) -> str:
    """A Markdown table of the sweep: job, swept values, processes, status, final metrics."""
    swept = sorted({k for j in jobs for k in j.swept})
    cols = metric_columns(jobs)
    head = ["job", *swept, "nproc", "status", *cols]
    rows = []
    for j in jobs:
        status = "ok" if j.returncode == 0 else f"failed ({j.returncode})"
        vals = [_fmt(j.summary.get(c, "")) for c in cols]
        rows.append([str(j.num), *(j.swept.get(k, "") for k in swept), str(j.nproc), status, *vals])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_summary(sweep_dir: Path, jobs: Sequence[Job]) -> str:
    rows = [
        {"job": j.num, "dir": str(j.dir), "overrides": j.overrides, "swept": j.swept, "nproc": j.nproc,
         "returncode": j.returncode, **{k: j.summary.get(k) for k in metric_columns(jobs)}}
        for j in jobs
    ]
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    text = table(jobs)
    (sweep_dir / "sweep_summary.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    options, jobs = plan(args)
    sweep_dir = Path(options.get("sweep_dir") or Path("multirun") / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    timeout = float(options["job_timeout"]) if options.get("job_timeout") else None
    dry = options.get("dry_run", "false").lower() in ("true", "1", "yes")
    print(f"disttrain.sweep: {len(jobs)} job(s) in {sweep_dir}", flush=True)
    for job in jobs:
        job.dir = sweep_dir / str(job.num)
        print(f"  #{job.num}: nproc={job.nproc} {' '.join(job.overrides)}", flush=True)
        if dry:
            print("    " + " ".join(job_command(job, job.dir)))
            continue
        run_job(job, job.dir, timeout)
        state = "ok" if job.returncode == 0 else f"FAILED ({job.returncode}): see {job.dir / 'torchrun.log'}"
        print(f"    {state}", flush=True)
    if dry:
        return 0
    sweep_dir.mkdir(parents=True, exist_ok=True)
    print(write_summary(sweep_dir, jobs), end="")
    print(f"disttrain.sweep: summary in {sweep_dir / 'sweep_summary.md'} and sweep_summary.json")
    return 0 if all(j.returncode == 0 for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
