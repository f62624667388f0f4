"""Multi-node on one machine, for real: two torchrun agents as two nodes, each started with the
checked-in ``launchers/multinode.sh`` (c10d rendezvous hosted by node 0), train the same job as one
node started with ``launchers/local.sh``; the final weights, the loss history and the eval metrics
must be identical.

The nodes get distinct addresses when this machine allows it: two network namespaces joined by a
veth pair (10.213.0.1 and 10.213.0.2, reachable only from inside those namespaces), gloo bound to
the veth. Without ``ip netns`` (not root, no iproute2) both nodes share loopback instead, which the
test says in its output (``-rs``). Nothing else is ever addressed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.distributed import ROOT, free_port

NS_SUBNET = "10.213.0"
# A tiny exact job: linear regression, SGD, 2 epochs (32 steps), a checkpoint per epoch.
OVERRIDES = ["experiment=regression_exact", "trainer.progress_bar=false", "trainer.log_every_n_steps=8"]


@dataclass
class Node:
    prefix: list[str]  # how to run a command "on" this node
    addr: str
    ifname: str | None


def _netns_usable() -> str | None:
    """None if network namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "not root"
    name = f"dt8probe-{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if ok.returncode != 0:
        return f"`ip netns add` failed: {ok.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@contextlib.contextmanager
def two_nodes():
    """Yield two Nodes: network namespaces joined by a veth pair, or loopback twice."""
    if os.environ.get("DISTTRAIN_TEST_NO_NETNS"):
        why_not: str | None = "DISTTRAIN_TEST_NO_NETNS is set"
    else:
        why_not = _netns_usable()
    if why_not is not None:
        print(f"two nodes on loopback ({why_not})")
        warnings.warn(f"test_multinode: both nodes on loopback, no network namespaces: {why_not}", stacklevel=2)
        yield [Node([], "127.0.0.1", None), Node([], "127.0.0.1", None)], why_not
        return
    tag = uuid.uuid4().hex[:6]
    names = [f"dt8n0-{tag}", f"dt8n1-{tag}"]
    ifs = ["dtveth0", "dtveth1"]  # created inside the namespaces: no clash with anything outside
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True)  # noqa: E731
    try:
        for n in names:
            run("ip", "netns", "add", n)
            run("ip", "-n", n, "link", "set", "lo", "up")
        run("ip", "link", "add", ifs[0], "netns", names[0], "type", "veth", "peer", "name", ifs[1], "netns", names[1])
        nodes = []
        for i, (n, ifname) in enumerate(zip(names, ifs)):
            addr = f"{NS_SUBNET}.{i + 1}"
            run("ip", "-n", n, "addr", "add", f"{addr}/24", "dev", ifname)
            run("ip", "-n", n, "link", "set", ifname, "up")
            nodes.append(Node(["ip", "netns", "exec", n], addr, ifname))
        print(f"two nodes in network namespaces {names}: {nodes[0].addr} and {nodes[1].addr}")
        yield nodes, None
    finally:
        for n in names:  # deleting a namespace removes its end of the veth pair
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def _env(extra: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # torchrun
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for var in ("DISTTRAIN_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(var, None)
    return env


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        outs = [p.communicate()[0] for p in procs]
        raise TimeoutError("torchrun did not finish:\n" + "\n----\n".join(o[-3000:] for o in outs)) from None
    return outs


def launch(script: str, overrides: list[str], cwd: Path, env: dict, prefix: list[str] = ()) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [*prefix, "bash", str(ROOT / "launchers" / script), *overrides], cwd=cwd, env=_env(env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def run_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs").glob("*")) if (cwd / "outputs").is_dir() else []


def final_state(run_dir: Path) -> dict:
    ckpt_dir = run_dir / "checkpoints"
    state = torch.load(ckpt_dir / (ckpt_dir / "latest").read_text().strip(), weights_only=True)
    return state


def assert_same_training(single: Path, multi: Path) -> None:
    s_sum = json.loads((single / "summary.json").read_text())
    m_sum = json.loads((multi / "summary.json").read_text())
    evals = {k: v for k, v in s_sum.items() if k.startswith("eval_")}
    assert evals, s_sum
    assert {k: m_sum.get(k) for k in evals} == evals
    assert m_sum["steps"] == s_sum["steps"] > 0
    s_state, m_state = final_state(single), final_state(multi)
    assert s_state["model"].keys() == m_state["model"].keys()
    for k, v in s_state["model"].items():
        assert torch.equal(v, m_state["model"][k]), k
    assert torch.equal(s_state["extra"]["loss_history"], m_state["extra"]["loss_history"])


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


# strategy -> (its overrides, what a rank other than 0 may write). The parameter server runs
# synchronously (max_staleness=0) so that its result is deterministic; colocated (the default),
# each node's rank trains and serves one shard; with dedicated servers the first worker (rank
# num_servers = 1, on node 1) would write the checkpoints taken during training.
STRATEGIES = {
    "ddp": ([], ()),
    "parameter_server": (["strategy.max_staleness=0"], ("checkpoints",)),
}


@pytest.mark.timeout(200)
# network namespaces, minutes: --full (two torchrun agents as two nodes on loopback: test_env.py, every run)
@pytest.mark.parametrize("strategy", [pytest.param(s, marks=pytest.mark.slow) for s in STRATEGIES])
def test_two_nodes_equal_one_node(strategy, tmp_path):
    if not (ROOT / "conf" / "strategy" / f"{strategy}.yaml").exists():
        pytest.skip(f"conf/strategy/{strategy}.yaml has not landed yet")
    extra_overrides, others_write = STRATEGIES[strategy]
    overrides = [*OVERRIDES, f"strategy={strategy}", *extra_overrides]

    with two_nodes() as (nodes, why_not):
        # the oracle, at the same time: one node, two processes
        single = launch("local.sh", overrides, tmp_path / "single", {"NPROC": "2"})
        port = 29500 if why_not is None else free_port()  # inside private namespaces any port is free
        procs = []
        for i, node in enumerate(nodes):
            env = {"NNODES": "2", "NPROC": "1", "RDZV_HOST": nodes[0].addr, "RDZV_PORT": str(port),
                   "RDZV_ID": f"test-{strategy}", "MAX_RESTARTS": "0"}
            if node.ifname:  # a node whose name does not resolve to its address: say who hosts
                env.update(LOCAL_ADDR=node.addr, GLOO_SOCKET_IFNAME=node.ifname, RDZV_CONF=f"is_host={int(i == 0)}")
            procs.append(launch("multinode.sh", overrides, tmp_path / f"node{i}", env, node.prefix))
        outs = _wait_all([single, *procs], timeout=170)
    for p, o in zip([single, *procs], outs):
        assert p.returncode == 0, o[-4000:]
    (single_dir,) = run_dirs(tmp_path / "single")

    # one run directory, agreed by both nodes through torchrun's store; only global rank 0 writes
    (node0_dir,) = run_dirs(tmp_path / "node0")
    assert run_dirs(tmp_path / "node1") == [tmp_path / "node1" / "outputs" / node0_dir.name]
    node1_run = tmp_path / "node1" / "outputs" / node0_dir.name
    assert [p for p in files_under(node1_run) if p.relative_to(node1_run).parts[0] not in others_write] == []
    assert (node0_dir / "summary.json").is_file() and (node0_dir / ".hydra" / "config.yaml").is_file()
    assert_same_training(single_dir, node0_dir)
