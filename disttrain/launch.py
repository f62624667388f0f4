"""torchrun command lines, built in one place.

Everything that starts disttrain under torchrun takes its arguments from here, so the recipes in
``launchers/`` cannot drift from what is run and tested:

* ``python -m disttrain.launch [--nproc N] [overrides...]`` runs a job (``scripts/train.sh`` uses it);
  with ``--nnodes``/``--rdzv-endpoint`` it is one node of a multi-node job.
* ``disttrain.sweep`` launches each job of a Hydra sweep with :func:`command`.
* ``python -m disttrain.launch --emit slurm`` prints the checked-in ``launchers/slurm/train.sbatch``
  (likewise ``local``, ``multinode``, ``pytorchjob``, ``pytorchjob-elastic``); ``--sync`` rewrites all
  of them and ``tests/test_launchers.py`` fails when a checked-in file differs from its generator.

In the recipes the values are shell expressions (``"$NPROC"``) filled in where the script runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from disttrain.preemption import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ROOT / "launchers"
DEFAULT_RDZV_PORT = 29500


@dataclass(frozen=True)
class TorchrunSpec:
    """The torchrun options disttrain uses. ``None`` leaves an option out (torchrun's default, or
    the ``PET_*`` environment variable torchrun reads it from, as in a Kubeflow PyTorchJob).

    One node with no rendezvous endpoint is ``--standalone`` (a private c10d rendezvous on a free
    port); otherwise every node runs the same line against one c10d rendezvous endpoint, the
    first node's ``host:port``, and ``nnodes`` may be elastic (``MIN:MAX``)."""

    nproc_per_node: str | int | None = 2
    nnodes: str | int | None = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_backend: str = "c10d"
    max_restarts: str | int | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)  # verbatim, e.g. ("--local-addr=10.0.0.1",)

    @property
    def standalone(self) -> bool:
        return str(self.nnodes) == "1" and self.rdzv_endpoint is None


def torchrun_args(spec: TorchrunSpec) -> list[str]:
    """torchrun's options (everything before ``-m disttrain``)."""
    args: list[str] = []
    if spec.standalone:
        args.append("--standalone")
    elif spec.nnodes is not None:
        args.append(f"--nnodes={spec.nnodes}")
    if spec.nproc_per_node is not None:
        args.append(f"--nproc-per-node={spec.nproc_per_node}")
    if not spec.standalone and spec.rdzv_endpoint is not None:
        args += [f"--rdzv-backend={spec.rdzv_backend}", f"--rdzv-endpoint={spec.rdzv_endpoint}"]
        if spec.rdzv_id is not None:
            args.append(f"--rdzv-id={spec.rdzv_id}")
    if spec.max_restarts is not None:
        args.append(f"--max-restarts={spec.max_restarts}")
    return args + list(spec.extra)


#: torchrun with its stores (and, through DISTTRAIN_BIND_ADDR, its workers' listeners) bound to
#: loopback on one machine or to DISTTRAIN_BIND_ADDR: see disttrain/torchrun.py
TORCHRUN = ("python", "-m", "disttrain.torchrun")


def command(
    spec: TorchrunSpec,
    overrides: Sequence[str] = (),
    torchrun: Sequence[str] = TORCHRUN,
    module: str = "disttrain",
) -> list[str]:
    """The whole command: ``python -m disttrain.torchrun <options> -m disttrain <overrides>``
    (torchrun's arguments; plain ``torchrun`` would listen on every interface). Pass
    ``torchrun=this_python_torchrun()`` to use this interpreter."""
    return [*torchrun, *torchrun_args(spec), "-m", module, *overrides]


def this_python_torchrun() -> list[str]:
    return [sys.executable, "-m", "disttrain.torchrun"]


