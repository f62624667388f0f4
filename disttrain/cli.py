"""The Hydra app: ``python -m disttrain ...`` or ``torchrun --nproc_per_node=N -m disttrain ...``.

Order of work on every rank: compose config -> validate it against the environment (no process
group yet, so a bad value fails on every rank at once with the same message) -> start the
session -> build model, data, optimizer -> train -> release model and optimizer -> end the
process group.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import typing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast

from omegaconf import DictConfig, OmegaConf

from disttrain import activation_checkpointing as ac
from disttrain import schema
from disttrain.env import DistEnv, agent_store
from disttrain.errors import ConfigError
from disttrain.preemption import EXIT_PREEMPTED, Preempted
from disttrain.registry import CONF_DIR, build_strategy, instantiate, to_plain
from disttrain.strategies.base import RunOptions

log = logging.getLogger("disttrain")

EXIT_CONFIG_ERROR = 2


# ---------------------------------------------------------------------- one run directory
def run_id() -> str:
    """A name every rank of one launch agrees on without a process group, stable across
    torchrun restarts (so ``trainer.resume=auto`` finds the checkpoints after a restart).

    Under torchrun the first rank to ask stores a timestamp in the agent's TCP store and every
    rank reads it back; under SLURM the job id is used; otherwise a timestamp."""
    if os.environ.get("DISTTRAIN_RUN_ID"):
        return os.environ["DISTTRAIN_RUN_ID"]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    store = agent_store()
    if store is not None:
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        return store.compare_set(f"disttrain/run_id/{run}", "", stamp).decode()
    if "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return stamp


# ---------------------------------------------------------------------- failing together
_CONFIG_CHECKED = False


def config_checked(failed: bool, wait_s: float = 20.0) -> None:
    """Record that this rank has finished composing and checking its config.

    torchrun stops every other rank (SIGTERM) as soon as one exits, so a rank that exits on a
    config error at once can cut off the others before they print the same error: the user would
    see it from one rank and a SIGTERM from the rest. A failing rank therefore waits, at most
    ``wait_s``, until every rank of the launch has checked its config, then exits. A rank whose
    config is good marks itself and goes on without waiting. A no-op outside torchrun."""
    global _CONFIG_CHECKED
    if _CONFIG_CHECKED and not failed:
        return
    try:
        store = agent_store(timeout_s=5.0)
        if store is None:
            return
        env = DistEnv.from_environ()
        prefix = f"disttrain/config_checked/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{env.restart_count}"
        if not _CONFIG_CHECKED:
            store.set(f"{prefix}/{env.rank}", "failed" if failed else "ok")
            _CONFIG_CHECKED = True
        if failed:
            import datetime

            store.wait([f"{prefix}/{r}" for r in range(env.world_size)], datetime.timedelta(seconds=wait_s))
    except Exception:  # a rank that never checks (crashed, slow) must not keep this one alive
        pass


def _rank() -> int:
    return DistEnv.from_environ().rank


def register_resolvers() -> None:
    """``${dt_run_id:}`` and ``${dt_rank_zero:X}`` (X on rank 0, null elsewhere) for conf/."""
    if not OmegaConf.has_resolver("dt_run_id"):
        OmegaConf.register_new_resolver("dt_run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("dt_rank_zero"):
        OmegaConf.register_new_resolver("dt_rank_zero", lambda value: value if _rank() == 0 else None)


# ---------------------------------------------------------------------- validation
@dataclass(frozen=True)
class AppSettings:
    """The app's own top-level values (``conf/config.yaml``) and the data group's plain ones,
    type-checked from these annotations, then range-checked."""

    seed: int = 0
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["32", "bf16"] = "32"
    backend: Literal["auto", "gloo", "nccl", "mpi"] = "auto"
    timeout_s: float = 300.0
    num_threads: int | None = 1
    batch_size: int = 64
    num_workers: int = 0
    metric: str | None = None
    activation_checkpointing: str | list[str] | None = None

    KEYS = {"seed": "seed", "accelerator": "accelerator", "precision": "precision", "backend": "dist.backend",
            "timeout_s": "dist.timeout_s", "num_threads": "dist.num_threads", "batch_size": "data.batch_size",
            "num_workers": "data.num_workers", "metric": "data.metric",
            "activation_checkpointing": "activation_checkpointing"}

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "AppSettings":
        values = {}
        for name, key in cls.KEYS.items():
            value = OmegaConf.select(cfg, key, default=None)
            if name == "precision" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # `precision=32` on the command line arrives as an int
            value = to_plain(value)  # lists arrive as ListConfig
            if value is not None or name in ("num_threads", "metric"):
                values[name] = value
        return cls(**values)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for name, key in self.KEYS.items():
            schema.check(key, getattr(self, name), hints[name])
        from disttrain.trainer import METRICS

        rules = [
            ("dist.timeout_s", self.timeout_s, self.timeout_s > 0, "must be > 0 (seconds a collective may wait)"),
            ("dist.num_threads", self.num_threads, self.num_threads is None or self.num_threads >= 1,
             "must be >= 1 or null (torch's default)"),
            ("data.batch_size", self.batch_size, self.batch_size >= 1, "must be >= 1 (the global batch)"),
            ("data.num_workers", self.num_workers, self.num_workers >= 0, "must be >= 0"),
            ("data.metric", self.metric, self.metric is None or self.metric in METRICS,
             f"expected one of {sorted(METRICS)} or null"),
        ]
        for key, value, ok, rule in rules:
            if not ok:
                raise ConfigError(f"{key}={value!r}: {rule}")
        ac.check(self.activation_checkpointing)


TARGETS = ("model", "data.dataset", "optimizer")


def validate(cfg: DictConfig, env: DistEnv, run_dir: Path | None = None):
    """Check the composed config against the environment, on every rank, before any process
    group exists: types and ranges of every group, that each ``_target_`` imports and accepts
    the keys given to it, the strategy's options, the batch split, and that the checkpoint
    directory can be written. Returns the (cheap) strategy object and the Trainer's options.
    Raises ConfigError naming the bad value and the fix."""
    from disttrain.trainer import TrainerConfig, check_checkpoint_dir

    settings = AppSettings.from_config(cfg)
    for group in TARGETS:
        check_target(cfg, group, required=True)
    check_target(cfg, "scheduler", required=False)
    check_target(cfg, "data.loss", required=False)  # null when the model returns its own loss
    probe_optimizer(cfg)
    trainer_cfg = TrainerConfig.from_mapping(cast(dict, OmegaConf.to_container(cfg.trainer, resolve=True)))
    strategy = build_strategy(cfg.strategy)
    strategy.run_options = RunOptions(settings.precision, trainer_cfg.gradient_accumulation_steps, trainer_cfg.grad_clip)
    strategy.validate(env)
    _, dp = strategy.data_shard(env)
    batch = settings.batch_size
    if batch % dp:
        ok = [dp * k for k in range(1, 5)]
        raise ConfigError(
            f"data.batch_size={batch} is not divisible by the {dp} data-parallel ranks of strategy "
            f"{strategy.name} at world size {env.world_size}: use a multiple of {dp}, e.g. {ok}"
        )
    check_checkpoint_dir(run_dir / "checkpoints" if run_dir is not None else None, trainer_cfg.resume)
    return strategy, trainer_cfg


def check_target(cfg: DictConfig, group: str, required: bool) -> None:
    """``group._target_`` names something importable that accepts the group's other keys."""
    from hydra._internal.utils import _locate

    node = OmegaConf.select(cfg, group)
    target = node.get("_target_") if node is not None else None
    if not target:
        if required:
            raise ConfigError(
                f"{group} has no _target_: set {group}._target_ to the import path of a class or function, "
                f"or pick a config from conf/ (e.g. {group.split('.')[0]}=...)"
            )
        return
    try:
        obj = _locate(str(target))
    except Exception as exc:
        raise ConfigError(
            f"{group}._target_={target!r} cannot be imported ({str(exc).splitlines()[0][:200]}): give the full import "
            f"path of a class or function, e.g. {group}._target_=my_package.module.Name"
        ) from exc
    raw = OmegaConf.to_container(node, resolve=False)
    assert isinstance(raw, dict)
    # values that interpolate facts the dataset publishes (${data.facts.vocab_size}) are known only
    # once it is built; train() checks this group again then
    values = {str(k): node[k] for k, v in raw.items()
              if not str(k).startswith("_") and not (isinstance(v, str) and "data.facts" in v and "facts" not in cfg.data)}
    hint = (f" (a key left from the default {group.split('.')[0]} config? pick a whole group of your own with "
            f"--config-dir and {group.split('.')[0]}=<name>: docs/your_model.md)")
    if callable(obj):
        schema.check_call(obj, values, group, hint=hint)


