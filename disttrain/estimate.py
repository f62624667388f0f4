"""Memory before launch: ``python -m disttrain.estimate [--world-size N] <the run's overrides>``
(or ``trainer.estimate_only=true`` on a real launch) prints per-rank bytes of parameters,
gradients, optimizer state and activations per micro-batch for the chosen strategy, without
allocating the model: it is built on the ``meta`` device (disttrain/footprint.py counts it).

How each strategy lays the whole model's bytes (P, G, O; A per micro-batch of batch/dp samples)
over the ranks, from its documented options only:

* single, ddp, horovod: every rank P + G + O + A.
* fsdp: P, G and O sharded over ``world / replicate_size`` ranks; A whole (plus one block's
  parameters gathered at a time, not counted).
* deepspeed: ZeRO-1 shards O, ZeRO-2 also G, ZeRO-3 also P, over every rank; ZeRO-3 also
  allocates its reduce bucket up front (``reduce_bucket_size`` fp32 elements, 5e8 by default).
* parameter_server (disttrain/strategies/parameter_server/memory.py): the real shard assignment
  over the meta model's parameters (whole tensors, so shards are uneven). ``servers=colocated``:
  rank r holds P + G + A as a worker and shard r's parameters, gradient and optimizer state;
  ``servers=dedicated``: server j holds shard j (its P, G, O), every worker P + G + A. A worker's
  buffers: its reply buffer for each shard's pulled parameters (P in all).
* model_parallel (disttrain/strategies/model_parallel/memory.py): one row per pipeline rank (its
  data-parallel replicas alike): its stages' P, G, O and one micro-batch's activations (batch /
  dp / microbatches samples) times the micro-batches the schedule keeps in flight, from the
  strategy's own cost model. A placement of names or split_points is profiled on the meta device;
  ``placement: auto`` on a real CPU stand-in of the model (its split depends on measured time).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig

from disttrain.env import DistEnv
from disttrain.errors import ConfigError
from disttrain.footprint import Footprint, RankEstimate, for_rank, measure, table

log = logging.getLogger("disttrain")


@dataclass
class Subject:
    """The model as the layouts that need more than the totals see it: built on the meta device,
    one micro-batch (real tensors, from the data), the loss, the user's optimizer over the meta
    parameters, and each parameter's bytes (in ``model.parameters()`` order)."""

    skeleton: Any
    inputs: Any
    targets: Any
    loss_fn: Any
    optimizer: Any
    param_bytes: list[int]
    grad_bytes: list[int]
    optim_bytes: list[int]


Layout = Callable[[Any, Footprint, int, "Subject | None"], list[RankEstimate]]


def _needs(subject: Subject | None, name: str) -> Subject:
    if subject is None:
        raise ConfigError(f"strategy={name}: its estimate needs the model (estimate.estimate / python -m disttrain.estimate)")
    return subject


# ---------------------------------------------------------------------- layouts
def _replicated(name: str) -> Layout:
    def layout(strategy: Any, fp: Footprint, world: int, subject: Subject | None = None) -> list[RankEstimate]:
        return [RankEstimate(name, (0, world - 1), fp.params, fp.grads, fp.optimizer, fp.activations)]
    return layout


def _fsdp(strategy: Any, fp: Footprint, world: int, subject: Subject | None = None) -> list[RankEstimate]:
    shards = world // int(getattr(strategy, "replicate_size", 1) or 1)
    return [RankEstimate(f"fsdp (1/{shards} shards)", (0, world - 1), fp.params / shards, fp.grads / shards,
                         fp.optimizer / shards, fp.activations, note="+ one block's gathered parameters")]


DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


