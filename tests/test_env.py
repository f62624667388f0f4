"""DistEnv reads every launcher's environment: the variables below are the ones each launcher sets
(torchrun's elastic agent, SLURM's srun, the Kubeflow training operator), and one real torchrun
launch on two "nodes" checks the torchrun reading against what torch.distributed itself reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from disttrain.env import DistEnv, _first_slurm_host
from tests.distributed import ROOT, free_port


def torchrun_env(rank: int, local_rank: int, nproc: int, nnodes: int, node: int, **extra: str) -> dict:
    """What torch.distributed.elastic's LocalElasticAgent puts in a worker's environment."""
    return {
        "RANK": str(rank), "LOCAL_RANK": str(local_rank), "GROUP_RANK": str(node), "ROLE_RANK": str(rank),
        "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(nproc), "WORLD_SIZE": str(nproc * nnodes),
        "GROUP_WORLD_SIZE": str(nnodes), "ROLE_WORLD_SIZE": str(nproc * nnodes),
        "MASTER_ADDR": "node0.cluster", "MASTER_PORT": "41231", "TORCHELASTIC_RESTART_COUNT": "1",
        "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RUN_ID": "job42",
        "TORCHELASTIC_USE_AGENT_STORE": "True", **extra,
    }


def slurm_env(procid: int, localid: int, nodeid: int, ntasks: int, tasks_per_node: str, nodelist: str,
              job_id: str = "123456", **extra: str) -> dict:
    """What ``srun`` sets in each task of a step (a subset: the variables DistEnv reads and some noise)."""
    return {
        "SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid), "SLURM_NTASKS": str(ntasks),
        "SLURM_NPROCS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_TASKS_PER_NODE": tasks_per_node,
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_JOB_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURMD_NODENAME": "irrelevant",
        "SLURM_CPUS_ON_NODE": "8", **extra,
    }


def pytorchjob_env(replica: str, index: int, workers: int, nproc_per_node: str = "1", elastic: bool = False) -> dict:
    """What the Kubeflow training operator (v1 PyTorchJob) sets in a pod: Master is rank 0,
    Worker i is rank i + 1; WORLD_SIZE counts processes (replicas x nprocPerNode)."""
    replicas = workers + (0 if elastic else 1)
    rank = index + (1 if replica == "worker" and not elastic else 0)
    nproc_int = int(nproc_per_node) if nproc_per_node.isdigit() else 1
    env = {
        "PYTHONUNBUFFERED": "1", "PET_NPROC_PER_NODE": nproc_per_node,
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    }
    if elastic:  # no Master replica: the rendezvous replaces MASTER_ADDR / RANK
        env.update(PET_RDZV_BACKEND="c10d", PET_RDZV_ENDPOINT="train-worker-0:23456", PET_RDZV_ID="train",
                   PET_NNODES=f"1:{workers}", PET_MAX_RESTARTS="3")
    else:
        env.update(MASTER_ADDR="train-master-0", MASTER_PORT="23456", PET_MASTER_ADDR="train-master-0",
                   PET_MASTER_PORT="23456", WORLD_SIZE=str(replicas * nproc_int), RANK=str(rank),
                   PET_NODE_RANK=str(rank), PET_NNODES=str(replicas))
    return env


# ------------------------------------------------------------------------------ torchrun
@pytest.mark.parametrize("node,local", [(0, 0), (0, 3), (1, 0), (1, 2)])
def test_torchrun_multinode_worker(node, local):
    nproc, nnodes = 4, 2
    rank = node * nproc + local
    env = DistEnv.from_environ(torchrun_env(rank, local, nproc, nnodes, node))
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (rank, local, 8, 4)
    assert (env.node_rank, env.num_nodes, env.source) == (node, 2, "torchrun")
    assert (env.master_addr, env.master_port, env.restart_count) == ("node0.cluster", 41231, 1)
    assert env.is_rank_zero == (rank == 0)


def test_torchrun_inside_slurm_and_pytorchjob_wins():
    """``srun torchrun`` and torchrun in a PyTorchJob pod: the scheduler's variables (one task per
    node, the pod's RANK) stay in the environment; torchrun's per-process values must win."""
    base = {**slurm_env(1, 0, 1, 2, "1(x2)", "gpu[01-02]"), **pytorchjob_env("worker", 0, 1, "4")}
    env = DistEnv.from_environ({**base, **torchrun_env(6, 2, 4, 2, 1)})
    assert (env.rank, env.local_rank, env.world_size, env.node_rank, env.source) == (6, 2, 8, 1, "torchrun")


# ------------------------------------------------------------------------------ SLURM without torchrun
@pytest.mark.parametrize("procid,expected", [
    # tasks per node 2(x2),1 on nodes gpu[01-02],cpu7: (local id, node id, tasks on the node)
    (0, (0, 0, 2)), (1, (1, 0, 2)), (2, (0, 1, 2)), (3, (1, 1, 2)), (4, (0, 2, 1)),
])
def test_slurm_heterogeneous_nodes(procid, expected):
    localid, nodeid, local_world = expected
    e = slurm_env(procid, localid, nodeid, 5, "2(x2),1", "gpu[01-02],cpu7")
    env = DistEnv.from_environ(e)
    assert (env.rank, env.world_size, env.local_rank, env.node_rank, env.local_world_size) == (
        procid, 5, localid, nodeid, local_world)
    assert env.source == "slurm"
    assert env.master_addr == "gpu01"
    # every task of the job derives the same port from the job id, without talking
    assert env.master_port == DistEnv.from_environ(slurm_env(0, 0, 0, 5, "2(x2),1", "gpu[01-02],cpu7")).master_port


def test_slurm_exported_master_and_ntasks_per_node():
    e = slurm_env(3, 1, 1, 4, "", "n[1-2]", MASTER_ADDR="n1-ib", MASTER_PORT="29400", SLURM_NTASKS_PER_NODE="2")
    env = DistEnv.from_environ(e)
    assert (env.master_addr, env.master_port, env.local_world_size, env.num_nodes) == ("n1-ib", 29400, 2, 2)


def test_slurm_job_id_port_differs_between_jobs():
    a = DistEnv.from_environ(slurm_env(0, 0, 0, 2, "2", "n1", job_id="1000"))
    b = DistEnv.from_environ(slurm_env(0, 0, 0, 2, "2", "n1", job_id="1001"))
    assert a.master_port != b.master_port
    assert 1024 < a.master_port < 65536


@pytest.mark.parametrize("nodelist,first", [
    ("node[003-005,007],gpu1", "node003"),
    ("gpu1,node[003-005]", "gpu1"),
    ("rack[1-2]-gpu[01-08]", "rack1-gpu01"),
    ("a-b-c", "a-b-c"),
    ("n[9,10]", "n9"),
    ("", "127.0.0.1"),
])
def test_first_slurm_host(nodelist, first):
    assert _first_slurm_host(nodelist) == first


# ------------------------------------------------------------------------------ Kubeflow PyTorchJob
@pytest.mark.parametrize("replica,index,rank", [("master", 0, 0), ("worker", 0, 1), ("worker", 2, 3)])
def test_pytorchjob_without_torchrun_one_process_per_pod(replica, index, rank):
    env = DistEnv.from_environ(pytorchjob_env(replica, index, workers=3))
    assert (env.rank, env.world_size, env.node_rank) == (rank, 4, rank)
    assert (env.local_rank, env.local_world_size, env.num_nodes) == (0, 1, 4)
    assert (env.master_addr, env.master_port, env.source) == ("train-master-0", 23456, "pytorchjob")


def test_pytorchjob_nproc_per_node_without_torchrun_is_a_clear_error():
    with pytest.raises(ValueError, match="torchrun"):
        DistEnv.from_environ(pytorchjob_env("worker", 0, workers=1, nproc_per_node="2"))


def test_pytorchjob_with_torchrun_in_the_pod():
    """The checked-in manifests run torchrun in each pod: worker pod 0 is node 1."""
    pod = pytorchjob_env("worker", 0, workers=1, nproc_per_node="2")
    env = DistEnv.from_environ({**pod, **torchrun_env(3, 1, 2, 2, 1, MASTER_ADDR="train-master-0")})
    assert (env.rank, env.local_rank, env.world_size, env.node_rank, env.source) == (3, 1, 4, 1, "torchrun")


def test_elastic_pytorchjob_pod_env_alone_is_not_distributed():
    """An elastic PyTorchJob pod has no RANK/WORLD_SIZE until torchrun's rendezvous: only torchrun
    (the manifest's command) can start it, and DistEnv does not invent a world from PET_ variables."""
    assert DistEnv.from_environ(pytorchjob_env("worker", 0, workers=2, elastic=True)).world_size == 1


def test_nothing_set_is_single_process():
    env = DistEnv.from_environ({"PATH": "/usr/bin"})
    assert (env.rank, env.world_size, env.source, env.is_distributed) == (0, 1, "single", False)


def test_inconsistent_values_fail_with_a_message():
    with pytest.raises(ValueError, match="outside world size"):
        DistEnv.from_environ(slurm_env(4, 0, 2, 4, "2(x2)", "n[1-2]"))


# ------------------------------------------------------------------------------ a real torchrun, two nodes
PROBE = """
import json, os, sys
import torch.distributed as dist
from disttrain.env import DistEnv, init_process_group
import torch
env = DistEnv.from_environ()
init_process_group(env, "gloo", 60, torch.device("cpu"))
seen = [None] * env.world_size
dist.all_gather_object(seen, {"node": env.node_rank, "local": env.local_rank})
out = {"rank": env.rank, "world": env.world_size, "local_rank": env.local_rank, "node": env.node_rank,
       "local_world": env.local_world_size, "source": env.source,
       "dist_rank": dist.get_rank(), "dist_world": dist.get_world_size(), "seen": seen}
open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w").write(json.dumps(out))
dist.destroy_process_group()
"""


@pytest.mark.timeout(120)
def test_real_torchrun_two_nodes_agree_with_torch_distributed(tmp_path):
    """Two torchrun agents (two "nodes", c10d rendezvous on loopback), two workers each: DistEnv's
    rank / world size match what torch.distributed reports after the rendezvous, every node rank
    holds exactly its local ranks 0..1."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=envprobe",
             str(probe), str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for _ in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r in results:
        assert (r["rank"], r["world"]) == (r["dist_rank"], r["dist_world"]) == (r["rank"], 4)
        assert r["source"] == "torchrun" and r["local_world"] == 2
    by_node = {}
    for s in results[0]["seen"]:
        by_node.setdefault(s["node"], []).append(s["local"])
    assert {k: sorted(v) for k, v in by_node.items()} == {0: [0, 1], 1: [0, 1]}