# ------------------------------------------------------------------------------ the recipes
# Shell recipes: the values are shell expressions expanded by the script.
LOCAL = TorchrunSpec(nproc_per_node='"$NPROC"')
MULTINODE = TorchrunSpec(
    nproc_per_node='"$NPROC"', nnodes='"$NNODES"', rdzv_endpoint='"$RDZV_HOST:$RDZV_PORT"',
    rdzv_id='"$RDZV_ID"', max_restarts='"$MAX_RESTARTS"',
    extra=('${RDZV_CONF:+"--rdzv-conf=$RDZV_CONF"}', '${LOCAL_ADDR:+"--local-addr=$LOCAL_ADDR"}'),
)
SLURM = TorchrunSpec(
    nproc_per_node='"$NPROC"', nnodes='"$SLURM_JOB_NUM_NODES"', rdzv_endpoint='"$head_node:$RDZV_PORT"',
    rdzv_id='"$SLURM_JOB_ID"', max_restarts='"$MAX_RESTARTS"',
    # forward SLURM's USR1 warning to the workers (they checkpoint and exit 75), and give them
    # time to do it before the agent kills them
    extra=("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", '--shutdown-timeout="$GRACE_S"'),
)
# Kubeflow PyTorchJob: the training operator sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
# PET_MASTER_ADDR/PORT (and PET_RDZV_* with an elasticPolicy); torchrun reads its options from them.
KUBERNETES = TorchrunSpec(nproc_per_node=None, nnodes=None, rdzv_endpoint=None, extra=("--shutdown-timeout=100",))


def _shell(cmd: Sequence[str], indent: str = "  ") -> str:
    """One command over several lines, one option per line (``-m module`` stays together)."""
    parts: list[str] = []
    for arg in cmd:
        if parts and (parts[-1].split(" ")[-1] == "-m" or (arg == "-m" and parts[-1] == "python")):
            parts[-1] += " " + arg
        else:
            parts.append(arg)
    return (" \\\n" + indent).join(parts)


HEADER = "# Generated by `python -m disttrain.launch --emit {name}`: edit disttrain/launch.py, then run\n" \
         "# `python -m disttrain.launch --sync` (tests/test_launchers.py checks they match).\n"


def emit_local() -> str:
    return f"""#!/usr/bin/env bash
# One machine, NPROC processes (one per GPU, or CPU processes with gloo):
#   NPROC=2 bash launchers/local.sh experiment=digits_ddp trainer.max_epochs=5
# `--standalone` starts a private c10d rendezvous on a free port: several jobs can share a machine.
{HEADER.format(name="local")}set -euo pipefail
NPROC="${{NPROC:-2}}"
export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-1}}"
exec {_shell(command(LOCAL, ['"$@"']))}
"""


def emit_multinode() -> str:
    return f"""#!/usr/bin/env bash
# Several machines: run this same line on every node (any order; they wait for each other).
#   node0$ NNODES=2 NPROC=4 RDZV_HOST=node0 RDZV_ID=exp1 bash launchers/multinode.sh experiment=digits_ddp
#   node1$ NNODES=2 NPROC=4 RDZV_HOST=node0 RDZV_ID=exp1 bash launchers/multinode.sh experiment=digits_ddp
# RDZV_HOST:RDZV_PORT is the c10d rendezvous, hosted by the torchrun agent on RDZV_HOST (open the
# port between nodes). RDZV_ID names the job: the same on every node, new for each job. NNODES=1:4
# is elastic (starts with >=1 node, admits up to 4). After a worker fails, torchrun restarts all
# workers up to MAX_RESTARTS times; use trainer.resume=auto to continue from the last checkpoint.
# Optional: LOCAL_ADDR (this node's address on the training network), RDZV_CONF (e.g.
# join_timeout=900 or is_host=1 on the node that hosts the rendezvous when its name doesn't resolve).
# The run directory outputs/<run id> is agreed through torchrun's store; only global rank 0 writes
# it, so put the working directory on a shared file system if every node should see it.
{HEADER.format(name="multinode")}set -euo pipefail
NNODES="${{NNODES:?set NNODES, e.g. 2 (or 1:4, elastic)}}"
NPROC="${{NPROC:-1}}"
RDZV_HOST="${{RDZV_HOST:?set RDZV_HOST to the first node}}"
RDZV_PORT="${{RDZV_PORT:-{DEFAULT_RDZV_PORT}}}"
RDZV_ID="${{RDZV_ID:-disttrain}}"
MAX_RESTARTS="${{MAX_RESTARTS:-3}}"
export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-1}}"
exec {_shell(command(MULTINODE, ['"$@"']))}
"""