def _deepspeed(strategy: Any, fp: Footprint, world: int, subject: Subject | None = None) -> list[RankEstimate]:
    stage = int(strategy.zero_stage)
    part = lambda b, from_stage: b / world if stage >= from_stage else b  # noqa: E731
    # ZeRO-3 allocates its gradient reduce bucket up front: reduce_bucket_size fp32 elements
    # (measured: 1.9 GiB on CPU at the default, whatever the model's size)
    zero = dict(getattr(strategy, "extra_config", {}) or {}).get("zero_optimization", {}) or {}
    bucket = 4.0 * float(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)) if stage == 3 else 0.0
    return [RankEstimate(f"deepspeed ZeRO-{stage}", (0, world - 1), part(fp.params, 3), part(fp.grads, 2),
                         part(fp.optimizer, 1), fp.activations, buffers=bucket,
                         note="buffers: the reduce bucket (strategy.config.zero_optimization.reduce_bucket_size)" if bucket else "")]


def _parameter_server(strategy: Any, fp: Footprint, world: int, subject: Subject | None = None) -> list[RankEstimate]:
    from disttrain.strategies.parameter_server import memory
    from disttrain.strategies.parameter_server.layout import RankLayout
    from disttrain.strategies.parameter_server.protocol import REPLY_PREFIX, ShardLayout

    if world == 1:  # one process: no server, plain training with the user's optimizer
        return _replicated("single (no server)")(strategy, fp, world, subject)
    sub = _needs(subject, "parameter_server")
    ranks = RankLayout.build(strategy.servers_kind, world, strategy.num_servers)
    shards = ShardLayout(list(sub.skeleton.parameters()), len(ranks.servers))
    reply = float(sum(REPLY_PREFIX + n for n in shards.numel) * shards.dtype.itemsize)
    return memory.rank_estimates(ranks.kind, world, shards.shards, sub.param_bytes, sub.grad_bytes, sub.optim_bytes,
                                 fp.activations, reply)


def _model_parallel(strategy: Any, fp: Footprint, world: int, subject: Subject | None = None) -> list[RankEstimate]:
    from disttrain.strategies.model_parallel import memory

    sub = _needs(subject, "model_parallel")
    opts = strategy.role.opts
    costs, cuts = memory.stages(opts, sub.skeleton, sub.inputs, sub.targets, sub.loss_fn, sub.optimizer)
    return memory.rank_estimates(opts, costs, cuts, world)


LAYOUTS: dict[str, Layout] = {
    "single": _replicated("single"),
    "ddp": _replicated("ddp (replica)"),
    "horovod": _replicated("horovod (replica)"),
    "fsdp": _fsdp,
    "deepspeed": _deepspeed,
    "parameter_server": _parameter_server,
    "model_parallel": _model_parallel,
}


def layout(strategy: Any, fp: Footprint, world: int, subject: Subject | None = None) -> list[RankEstimate]:
    """Per-rank estimates of ``fp`` under ``strategy`` at ``world`` ranks."""
    fn = LAYOUTS.get(strategy.name)
    if fn is None:
        raise ConfigError(f"strategy={strategy.name}: no memory estimate for it yet (estimated: {sorted(LAYOUTS)})")
    if strategy.name == "model_parallel" and world == 1:
        raise ConfigError("strategy=model_parallel in one process (stages over devices) is not estimated yet: estimate "
                          "the pipeline over processes (--world-size K, strategy.pipeline_size=K)")
    return fn(strategy, fp, world, subject)


# ---------------------------------------------------------------------- from a composed config
def footprint(cfg: DictConfig, train_data: Any, micro_batch: int) -> tuple[Footprint, Subject]:
    """The whole model's footprint for the composed config: the model built on the meta device,
    the real optimizer stepped on it, one micro-batch of ``train_data``'s first samples."""
    import torch
    from torch.utils.data import default_collate

    from disttrain.cli import build_optimizer
    from disttrain.footprint import optimizer_state_by_param
    from disttrain.registry import instantiate

    with torch.device("meta"):
        model = instantiate(cfg.model, "model")
    inputs, targets = default_collate([train_data[i] for i in range(micro_batch)])[:2]
    loss_fn = instantiate(cfg.data.loss, "data.loss") if cfg.data.get("loss") else None
    make = lambda m: build_optimizer(cfg.optimizer, m)  # noqa: E731
    fp = measure(model, make, inputs, targets, loss_fn, micro_batch)
    params = list(model.parameters())
    subject = Subject(model, inputs, targets, loss_fn, make(model), [p.numel() * p.element_size() for p in params],
                      [p.numel() * p.element_size() if p.requires_grad else 0 for p in params],
                      optimizer_state_by_param(model, make))
    return fp, subject


