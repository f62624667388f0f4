"""Interrupted and resumed runs equal uninterrupted ones for every strategy, and no strategy's
checkpoint files can run code when loaded, through the app (``trainer.resume``) or ``ds.load``.

Launches are shared to keep CI short: one spawned job runs the uninterrupted references, the
stop-by-``max_steps`` run and every payload check (strategy after strategy, each on its own port);
one job per strategy is killed mid-run (a rank SIGKILLs itself after step 7, the checkpoint of
step 6 is on disk); one job resumes them all. The oracle is always the uninterrupted run.
(DDP's kill-and-restart under torchrun is in test_reliability.py; FSDP's and the pipeline's in
their own test files.)
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_checkpoint import _Payload

# (name, strategy, options): strategies whose killed runs are resumed here
# (dedicated parameter servers resume exactly in test_parameter_server.py's mid-run checkpoint test)
RESUMABLE = [
    ("ps-colocated", "parameter_server", {"servers": "colocated", "max_staleness": 0}),
    ("zero3", "deepspeed", {"zero_stage": 3}),
    ("horovod", "horovod", {"rendezvous_timeout_s": 15}),
]
PS_DEDICATED = {"servers": "dedicated", "num_servers": 1, "max_staleness": 0}
PAYLOAD = [
    ("ddp", "ddp", {}),
    ("ps", "parameter_server", PS_DEDICATED),
    ("zero1", "deepspeed", {"zero_stage": 1}),
    ("zero3", "deepspeed", {"zero_stage": 3}),
    ("pipeline", "model_parallel", {"microbatches": 2}),
    ("fsdp", "fsdp", {}),
    ("horovod", "horovod", {}),
]
STEPS, KILL_AT = 12, 7


def _trainer(strategy: str, options: dict, run_dir: str, max_steps: int, resume: Any, port_offset: int,
             timeout_s: float = 60, session: Any = None):
    from disttrain.data import synthetic_regression
    from disttrain.session import Session
    from disttrain.trainer import Trainer, TrainerConfig

    os.environ["MASTER_PORT"] = str(int(os.environ["DT_BASE_PORT"]) + port_offset)
    s = session or Session(strategy, timeout_s=timeout_s, seed=0, **options)
    torch.manual_seed(0)
    model = s.build_model(lambda: torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1)))
    cfg = TrainerConfig(max_epochs=10, max_steps=max_steps, checkpoint_every_n_steps=3, resume=resume,
                        progress_bar=False, log_every_n_steps=100, check_in_sync=False)
    trainer = Trainer(s, model, torch.optim.Adam(model.parameters(), lr=0.01), torch.nn.MSELoss(),
                      synthetic_regression(num_samples=128, in_features=8, seed=3)[0], batch_size=16,
                      config=cfg, run_dir=Path(run_dir))
    return s, trainer


def _fit(strategy: str, options: dict, run_dir: str, max_steps: int, resume: Any, port_offset: int,
         timeout_s: float = 60) -> dict:
    """Train; return the final weights (on every rank), the last step and the steps trained now."""
    s, trainer = _trainer(strategy, options, run_dir, max_steps, resume, port_offset, timeout_s)
    taken = []
    step = s.train_step
    s.train_step = lambda *a, **k: (taken.append(1), step(*a, **k))[1]  # counts this launch's steps
    try:
        trainer.fit()
        weights = {k: v.detach().cpu().clone() for k, v in s.snapshot()["model"].items()}
        return {"weights": weights, "step": trainer.step, "trained": len(taken)}
    finally:
        del trainer
        s.close()


def _plant(name: str, path: Path, marker: str) -> str:
    """Replace one file of checkpoint ``path`` with a crafted pickle; returns which file."""
    from disttrain.checkpoint import shards_dir

    payload = {"module": _Payload(marker), "model": _Payload(marker), "extra": {"step": 3}}
    if name == "fsdp":  # torch.distributed.checkpoint's metadata, which it would unpickle as it is
        (shards_dir(path) / ".metadata").write_bytes(pickle.dumps({"storage_meta": _Payload(marker)}))
        return ".metadata"
    shard_kind = {"zero1": "*optim_states.pt", "zero3": "*model_states.pt"}  # DeepSpeed's own files
    if name in shard_kind:
        shard = sorted(shards_dir(path).glob(shard_kind[name]))[0]
        torch.save(payload, shard)
        return shard.name
    torch.save(payload, path)  # the checkpoint file itself
    return path.name


def _payload_check(name: str, strategy: str, options: dict, root: str, offset: int) -> dict:
    """One step and a checkpoint, a payload planted in it, then both load paths on the same Session."""
    import torch.distributed as dist

    from disttrain.errors import ConfigError

    run_dir = Path(root) / f"payload-{name}"
    marker = str(Path(root) / f"pwned-{name}")
    s, trainer = _trainer(strategy, options, str(run_dir), 1, None, offset)
    seen = {}
    try:
        trainer.fit()
        path = run_dir / "checkpoints" / "step_00000001.pt"
        if int(os.environ["RANK"]) == 0:
            _plant(name, path, marker)
        dist.barrier()  # the payload is in place on every rank's view
        try:  # the plug-in face
            s.load(path)
            seen["ds.load"] = "loaded"
        except (pickle.UnpicklingError, ConfigError, RuntimeError) as exc:
            seen["ds.load"] = f"{type(exc).__name__}: {exc}"
        _, again = _trainer(strategy, options, str(run_dir / "again"), 1, str(path), offset, session=s)
        try:  # the app: trainer.resume=<file>
            again.fit()
            seen["app"] = "resumed"
        except ConfigError as exc:
            seen["app"] = f"ConfigError: {exc}"
    finally:
        del trainer
        s.close()
    seen["ran"] = os.path.exists(marker)
    return seen


def _references(root: str) -> dict:
    out: dict[str, Any] = {}
    offset = 0
    for name, strategy, options in RESUMABLE:
        out[name] = _fit(strategy, options, f"{root}/full-{name}", STEPS, None, offset)
        offset += 10
    # a parameter-server run stopped by max_steps mid-epoch (dedicated servers never run the
    # loop), and the uninterrupted run it must end equal to
    out["ps"] = _fit("parameter_server", PS_DEDICATED, f"{root}/full-ps", STEPS, None, offset)
    offset += 10
    out["ps-stopped"] = _fit("parameter_server", PS_DEDICATED, f"{root}/stopped-ps", STEPS // 2, None, offset)
    offset += 10
    for name, strategy, options in PAYLOAD:
        out[f"payload-{name}"] = _payload_check(name, strategy, options, root, offset)
        offset += 10
    return out


def _resume_all(root: str) -> dict:
    out = {}
    for i, (name, strategy, options) in enumerate(RESUMABLE):
        out[name] = _fit(strategy, options, f"{root}/killed-{name}", STEPS, "auto", 10 * i)
    out["ps-stopped"] = _fit("parameter_server", PS_DEDICATED, f"{root}/stopped-ps", STEPS, "auto", 40)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume"))
    from tests.distributed import free_port

    env = {"DT_BASE_PORT": str(free_port() + 100)}
    references = _merge(run_distributed(_references, 2, root, timeout=400, env=env))
    killed = {}
    for i, (name, strategy, options) in enumerate(RESUMABLE):
        with pytest.raises((RuntimeError, TimeoutError)) as info:
            run_distributed(_fit, 2, strategy, options, f"{root}/killed-{name}", STEPS, None, 0, 5,
                            timeout=90, env={**env, "DISTTRAIN_FAULT": f"kill@1:{KILL_AT}"})
        killed[name] = str(info.value)
    resumed = _merge(run_distributed(_resume_all, 2, root, timeout=300, env=env))
    return root, references, killed, resumed


def _merge(per_rank: list[dict]) -> dict:
    """Rank 0's results, with the steps trained counted on the rank that trained most (a
    parameter server's rank 0 serves and trains none)."""
    out = per_rank[0]
    for name, res in out.items():
        if "trained" in res:
            res["trained"] = max(r[name]["trained"] for r in per_rank)
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [n for n, _, _ in RESUMABLE])
def test_killed_run_resumes_to_the_uninterrupted_weights(runs, name):
    root, references, killed, resumed = runs
    assert "exit code -9" in killed[name], killed[name][-2000:]  # rank 1 really died mid-run
    latest = (Path(root) / f"killed-{name}" / "checkpoints" / "latest").read_text()
    assert resumed[name]["step"] == STEPS and resumed[name]["trained"] == STEPS - 6, (latest, resumed[name])
    want = references[name]["weights"]
    got = resumed[name]["weights"]
    for k in want:
        assert torch.equal(got[k], want[k]), f"{name}: parameter {k} differs from the uninterrupted run"