def emit_slurm() -> str:
    return f"""#!/bin/bash
# SLURM: one torchrun agent per node (srun, one task per node), NPROC workers each; the c10d
# rendezvous is on the first node of the allocation. Submit as is, Hydra overrides after the script:
#   sbatch launchers/slurm/train.sbatch experiment=digits_ddp trainer.max_epochs=20
#   sbatch --nodes=4 --gpus-per-node=8 launchers/slurm/train.sbatch strategy=ddp
# The run directory is outputs/slurm-<job id> (DISTTRAIN_RUN_ID): a requeued job keeps it, and
# trainer.resume=auto continues from its last checkpoint.
# Preemption and time limits: SLURM sends this script USR1 90 s before it stops the job; the trap
# passes it to every worker (through srun and torchrun), each finishes its step, the job writes a
# checkpoint, the workers exit with 75, and the script requeues the job.
# The rendezvous and the workers listen on the node's address on the network that reaches the
# first node (or DISTTRAIN_BIND_ADDR), never on every interface.
#SBATCH --job-name=disttrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
##SBATCH --gpus-per-node=4
##SBATCH --partition=gpu
{HEADER.format(name="slurm")}set -uo pipefail
NPROC="${{NPROC:-${{SLURM_GPUS_ON_NODE:-1}}}}"
RDZV_PORT="${{RDZV_PORT:-{DEFAULT_RDZV_PORT}}}"
MAX_RESTARTS="${{MAX_RESTARTS:-3}}"
GRACE_S="${{GRACE_S:-80}}"
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"  # sed reads all: no SIGPIPE
export DISTTRAIN_RUN_ID="${{DISTTRAIN_RUN_ID:-slurm-$SLURM_JOB_ID}}"
export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-1}}"
echo "disttrain: $SLURM_JOB_NUM_NODES nodes x $NPROC processes, rendezvous $head_node:$RDZV_PORT"
preempted=0
trap 'preempted=1; echo "disttrain: USR1 from SLURM: checkpointing"; kill -USR1 "$srun_pid" 2>/dev/null' USR1
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\
  {_shell(command(SLURM, ['"$@"']))} &
srun_pid=$!
rc=0
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; rc=$?; done  # wait returns early on USR1
if [ "$preempted" = 1 ] || [ "$rc" = {EXIT_PREEMPTED} ]; then
  echo "disttrain: requeueing job $SLURM_JOB_ID (trainer.resume=auto continues it)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
"""


PYTORCHJOB_CONTAINER = """\
            - name: pytorch                 # the operator looks for the container named "pytorch"
              image: {image}
              imagePullPolicy: IfNotPresent
              command: {command}
              args: {args}
              workingDir: /workspace
              env:
                - name: OMP_NUM_THREADS
                  value: "1"
                - name: DISTTRAIN_BIND_ADDR   # listen on the pod's address only
                  valueFrom:
                    fieldRef:
                      fieldPath: status.podIP
                - name: DISTTRAIN_RUN_ID      # run directory outputs/<job name>: kept when pods restart
                  valueFrom:
                    fieldRef:
                      fieldPath: metadata.labels['training.kubeflow.org/job-name']
              resources:
                limits:
                  cpu: "4"
                  memory: 8Gi
                  # nvidia.com/gpu: 2         # = nprocPerNode on GPU nodes
              volumeMounts:
                - name: outputs
                  mountPath: /workspace/outputs
          volumes:
            - name: outputs                 # global rank 0 writes the run directory here; for
              emptyDir: {{}}                # resume after a pod moves, use a shared PVC instead"""

IMAGE = "ghcr.io/your-org/disttrain:0.1.0   # build with launchers/kubernetes/Dockerfile"
K8S_OVERRIDES = ["experiment=digits_ddp", "trainer.resume=auto"]


def _yaml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def _pytorchjob_container() -> str:
    cmd = command(KUBERNETES, ())
    return PYTORCHJOB_CONTAINER.format(image=IMAGE, command=_yaml_list(cmd), args=_yaml_list(K8S_OVERRIDES))


