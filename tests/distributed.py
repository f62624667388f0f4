"""Helpers for tests on real processes: spawned gloo workers and real torchrun launches.

Every helper has a timeout and kills what it started, so no test can hang CI or leak a process.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str, env: dict) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **env,
    )
    import torch

    torch.set_num_threads(1)
    try:
        result: Any = ("ok", fn(*args))
    except BaseException as exc:  # report, don't hang the parent
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        from disttrain.env import destroy_process_group

        destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = 120, env: dict | None = None
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned processes wired up like torchrun would
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT on loopback). Returns each rank's return value; raises
    with the failing rank's traceback, or after ``timeout`` seconds with every process killed.
    ``fn`` must be importable (module level)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_dir, env or {}), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join(5)
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            (results if status == "ok" else errors).append(value)
        if alive:
            raise TimeoutError(f"{len(alive)} of {world_size} ranks still running after {timeout}s; killed. {errors}")
        if errors:
            raise RuntimeError("\n".join(errors))
        bad_exit = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad_exit:
            raise RuntimeError(f"ranks exited with non-zero codes (rank, code): {bad_exit}")
        return results


def run_torchrun(
    overrides: Sequence[str],
    nproc: int = 2,
    cwd: Path | None = None,
    timeout: float = 240,
    env: dict | None = None,
    module: str = "disttrain",
    torchrun_args: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m disttrain <overrides>`` as a user runs it.
    On timeout the whole process group is killed and TimeoutError raised with the output."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        *torchrun_args, "-m", module, *overrides,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        cmd, cwd=cwd or ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise TimeoutError(f"torchrun did not finish in {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def run_python(args: Sequence[str], cwd: Path | None = None, timeout: float = 120, env: dict | None = None):
    """``python <args>`` in a subprocess with a timeout (single-process CLI runs)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