def probe_optimizer(cfg: DictConfig) -> None:
    """Build the optimizer once over a dummy parameter: its own checks (a negative learning
    rate, betas out of range) fail here, on every rank, not after the process group started."""
    import torch
    from hydra._internal.utils import _locate

    target = _locate(str(cfg.optimizer._target_))
    if not (isinstance(target, type) and issubclass(target, torch.optim.Optimizer)):
        return  # a factory that receives the model: built (and checked) with the model
    try:
        instantiate(cfg.optimizer, "optimizer", params=[torch.nn.Parameter(torch.zeros(1))])
    except ConfigError as exc:
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        raise ConfigError(
            f"optimizer: {root} (optimizer._target_={cfg.optimizer.get('_target_')}): fix the optimizer.* values"
        ) from exc


# ---------------------------------------------------------------------- the job
def train(cfg: DictConfig, run_dir: Path | None) -> dict[str, Any]:
    """Run one training job from a composed config. Returns the final summary (rank 0's view)."""
    from disttrain import estimate
    from disttrain.observe import configure_logging
    from disttrain.session import Session, seed_everything
    from disttrain.trainer import Trainer

    env = DistEnv.from_environ()
    configure_logging(env.rank, run_dir if env.is_rank_zero else None)
    strategy, trainer_cfg = validate(cfg, env, run_dir)
    train_data, eval_data = build_data(cfg)  # before any process group: its facts complete the config
    check_target(cfg, "model", required=True)
    config_checked(failed=False)
    settings = AppSettings.from_config(cfg)
    if trainer_cfg.estimate_only:  # print the memory estimate and stop before any process group
        return print_estimate(cfg, strategy, env, train_data)
    session = Session(
        strategy,
        env=env,
        accelerator=settings.accelerator,
        precision=settings.precision,
        backend=settings.backend,
        timeout_s=float(settings.timeout_s),
        num_threads=settings.num_threads,
        gradient_accumulation_steps=trainer_cfg.gradient_accumulation_steps,
        grad_clip=trainer_cfg.grad_clip,
        seed=settings.seed,
        activation_checkpointing=settings.activation_checkpointing,
    )
    try:
        if env.is_rank_zero:
            log.info("run directory: %s", run_dir)
            log.info("config:\n%s", OmegaConf.to_yaml(cfg))
        memory_watch = estimate.watch(cfg, strategy, env, train_data, session.device)  # before the model exists
        seed_everything(settings.seed)  # same initial weights on every rank
        model = session.build_model(lambda: instantiate(cfg.model, "model"))
        optimizer = build_optimizer(cfg.optimizer, model)
        sched_cfg = cfg.get("scheduler")
        scheduler = partial(instantiate, sched_cfg, "scheduler") if sched_cfg and sched_cfg.get("_target_") else None
        trainer = Trainer(
            session,
            model,
            optimizer,
            loss_fn=instantiate(cfg.data.loss, "data.loss") if cfg.data.get("loss") else None,
            train_data=train_data,
            eval_data=eval_data,
            batch_size=settings.batch_size,
            metric=settings.metric,
            config=trainer_cfg,
            scheduler_factory=(lambda opt: scheduler(optimizer=opt)) if scheduler else None,
            run_dir=run_dir,
            num_workers=settings.num_workers,
            seed=settings.seed,
            hparams=_flat_hparams(cfg),
            memory_watch=memory_watch,
        )
        del model, optimizer
        summary = trainer.fit()
        del trainer  # release the wrapped model before the process group (clean exit)
        return summary
    finally:
        session.close()


