"""Reliability on real processes: kill-and-restart equals an uninterrupted run, a failure on one
rank ends every rank with its traceback, desync is named instead of hanging, uneven inputs
finish, a run resumes at another world size, and what the job listens on is bound as configured.

The oracle is always an uninterrupted run of the same job; nothing is hard-coded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed import ROOT, run_distributed

# A small job that exercises every piece of state: Adam moments, an LR schedule, dropout (the
# RNG), mid-epoch checkpoints (the data position). 256 samples / batch 32 = 8 steps per epoch.
JOB = [
    "experiment=regression_exact", "model=mlp", "model.hidden=16", "model.dropout=0.1", "optimizer=adam",
    "scheduler=step", "scheduler.step_size=5", "data.dataset.num_samples=256", "trainer.max_epochs=2",
    "trainer.checkpoint_every_n_steps=3", "trainer.resume=auto", "trainer.log_every_n_steps=4",
    "dist.timeout_s=30",
]
FINAL = "step_00000016.pt"


def _torchrun(run_dir: Path, extra=(), env=None, torchrun_args=(), timeout=200, watch=None, launcher="disttrain.torchrun"):
    """``python -m disttrain.torchrun`` (torchrun whose stores listen on the configured address)
    in its own session; ``watch(pid)`` is polled while it runs. Kills the whole group at the end."""
    cmd = [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node=2", *torchrun_args,
           "-m", "disttrain", *JOB, f"hydra.run.dir={run_dir}", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DISTTRAIN_FAULT"):
        if var not in (env or {}):
            full_env.pop(var, None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        if watch is not None:
            while proc.poll() is None and time.monotonic() < deadline:
                watch(proc.pid)
                time.sleep(0.2)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise TimeoutError(f"torchrun did not finish in {timeout}s\n{out[-4000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out


def _descendants(root: int) -> set[int]:
    """``root`` and every process below it (torchrun starts its workers in sessions of their own,
    so a process group does not find them: follow the parent links in /proc instead)."""
    parents: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            parents[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def _listening_sockets(root: int) -> set[tuple[str, int, int]]:
    """(local address, port, pid) of every listening TCP socket of ``root`` and its descendants
    (the launcher, torchrun's agent and every worker), from /proc/net/tcp{,6} matched to the
    processes' socket inodes."""
    found = set()
    for pid in _descendants(root):
        try:
            inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                      if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
            for table in ("tcp", "tcp6"):
                for line in open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]:
                    f = line.split()
                    if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                        addr, port = f[1].split(":")
                        found.add((_decode_addr(addr), int(port, 16), int(pid)))
        except (OSError, ProcessLookupError):
            continue
    return found


def _decode_addr(hexaddr: str) -> str:
    import ipaddress

    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def _processes_mentioning(token: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token in open(f"/proc/{pid}/cmdline").read():
                pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """The uninterrupted run (the oracle for the kill test), watched for listening sockets."""
    run_dir = tmp_path_factory.mktemp("oracle")
    sockets: set = set()
    rc, out = _torchrun(run_dir, watch=lambda pid: sockets.update(_listening_sockets(pid)))
    assert rc == 0, out[-4000:]
    return torch.load(run_dir / "checkpoints" / FINAL, weights_only=True), sockets, out


# ------------------------------------------------------------------------ 1-3: kill and restart
@pytest.mark.timeout(420)
def test_sigkill_mid_run_restarts_and_matches_uninterrupted(oracle, tmp_path: Path) -> None:
    want, _, _ = oracle
    rc, out = _torchrun(tmp_path, torchrun_args=["--max-restarts=1"], env={"DISTTRAIN_FAULT": "kill@1:7"},
                        launcher="torch.distributed.run", timeout=150)
    assert rc == 0, out[-4000:]
    assert "exitcode: -9" in out  # rank 1 really died by SIGKILL on the first attempt
    assert "resumed from" in out and "step_00000006.pt at step 6" in out  # the last checkpoint before the kill
    got = torch.load(tmp_path / "checkpoints" / FINAL, weights_only=True)
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), f"parameter {k} differs from the uninterrupted run"
    # the same per-step loss sequence (rank 0's local losses of all 16 steps, across the restart)
    assert torch.equal(got["extra"]["loss_history"], want["extra"]["loss_history"])
    assert got["extra"]["loss_history"].shape[0] == 16
    for k, v in want["optimizer"]["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][k][n], t) for n, t in v.items() if torch.is_tensor(t))


# ------------------------------------------------------------------------ preemption
@pytest.mark.timeout(420)
def test_sigterm_checkpoints_at_an_agreed_step_and_resume_matches_uninterrupted(oracle, tmp_path: Path) -> None:
    """The scheduler stops the job: SIGTERM reaches the torchrun agent (sent here by rank 0 itself
    after step 5, as Kubernetes or scancel would), the agent forwards it to every worker, each
    finishes its step, they agree on one step, the job checkpoints there and exits with 75
    (EXIT_PREEMPTED). A relaunch with resume=auto ends with the uninterrupted run's weights."""
    want, _, _ = oracle
    rc, out = _torchrun(tmp_path, env={"DISTTRAIN_FAULT": "term@0:5"}, timeout=150)
    assert rc != 0, out[-4000:]
    stopped = re.findall(r"stopped on SIGTERM after step (\d+); checkpoint (\S+) written", out)
    assert len(stopped) == 2, out[-4000:]  # both ranks, the same step and file
    assert len(set(stopped)) == 1, stopped
    step = int(stopped[0][0])
    assert 5 < step < 16 and Path(stopped[0][1]).is_file()
    assert "disttrain.torchrun: stopped by SIGTERM" in out and "Traceback" not in out
    rc, out = _torchrun(tmp_path, timeout=150)
    assert rc == 0, out[-4000:]
    assert f"at step {step}" in out and "resumed from" in out
    got = torch.load(tmp_path / "checkpoints" / FINAL, weights_only=True)
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), f"parameter {k} differs from the uninterrupted run"
    assert torch.equal(got["extra"]["loss_history"], want["extra"]["loss_history"])