def emit_pytorchjob() -> str:
    return f"""# Kubernetes, Kubeflow training operator: a PyTorchJob of 1 Master + 1 Worker pod, each running
# torchrun with nprocPerNode workers. The operator sets MASTER_ADDR/PORT, WORLD_SIZE, RANK and
# PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT, which torchrun
# reads as its options, so the command needs none. Submit: kubectl apply -f launchers/kubernetes/pytorchjob.yaml
{HEADER.format(name="pytorchjob")}apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: disttrain
spec:
  nprocPerNode: "2"                         # processes per pod ("auto": one per GPU)
  runPolicy:
    cleanPodPolicy: None
    backoffLimit: 3
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      restartPolicy: OnFailure
      template:
        spec:
          terminationGracePeriodSeconds: 120   # SIGTERM: workers checkpoint, then exit (resume=auto)
          containers:
{_pytorchjob_container()}
    Worker:
      replicas: 1
      restartPolicy: OnFailure
      template:
        spec:
          terminationGracePeriodSeconds: 120   # SIGTERM: workers checkpoint, then exit (resume=auto)
          containers:
{_pytorchjob_container()}
"""


def emit_pytorchjob_elastic() -> str:
    return f"""# Kubernetes, elastic: Worker pods only, between minReplicas and maxReplicas of them, joined by
# torchrun's c10d rendezvous. The operator sets PET_RDZV_BACKEND, PET_RDZV_ENDPOINT, PET_RDZV_ID,
# PET_NNODES=min:max and PET_MAX_RESTARTS from elasticPolicy; torchrun restarts the workers when a
# pod joins or leaves, and trainer.resume=auto continues from the last checkpoint (on a shared PVC).
# Submit: kubectl apply -f launchers/kubernetes/pytorchjob-elastic.yaml
{HEADER.format(name="pytorchjob-elastic")}apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: disttrain-elastic
spec:
  nprocPerNode: "2"
  elasticPolicy:
    rdzvBackend: c10d
    minReplicas: 1
    maxReplicas: 4
    maxRestarts: 10
  runPolicy:
    cleanPodPolicy: None
  pytorchReplicaSpecs:
    Worker:
      replicas: 2
      restartPolicy: OnFailure
      template:
        spec:
          terminationGracePeriodSeconds: 120   # SIGTERM: workers checkpoint, then exit (resume=auto)
          containers:
{_pytorchjob_container()}
"""


RECIPES = {
    "local": ("local.sh", emit_local),
    "multinode": ("multinode.sh", emit_multinode),
    "slurm": ("slurm/train.sbatch", emit_slurm),
    "pytorchjob": ("kubernetes/pytorchjob.yaml", emit_pytorchjob),
    "pytorchjob-elastic": ("kubernetes/pytorchjob-elastic.yaml", emit_pytorchjob_elastic),
}


def emit(name: str) -> str:
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}")
    return RECIPES[name][1]()


def sync(directory: Path = LAUNCHERS) -> list[Path]:
    """Rewrite every generated recipe under ``directory``; returns the files that changed."""
    changed = []
    for name, (rel, _) in RECIPES.items():
        path = directory / rel
        text = emit(name)
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if path.suffix in (".sh", ".sbatch"):
                path.chmod(0o755)
            changed.append(path)
    return changed


# ------------------------------------------------------------------------------ command line
def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m disttrain.launch",
        description="Run disttrain under torchrun (this interpreter's torch), or print a launcher recipe.",
    )
    p.add_argument("--emit", choices=sorted(RECIPES), help="print a recipe from launchers/ and exit")
    p.add_argument("--sync", action="store_true", help="rewrite every recipe in launchers/ and exit")
    p.add_argument("--nproc", default=os.environ.get("NPROC", "2"), help="processes per node (default $NPROC or 2)")
    p.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for elastic (default 1)")
    p.add_argument("--rdzv-endpoint", help="host:port of the c10d rendezvous (the first node); implies multi-node")
    p.add_argument("--rdzv-id", default="disttrain", help="job name, the same on every node")
    p.add_argument("--max-restarts", default=None, help="restart all workers up to this many times after a failure")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides for disttrain")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.emit:
        sys.stdout.write(emit(args.emit))
        return 0
    if args.sync:
        for path in sync():
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    overrides = [o for o in args.overrides if o != "--"]
    spec = TorchrunSpec(
        nproc_per_node=args.nproc, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id if args.rdzv_endpoint else None, max_restarts=args.max_restarts,
    )
    cmd = command(spec, overrides, torchrun=this_python_torchrun())
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