def print_estimate(cfg: DictConfig, strategy: Any, env: DistEnv, train_data: Any) -> dict[str, Any]:
    """``trainer.estimate_only=true``: rank 0 prints every rank's memory estimate (disttrain/estimate.py)."""
    from disttrain import estimate

    rows = estimate.estimate(cfg, strategy, env, train_data)
    if env.is_rank_zero:
        print(estimate.report(rows, strategy, env, estimate.micro_batch(cfg, strategy, env)), flush=True)
    return {"memory_estimate": [r.as_dict() for r in rows]}


def build_data(cfg: DictConfig) -> tuple[Any, Any]:
    """``data.dataset``'s ``(train, eval)`` datasets. A builder may also return a mapping of facts
    as a third item (``{"vocab_size": 65}``): they are published as ``data.facts`` for the model
    config to interpolate (``vocab_size: ${data.facts.vocab_size}``)."""
    from omegaconf import open_dict

    built = instantiate(cfg.data.dataset, "data.dataset")
    if not isinstance(built, (tuple, list)) or len(built) not in (2, 3):
        raise ConfigError(
            f"data.dataset._target_={cfg.data.dataset._target_} returned a {type(built).__name__}: a dataset builder "
            f"returns (train_dataset, eval_dataset), optionally with a dict of facts as a third item"
        )
    if len(built) == 3:
        facts = dict(built[2])
        with open_dict(cfg):
            cfg.data.facts = facts
        log.info("data facts: %s", facts)
    return built[0], built[1]