@pytest.mark.timeout(900)
def test_parameter_server_stopped_by_max_steps_resumes_where_it_stopped(runs):
    """The servers never run the loop; the final checkpoint must still hold the workers' data
    position (not the start of the epoch) and loss history: the resumed run trains exactly the
    remaining steps and ends with the uninterrupted run's weights at staleness 0."""
    root, references, _, resumed = runs
    assert references["ps-stopped"]["step"] == STEPS // 2
    assert resumed["ps-stopped"]["trained"] == STEPS - STEPS // 2
    for k, v in references["ps"]["weights"].items():
        assert torch.equal(resumed["ps-stopped"]["weights"][k], v), f"parameter {k} differs"
    final = torch.load(Path(root) / "stopped-ps" / "checkpoints" / f"step_{STEPS:08d}.pt", weights_only=True)
    assert final["extra"]["loss_history"].shape[0] == STEPS  # the first run's losses kept


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [n for n, _, _ in PAYLOAD])
def test_planted_payload_never_runs(runs, name):
    _, references, _, _ = runs
    seen = references[f"payload-{name}"]
    assert not seen["ran"], f"{name}: the payload ran"
    assert seen["ds.load"] != "loaded" and "refused" in seen["ds.load"], seen
    assert seen["app"].startswith("ConfigError") and "refused" in seen["app"], seen
