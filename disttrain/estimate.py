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
* parameter_server: ``num_servers`` servers each hold 1/num_servers of P and O (sharded by bytes)
  and receive that share of G; every worker holds P + G + A and no optimizer state.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

from omegaconf import DictConfig

from disttrain.env import DistEnv
from disttrain.errors import ConfigError
from disttrain.footprint import Footprint, RankEstimate, for_rank, measure, table

log = logging.getLogger("disttrain")


# ---------------------------------------------------------------------- layouts
def _replicated(name: str) -> Callable[[Any, Footprint, int], list[RankEstimate]]:
    def layout(strategy: Any, fp: Footprint, world: int) -> list[RankEstimate]:
        return [RankEstimate(name, (0, world - 1), fp.params, fp.grads, fp.optimizer, fp.activations)]
    return layout


def _fsdp(strategy: Any, fp: Footprint, world: int) -> list[RankEstimate]:
    shards = world // int(getattr(strategy, "replicate_size", 1) or 1)
    return [RankEstimate(f"fsdp (1/{shards} shards)", (0, world - 1), fp.params / shards, fp.grads / shards,
                         fp.optimizer / shards, fp.activations, note="+ one block's gathered parameters")]


DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


def _deepspeed(strategy: Any, fp: Footprint, world: int) -> list[RankEstimate]:
    stage = int(strategy.zero_stage)
    part = lambda b, from_stage: b / world if stage >= from_stage else b  # noqa: E731
    # ZeRO-3 allocates its gradient reduce bucket up front: reduce_bucket_size fp32 elements
    # (measured: 1.9 GiB on CPU at the default, whatever the model's size)
    zero = dict(getattr(strategy, "extra_config", {}) or {}).get("zero_optimization", {}) or {}
    bucket = 4.0 * float(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)) if stage == 3 else 0.0
    return [RankEstimate(f"deepspeed ZeRO-{stage}", (0, world - 1), part(fp.params, 3), part(fp.grads, 2),
                         part(fp.optimizer, 1), fp.activations, buffers=bucket,
                         note="buffers: the reduce bucket (strategy.config.zero_optimization.reduce_bucket_size)" if bucket else "")]


def _parameter_server(strategy: Any, fp: Footprint, world: int) -> list[RankEstimate]:
    ns = int(strategy.num_servers)
    return [
        RankEstimate(f"server (1/{ns} shard)", (0, ns - 1), fp.params / ns, fp.grads / ns, fp.optimizer / ns, 0.0,
                     in_flight=0),
        RankEstimate("worker", (ns, world - 1), fp.params, fp.grads, 0.0, fp.activations),
    ]


LAYOUTS: dict[str, Callable[[Any, Footprint, int], list[RankEstimate]]] = {
    "single": _replicated("single"),
    "ddp": _replicated("ddp (replica)"),
    "horovod": _replicated("horovod (replica)"),
    "fsdp": _fsdp,
    "deepspeed": _deepspeed,
    "parameter_server": _parameter_server,
}


def layout(strategy: Any, fp: Footprint, world: int) -> list[RankEstimate]:
    """Per-rank estimates of ``fp`` under ``strategy`` at ``world`` ranks."""
    fn = LAYOUTS.get(strategy.name)
    if fn is None:
        raise ConfigError(f"strategy={strategy.name}: no memory estimate for it yet (estimated: {sorted(LAYOUTS)})")
    return fn(strategy, fp, world)


# ---------------------------------------------------------------------- from a composed config
def footprint(cfg: DictConfig, train_data: Any, micro_batch: int) -> Footprint:
    """The whole model's footprint for the composed config: the model built on the meta device,
    the real optimizer stepped on it, one micro-batch of ``train_data``'s first samples."""
    import torch
    from torch.utils.data import default_collate

    from disttrain.cli import build_optimizer
    from disttrain.registry import instantiate

    with torch.device("meta"):
        model = instantiate(cfg.model, "model")
    inputs, targets = default_collate([train_data[i] for i in range(micro_batch)])[:2]
    loss_fn = instantiate(cfg.data.loss, "data.loss") if cfg.data.get("loss") else None
    return measure(model, lambda m: build_optimizer(cfg.optimizer, m), inputs, targets, loss_fn, micro_batch)


def estimate(cfg: DictConfig, strategy: Any, env: DistEnv, train_data: Any) -> list[RankEstimate]:
    """Every rank's estimate for this job (``strategy`` validated for ``env``)."""
    dp = strategy.data_shard(env)[1]
    micro = int(cfg.data.batch_size) // dp
    return layout(strategy, footprint(cfg, train_data, micro), env.world_size)


def report(rows: list[RankEstimate], strategy: Any, env: DistEnv, fp_micro: int) -> str:
    return (f"memory estimate: strategy={strategy.name} world={env.world_size} micro-batch={fp_micro} samples per rank\n"
            + table(rows))


def watch(cfg: DictConfig, strategy: Any, env: DistEnv, train_data: Any, device: Any) -> Any:
    """A MemoryWatch for this rank of a real run, or None when the model cannot be estimated on
    the meta device (a data-dependent forward): the run goes on, saying why."""
    from disttrain.footprint import MemoryWatch

    try:
        mine = for_rank(estimate(cfg, strategy, env, train_data), env.rank)
    except Exception as exc:  # an estimate must never stop a run
        log.info("memory estimate unavailable (%s: %s)", type(exc).__name__, str(exc)[:200])
        return None
    return MemoryWatch(mine, device) if mine is not None else None


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
    return rows, report(rows, strategy, env, int(cfg.data.batch_size) // strategy.data_shard(env)[1])


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