def build_optimizer(cfg_optimizer: DictConfig, model: Any) -> Any:
    """An optimizer class (``torch.optim.AdamW``) gets ``params=model.parameters()``; anything
    else is a factory that gets ``model=`` and returns the optimizer (parameter groups: no weight
    decay on biases and norms, as nanoGPT's ``configure_optimizers`` does)."""
    import torch
    from hydra._internal.utils import _locate

    target = _locate(str(cfg_optimizer._target_))
    if isinstance(target, type) and issubclass(target, torch.optim.Optimizer):
        return instantiate(cfg_optimizer, "optimizer", params=model.parameters())
    optimizer = instantiate(cfg_optimizer, "optimizer", model=model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer._target_={cfg_optimizer._target_} returned a {type(optimizer).__name__}, not a "
            f"torch.optim.Optimizer: a factory takes model= and returns the optimizer"
        )
    return optimizer


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


# ---------------------------------------------------------------------- entry points
def _hydra_entry(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        train(cfg, run_dir)
    except Preempted as exc:
        print(f"disttrain: rank {_rank()}: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    except ConfigError as exc:
        _record_error(exc)
        print(f"disttrain: config error (rank {_rank()}): {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG_ERROR)
    except Exception as exc:
        # Hydra catches exceptions itself (prints them and exits 1), so torch's @record around
        # the app never sees one: write torchrun's error file here, so its failure summary names
        # this rank and shows the traceback. Then let Hydra report and exit non-zero as usual.
        _record_error(exc)
        raise


def _record_error(exc: BaseException) -> None:
    """Write ``exc`` with its traceback to torchrun's per-rank error file (no-op outside torchrun)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        handler = get_error_handler()
        handler.initialize()
        handler.record_exception(exc)
    except Exception as err:  # never mask the real failure
        print(f"disttrain: could not write torchrun's error file: {err}", file=sys.stderr, flush=True)


def main() -> None:
    """Console entry point (``disttrain``) and ``python -m disttrain``."""
    import hydra
    from torch.distributed.elastic.multiprocessing.errors import record

    register_resolvers()
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_hydra_entry)
    try:
        record(app)()  # torchrun's error file: the failing rank and its traceback in the output
    except SystemExit as exc:
        # Hydra prints a bad override or a missing config option itself and exits 1; our own
        # config errors exit 2. Either way, let the other ranks print theirs before torchrun
        # stops them (see config_checked).
        if exc.code not in (0, None):
            config_checked(failed=True)
        raise