# ------------------------------------------------------------------------ 8: what listens
@pytest.mark.timeout(420)
def test_listening_sockets_bound_to_loopback(oracle) -> None:
    """Every TCP socket the single-node job listened on (the rendezvous and worker stores, the
    workers' gloo sockets), read from /proc/net/tcp{,6} while it ran, is on loopback."""
    _, sockets, _ = oracle
    assert len({pid for *_, pid in sockets}) >= 3, f"the watcher missed the agent or a worker: {sockets}"
    exposed = sorted(s for s in sockets if s[0] not in ("127.0.0.1", "::1"))
    assert not exposed, f"listening beyond loopback (address, port, pid): {exposed}"


def test_bind_address_choice(monkeypatch) -> None:
    from disttrain.torchrun import bind_address

    monkeypatch.delenv("DISTTRAIN_BIND_ADDR", raising=False)
    assert bind_address(["--standalone", "--nproc_per_node=2"]) == "127.0.0.1"
    # another machine's rendezvous: this node's address on the route to it, never every interface
    from disttrain.torchrun import route_address

    assert bind_address(["--nnodes=2", "--rdzv-endpoint=10.0.0.1:29500"]) == route_address("10.0.0.1")
    assert bind_address(["--nnodes=1", "--rdzv-endpoint=localhost:29500"]) == "127.0.0.1"
    monkeypatch.setenv("DISTTRAIN_BIND_ADDR", "10.0.0.7")
    assert bind_address(["--nnodes=2"]) == "10.0.0.7"


# ------------------------------------------------------------------------ 4: failure propagation
@pytest.mark.timeout(300)
def test_exception_on_one_rank_ends_every_rank_with_traceback(tmp_path: Path) -> None:
    token = str(tmp_path / "run")
    rc, out = _torchrun(Path(token), env={"DISTTRAIN_FAULT": "data@1:3"}, timeout=200)
    assert rc != 0, out[-4000:]
    root = out[out.index("Root Cause"):]
    assert "rank      : 1" in root  # the failing rank is named ...
    assert "InjectedFault: injected fault data@1:3" in root and "Traceback" in root  # ... with its traceback
    assert "error_file: <N/A>" not in root  # from the @record error file, not a guess
    time.sleep(1.0)
    assert _processes_mentioning(token) == [], "a process of the failed job is still running"


def _failing_trainer_worker(fault: str, run_dir: str):
    os.environ["DISTTRAIN_FAULT"] = fault
    from disttrain.data import synthetic_regression
    from disttrain.session import Session
    from disttrain.trainer import Trainer, TrainerConfig

    s = Session("ddp", timeout_s=20, seed=0)
    model = torch.nn.Linear(8, 1)
    cfg = TrainerConfig(max_epochs=1, checkpoint_every_n_steps=2, log_every_n_steps=1)
    trainer = Trainer(s, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(),
                      synthetic_regression(128)[0], batch_size=16, config=cfg, run_dir=Path(run_dir))
    try:
        trainer.fit()
    finally:
        del trainer
        s.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["raise@1:3", "save@0:4"])
def test_exception_without_torchrun_ends_the_other_rank(fault: str, tmp_path: Path) -> None:
    """Without an agent to kill the others, the surviving rank's collective fails (peer gone, or
    ``dist.timeout_s``) and it exits with an error too: nobody hangs."""
    with pytest.raises(RuntimeError) as info:
        run_distributed(_failing_trainer_worker, 2, fault, str(tmp_path), timeout=150)
    msg = str(info.value)
    assert "InjectedFault" in msg and msg.count("rank ") >= 2, msg  # both ranks ended with an error


# ------------------------------------------------------------------------ 5: desync
def _desync_worker(what: str):
    from disttrain.fingerprint import DesyncError
    from disttrain.session import Session

    s = Session("ddp", timeout_s=30)
    rank = s.rank
    hidden = 16 if (what != "model" or rank == 0) else 12
    model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Linear(hidden, 1))
    config = {"optimizer.lr": 0.1, "seed": rank if what == "config" else 0}
    try:
        s.verify_same_job(model, config)
    except DesyncError as exc:
        return str(exc)
    finally:
        s.close()
    return None