def micro_batch(cfg: DictConfig, strategy: Any, env: DistEnv) -> int:
    """Samples per micro-batch on one rank: the batch over the data-parallel ranks, and over the
    pipeline's micro-batches under model_parallel."""
    micro = int(cfg.data.batch_size) // strategy.data_shard(env)[1]
    if strategy.name == "model_parallel":
        micro //= int(strategy.role.opts.microbatches)
    return micro


def estimate(cfg: DictConfig, strategy: Any, env: DistEnv, train_data: Any) -> list[RankEstimate]:
    """Every rank's estimate for this job (``strategy`` validated for ``env``)."""
    fp, subject = footprint(cfg, train_data, micro_batch(cfg, strategy, env))
    return layout(strategy, fp, env.world_size, subject)


def report(rows: list[RankEstimate], strategy: Any, env: DistEnv, fp_micro: int) -> str:
    return (f"memory estimate: strategy={strategy.name} world={env.world_size} micro-batch={fp_micro} samples per rank\n"
            + table(rows))


def watch(cfg: DictConfig, strategy: Any, env: DistEnv, train_data: Any, device: Any) -> Any:
    """A MemoryWatch for this rank of a real run, or None when the model cannot be estimated on
    the meta device (a data-dependent forward): the run goes on, saying why."""
    from disttrain.footprint import MemoryWatch

    counted = None
    if strategy.name == "model_parallel":
        opts = getattr(strategy.role, "opts", None)
        if opts is None or env.world_size == 1 or (opts.specs is None and opts.split_points is None):
            log.info("memory estimate: not compared in this run (model_parallel in one process, or placement: auto, "
                     "whose own report compares its prediction with the measurement)")
            return None
        counted = lambda: _pipeline_counted(strategy, env.rank % opts.pipeline_size)  # noqa: E731
    try:
        mine = for_rank(estimate(cfg, strategy, env, train_data), env.rank)
    except Exception as exc:  # an estimate must never stop a run
        log.info("memory estimate unavailable (%s: %s)", type(exc).__name__, str(exc)[:200])
        return None
    return MemoryWatch(mine, device, counted=counted) if mine is not None else None


def _pipeline_counted(strategy: Any, pp_rank: int) -> tuple[float, float] | None:
    """This pipeline rank's measured bytes from the strategy's own report (its tensors)."""
    rows = strategy.memory_report()
    if not rows or pp_rank >= len(rows):
        return None
    row = rows[pp_rank]
    return row["params"] + row["grads"] + row.get("optimizer", 0.0), row["activations_peak"]


# ---------------------------------------------------------------------- the command
def compose(overrides: list[str]) -> DictConfig:
    """The config ``python -m disttrain <overrides>`` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from disttrain.cli import register_resolvers
    from disttrain.registry import CONF_DIR

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def run(overrides: list[str], world_size: int) -> tuple[list[RankEstimate], str]:
    """The estimate for ``overrides`` at ``world_size`` ranks, and its printed form."""
    from disttrain.cli import build_data, validate

    cfg = compose(overrides)
    env = DistEnv(world_size=world_size, local_world_size=world_size)
    strategy, _ = validate(cfg, env)
    train_data, _ = build_data(cfg)
    rows = estimate(cfg, strategy, env, train_data)
    return rows, report(rows, strategy, env, micro_batch(cfg, strategy, env))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m disttrain.estimate", description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                    help="ranks of the launch (torchrun's nnodes x nproc_per_node)")
    ap.add_argument("overrides", nargs="*", help="the run's Hydra overrides, e.g. strategy=fsdp model=mlp")
    args = ap.parse_args(argv)
    try:
        _, text = run(args.overrides, args.world_size)
    except ConfigError as exc:
        print(f"disttrain.estimate: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(text)


if __name__ == "__main__":
    main()
