"""Launching points: every point is a real ``torchrun`` launch (``-m disttrain`` for disttrain,
``benchmarks/raw_ddp.py`` for the raw reference, ``-m benchmarks.comm`` for collectives), with a
timeout that kills the whole process group. Results come back as per-rank record files."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from benchmarks import stats

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "disttrain" / "conf"
# strategies that need an engine installed besides their config file
ENGINES = {"deepspeed": "deepspeed", "horovod": "horovod.torch"}


# ---------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """An MLP regressor on synthetic data: ``in_features -> hidden x depth -> 1``."""

    name: str
    in_features: int
    hidden: int
    depth: int
    per_rank_batch: int

    @property
    def params(self) -> int:
        return mlp_params(self.in_features, self.hidden, self.depth, 1)


def mlp_params(in_features: int, hidden: int, depth: int, out_features: int = 1) -> int:
    return in_features * hidden + hidden + (depth - 1) * (hidden * hidden + hidden) + hidden * out_features + out_features


def hidden_for_params(target: int, in_features: int, depth: int, out_features: int = 1) -> int:
    """The width whose MLP has about ``target`` parameters (solves the quadratic)."""
    a = depth - 1
    b = in_features + 1 + (depth - 1) + out_features
    c = out_features - target
    h = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a) if a else -c / b
    return max(1, int(round(h)))


def model_spec(name: str, cfg: Any) -> ModelSpec:
    hidden = cfg.get("hidden")
    if not hidden:
        hidden = hidden_for_params(int(cfg.target_params), int(cfg.in_features), int(cfg.depth))
    return ModelSpec(name, int(cfg.in_features), int(hidden), int(cfg.depth), int(cfg.per_rank_batch))


# ---------------------------------------------------------------------- strategies
def strategy_status(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """For each name: whether it can run here, its class, and why not. A strategy is available
    when ``conf/strategy/<name>.yaml`` exists, its class's module is importable and its engine
    (DeepSpeed, Horovod) is installed, so strategies join the sweep as they land."""
    from omegaconf import OmegaConf

    out: dict[str, dict[str, Any]] = {}
    for name in names:
        path = CONF_DIR / "strategy" / f"{name}.yaml"
        if not path.is_file():
            out[name] = {"available": False, "reason": f"no conf/strategy/{name}.yaml yet"}
            continue
        target = str(OmegaConf.load(path).get("_target_", ""))
        module = target.rpartition(".")[0]
        try:
            found = bool(module) and importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out[name] = {"available": False, "reason": f"{target or '_target_'} not importable", "target": target}
            continue
        engine = ENGINES.get(name)
        if engine:
            try:
                has = importlib.util.find_spec(engine) is not None
            except (ImportError, ValueError):
                has = False
            if not has:
                out[name] = {"available": False, "reason": f"engine {engine} not installed", "target": target}
                continue
        out[name] = {"available": True, "reason": "", "target": target}
    return out


def cannot_run(name: str, world: int) -> str | None:
    """Why strategy ``name`` refuses ``world`` ranks (its own ``validate``, e.g. fsdp at N=1), or
    None: such points are skipped instead of launched to fail."""
    from disttrain.env import DistEnv
    from disttrain.errors import ConfigError
    from disttrain.registry import build_strategy

    try:
        build_strategy(name).validate(DistEnv(rank=0, world_size=world, local_world_size=world))
    except ConfigError as exc:
        return str(exc)
    return None


def data_parallel_size(name: str, world: int) -> int:
    """How many data shards strategy ``name`` makes of ``world`` ranks (servers and pipeline
    stages do not add shards), asked of the strategy itself; ``world`` if it cannot say."""
    try:
        from disttrain.env import DistEnv
        from disttrain.registry import build_strategy

        return int(build_strategy(name).data_shard(DistEnv(rank=0, world_size=world, local_world_size=world))[1])
    except Exception:
        return world


# ---------------------------------------------------------------------- launching
RUNNING: set[subprocess.Popen] = set()  # launches in flight (their own sessions), for kill_running()


def kill_running(*_: Any) -> None:
    """Kill every launch in flight with its whole process group (on SIGTERM/SIGINT of the tool:
    torchrun runs in its own session, so it would otherwise outlive us)."""
    for proc in list(RUNNING):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def torchrun(args: Sequence[str], nproc: int, log: Path, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """``torchrun --standalone --nproc_per_node=N <args>`` from the repo root; output to ``log``.
    Returns (exit code, output tail); on timeout the process group is killed, code 124."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full.get("PYTHONPATH", "")) if p)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "DISTTRAIN_RUN_ID"):
        full.pop(var, None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.add(proc)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
        finally:
            RUNNING.discard(proc)
    return rc, log.read_text()[-3000:]


def load_records(record_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(record_dir.glob("rank*.json"))]


@dataclass
class Point:
    """One launch's measurement."""

    kind: str
    strategy: str
    model: str
    world_size: int
    per_rank_batch: int
    global_batch: int
    status: str = "ok"
    error: str = ""
    samples_per_sec: float = math.nan
    step_ms: dict | None = None
    breakdown_ms: dict | None = None
    peak_rss_mb: list | None = None
    peak_gpu_mb: list | None = None
    device: str = ""
    wall_s: float = math.nan
    params: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def analyze(point: Point, records: list[dict[str, Any]], warmup: int) -> Point:
    """Fill ``point`` from the launch's per-rank records (warm-up steps excluded)."""
    trained = [r for r in records if r.get("steps")]
    if not trained:
        point.status, point.error = "failed", point.error or "no step records"
        return point
    rate, spread = stats.throughput(trained, point.global_batch, warmup)
    point.samples_per_sec = rate
    point.step_ms = {k: (v * 1e3 if k != "n" else v) for k, v in spread.items()}
    bd = stats.breakdown({int(r["rank"]): r["steps"] for r in trained}, warmup)
    point.breakdown_ms = {k: v * 1e3 for k, v in bd.items()}
    point.peak_rss_mb = [round(float(r["peak_rss_mb"]), 1) for r in sorted(records, key=lambda r: r["rank"])]
    gpu = [r.get("peak_gpu_allocated_mb") for r in sorted(records, key=lambda r: r["rank"])]
    point.peak_gpu_mb = [round(float(g), 1) for g in gpu] if all(g is not None for g in gpu) else None
    point.device = records[0].get("device_name", "")
    return point


def disttrain_overrides(spec: ModelSpec, strategy: str, target: str, world: int, dp: int, steps: int,
                        record_dir: Path, run_dir: Path, probe_comm: bool, accelerator: str,
                        extra: Sequence[str] = ()) -> tuple[list[str], int]:
    """The ``-m disttrain`` overrides for one point and its global batch (weak scaling: each data
    shard gets ``per_rank_batch`` samples)."""
    global_batch = spec.per_rank_batch * dp
    overrides = [
        f"strategy={strategy}", "model=mlp", "data=synthetic", "optimizer=adam", "scheduler=none",
        f"model.in_features={spec.in_features}", f"model.hidden={spec.hidden}", f"model.depth={spec.depth}",
        "model.out_features=1", f"data.dataset.in_features={spec.in_features}", "data.dataset.out_features=1",
        f"data.dataset.num_samples={(steps + 1) * global_batch}", f"data.batch_size={global_batch}",
        f"trainer.max_steps={steps}", "trainer.max_epochs=1", "trainer.progress_bar=false",
        f"accelerator={accelerator}",
        "strategy._target_=benchmarks.probe.probed", f"+strategy.base={target}",
        f"+strategy.record_dir={record_dir}", f"+strategy.probe_comm={str(probe_comm).lower()}",
        f"hydra.run.dir={run_dir}", *extra,
    ]
    return overrides, global_batch


def run_disttrain(spec: ModelSpec, strategy: str, target: str, world: int, steps: int, warmup: int, work: Path,
                  tag: str, timeout: float, probe_comm: bool = True, accelerator: str = "auto",
                  extra: Sequence[str] = (), kind: str = "scaling") -> Point:
    dp = data_parallel_size(strategy, world)
    rec = work / tag / "records"
    overrides, gb = disttrain_overrides(spec, strategy, target, world, dp, warmup + steps, rec, work / tag / "run",
                                       probe_comm, accelerator, extra)
    point = Point(kind, strategy, spec.name, world, spec.per_rank_batch, gb, params=spec.params)
    t0 = time.perf_counter()
    rc, tail = torchrun(["-m", "disttrain", *overrides], world, work / tag / "launch.log", timeout)
    point.wall_s = time.perf_counter() - t0
    if rc != 0:
        point.status, point.error = "failed", f"exit {rc}: " + _last_error(tail)
        return point
    return analyze(point, load_records(rec), warmup)


def run_raw(spec: ModelSpec, world: int, steps: int, warmup: int, work: Path, tag: str, timeout: float) -> Point:
    rec = work / tag / "records"
    gb = spec.per_rank_batch * world
    args = [str(ROOT / "benchmarks" / "raw_ddp.py"), "--record-dir", str(rec), "--in-features", str(spec.in_features),
            "--hidden", str(spec.hidden), "--depth", str(spec.depth), "--batch", str(gb), "--steps", str(warmup + steps)]
    point = Point("overhead", "raw_ddp", spec.name, world, spec.per_rank_batch, gb, params=spec.params)
    t0 = time.perf_counter()
    rc, tail = torchrun(args, world, work / tag / "launch.log", timeout)
    point.wall_s = time.perf_counter() - t0
    if rc != 0:
        point.status, point.error = "failed", f"exit {rc}: " + _last_error(tail)
        return point
    return analyze(point, load_records(rec), warmup)


def run_comm(world: int, sizes: Sequence[int], iters: int, warmup: int, grad: Any, work: Path, timeout: float) -> dict:
    out = work / f"comm_{world}" / "comm.json"
    args = ["-m", "benchmarks.comm", "--out", str(out), "--iters", str(iters), "--warmup", str(warmup),
            "--sizes", *map(str, sizes), "--grad-width", str(grad.width), "--grad-tensors", str(grad.tensors),
            "--grad-batch", str(grad.batch), "--grad-iters", str(grad.iters)]
    rc, tail = torchrun(args, world, work / f"comm_{world}" / "launch.log", timeout)
    if rc != 0 or not out.is_file():
        return {"world_size": world, "status": "failed", "error": f"exit {rc}: " + _last_error(tail)}
    return {"status": "ok", **json.loads(out.read_text())}


def _last_error(tail: str) -> str:
    lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
    keys = ("Error", "error", "Exception")
    hits = [ln for ln in lines if any(k in ln for k in keys)]
    return (hits[-1] if hits else (lines[-1] if lines else ""))[:400]