@pytest.mark.timeout(120)
def test_model_and_config_mismatch_are_named_on_every_rank() -> None:
    for what, expect in (("model", "model parameter 0.weight: rank 0 has shape (16, 8) torch.float32, rank 1 has shape (12, 8)"),
                         ("config", "config seed: rank 0 has 0, rank 1 has 1")):
        messages = run_distributed(_desync_worker, 2, what, timeout=100)
        assert all(m is not None and expect in m for m in messages), messages


# ------------------------------------------------------------------------ 6: uneven inputs
def _uneven_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _uneven_batches(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(5, 4, generator=g), torch.randn(5, 1, generator=g)) for _ in range(3 + 2 * rank)]


def _uneven_worker():
    import disttrain

    ds = disttrain.setup(strategy="ddp", timeout_s=30)
    model, opt = ds.prepare(_uneven_model(), torch.optim.SGD(_uneven_model().parameters(), lr=0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ds.join():  # rank 0 has 3 batches, rank 1 has 5: a user's own sharding of unequal files
        for x, y in _uneven_batches(ds.rank):
            ds.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()
    state = {k: v.clone() for k, v in ds.unwrap(model).state_dict().items()}
    ds.close()
    return state


@pytest.mark.timeout(120)
def test_uneven_inputs_finish_with_identical_parameters() -> None:
    states = run_distributed(_uneven_worker, 2, timeout=100)
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"{k} differs across ranks"
    # oracle: each step averages the gradients of the ranks that still have data over the world
    # (a joined rank contributes zeros), as torch's Join documents
    model = _uneven_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [_uneven_batches(r) for r in range(2)]
    for i in range(max(map(len, batches))):
        opt.zero_grad()
        for r in range(2):
            if i < len(batches[r]):
                x, y = batches[r][i]
                (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
        opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(states[0][k], v, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ 7: another world size
def _world_worker(run_dir: str, max_steps):
    from disttrain.data import synthetic_regression
    from disttrain.session import Session
    from disttrain.trainer import Trainer, TrainerConfig

    s = Session("ddp", timeout_s=60, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    cfg = TrainerConfig(max_epochs=2, max_steps=max_steps, checkpoint_every_n_steps=5, resume="auto", log_every_n_steps=50)
    trainer = Trainer(s, model, torch.optim.Adam(model.parameters(), lr=0.01), torch.nn.MSELoss(),
                      synthetic_regression(256)[0], batch_size=32, config=cfg, run_dir=Path(run_dir))
    trainer.fit()
    out = (trainer.step, {k: v.clone() for k, v in s.unwrap(trainer.model).state_dict().items()})
    del trainer
    s.close()
    return out


@pytest.mark.timeout(300)
@pytest.mark.slow  # the data position's remap is proven below, fsdp's resharding resume in test_fsdp.py
@pytest.mark.parametrize("before,after", [(4, 2)])
def test_resume_at_another_world_size(before: int, after: int, tmp_path: Path) -> None:
    want = run_distributed(_world_worker, before, str(tmp_path / "oracle"), None, timeout=140)[0]
    run_distributed(_world_worker, before, str(tmp_path / "run"), 5, timeout=140)  # stops mid-epoch at step 5
    got = run_distributed(_world_worker, after, str(tmp_path / "run"), None, timeout=140)[0]
    assert got[0] == want[0] == 16
    for k, v in want[1].items():  # same samples per step; only the reduction order differs
        torch.testing.assert_close(got[1][k], v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("before,after", [(4, 2), (2, 4), (3, 1)])
def test_data_position_maps_across_world_sizes(before: int, after: int) -> None:
    """Every sample of the epoch exactly once: the batches read at ``before`` ranks up to the
    saved position, then at ``after`` ranks from the remapped position (per-rank sampler views
    built without a process group, exactly as each rank builds its own)."""
    from torch.utils.data import DataLoader, TensorDataset

    from disttrain.loaders import ShardedLoader, _ResumableSampler

    n, batch, done_steps, epoch = 96, 12, 3, 1
    data = TensorDataset(torch.arange(n))

    def loaders(world: int):
        out = []
        for r in range(world):
            sampler = _ResumableSampler(data, num_replicas=world, rank=r, shuffle=True, seed=7, drop_last=True)
            out.append(ShardedLoader(DataLoader(data, batch_size=batch // world, sampler=sampler, drop_last=True,
                                                generator=torch.Generator()), sampler, seed=7))
        return out

    seen = []
    for ld in loaders(before):
        ld.epoch = epoch
        for i, (x,) in enumerate(ld):
            if i == done_steps:
                break
            seen += x.tolist()
    for ld in loaders(after):
        ld.epoch, ld.skip = epoch, done_steps  # what the Trainer sets from samples_in_epoch
        for (x,) in ld:
            seen += x.tolist()
    assert sorted(seen) == list(range(n))
