"""``strategy=model_parallel``'s options, checked once against the job before any process group:
every value that is wrong for this job fails here, on every rank alike, naming the fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from disttrain.errors import ConfigError
from disttrain.strategies.model_parallel import placement as pl
from disttrain.strategies.model_parallel import schedules
from disttrain.strategies.model_parallel.schedules import ScheduleSpec

INITS = ("auto", "full", "meta")
LOCAL_SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Options:
    """The resolved options (``pipeline_size`` and ``stages_per_rank`` filled in for this job)."""

    schedule: str
    spec: ScheduleSpec
    specs: list[pl.StageSpec] | None  # None: placement auto (or split points)
    split_points: tuple[str, ...] | None
    pipeline_size: int  # K (1 in the one-process form)
    stages_per_rank: int  # V
    microbatches: int  # M
    memory_cap_gb: float | None
    init: str
    bucket_cap_mb: float
    report: bool
    devices: tuple[str, ...] | None


def resolve(raw: dict[str, Any], world_size: int) -> Options:
    """``raw``: the strategy's constructor values. Raises ConfigError naming the bad value."""
    spec = schedules.get(str(raw["schedule"]).lower())
    m = raw["microbatches"]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(
            f"strategy.microbatches={m!r}: expected an integer >= 1 (the number of micro-batches each batch is "
            f"split into; 4 x the number of stages keeps the bubble small)"
        )
    if raw["init"] not in INITS:
        raise ConfigError(f"strategy.init={raw['init']!r}: expected one of {list(INITS)}")
    cap = raw["memory_cap_gb"]
    if cap is not None and not (isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0):
        raise ConfigError(f"strategy.memory_cap_gb={cap!r}: expected a number of GiB > 0, or null (no cap)")
    if not float(raw["bucket_cap_mb"]) > 0:
        raise ConfigError(f"strategy.bucket_cap_mb={raw['bucket_cap_mb']!r}: must be > 0 (DDP's default is 25)")
    specs = pl.parse(raw["placement"])
    split = _split_points(raw["split_points"], specs)
    common = dict(schedule=spec.name, spec=spec, specs=specs, split_points=split, microbatches=m,
                  memory_cap_gb=None if cap is None else float(cap), init=str(raw["init"]),
                  bucket_cap_mb=float(raw["bucket_cap_mb"]), report=bool(raw["report"]),
                  devices=tuple(str(d) for d in raw["devices"]) if raw["devices"] else None)
    if world_size == 1:
        return _one_process(raw, common)
    return _pipeline(raw, common, world_size)


def _split_points(value: Any, specs: list[pl.StageSpec] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f"strategy.split_points={value!r}: expected a list of module names, each the first module of a new stage "
            f"(e.g. [blocks.4]), or null"
        )
    if specs is not None:
        raise ConfigError("strategy.placement and strategy.split_points both given: keep one (set placement: auto)")
    return tuple(value)


def _one_process(raw: dict[str, Any], common: dict[str, Any]) -> Options:
    specs, spec = common["specs"], common["spec"]
    if spec.name not in LOCAL_SCHEDULES:
        raise ConfigError(
            f"strategy.schedule={spec.name}: one process places stages on its devices and issues micro-batches in "
            f"order, with schedule gpipe or 1f1b; {spec.name} needs one process per pipeline rank (torchrun "
            f"--nproc_per_node=K)"
        )
    if common["split_points"] is not None:
        raise ConfigError("strategy.split_points cut a pipeline over processes; in one process name modules per device in strategy.placement")
    if raw["pipeline_size"] not in (None, 1) or raw["stages_per_rank"] not in (None, 1):
        raise ConfigError(
            f"strategy.pipeline_size={raw['pipeline_size']} / stages_per_rank={raw['stages_per_rank']} need a job of "
            f"pipeline_size x data-parallel processes; this job has 1 process: launch with torchrun --nproc_per_node=K"
        )
    if specs is not None:
        ranked = [s for s in specs if s.rank is not None]
        if ranked:
            raise ConfigError(
                f"strategy.placement has {len(specs)} stages naming ranks but the job has only 1 rank: more stages "
                f"than ranks. Launch {len(specs)} processes (torchrun --nproc_per_node={len(specs)}), or name a device "
                f"per stage to place them in this process"
            )
        for s in specs:
            if s.device is not None:
                pl.check_device(s.device, f"strategy.placement[{s.index}].device")
    for i, d in enumerate(common["devices"] or ()):
        pl.check_device(d, f"strategy.devices[{i}]")
    n_stages = len(specs) if specs else len(common["devices"] or ()) or None
    if spec.needs_m_ge_k and n_stages and common["microbatches"] < n_stages:
        raise ConfigError(
            f"strategy.microbatches={common['microbatches']} is fewer than the {n_stages} pipeline stages, which "
            f"schedule=1f1b needs: set strategy.microbatches>={n_stages} (or schedule=gpipe)"
        )
    return Options(pipeline_size=1, stages_per_rank=1, **common)


def _pipeline(raw: dict[str, Any], common: dict[str, Any], world: int) -> Options:
    specs, spec = common["specs"], common["spec"]
    for s in specs or ():
        if s.device is not None:
            raise ConfigError(
                f"strategy.placement[{s.index}] names device={s.device!r} but this job has WORLD_SIZE={world} "
                f"processes: each pipeline stage runs on its rank's own device; drop 'device'"
            )
    v = raw["stages_per_rank"] if raw["stages_per_rank"] is not None else spec.default_v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"strategy.stages_per_rank={v!r}: expected an integer >= 1 or null (the schedule's default)")
    n_given = len(specs) if specs else (len(common["split_points"]) + 1 if common["split_points"] else None)
    k = raw["pipeline_size"]
    if k is None:
        k = n_given // v if n_given and n_given % v == 0 else world
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(
            f"strategy.pipeline_size={k!r}: a pipeline needs at least 2 ranks (pure data parallelism is strategy=ddp)"
        )
    if k > world:
        raise ConfigError(
            f"strategy.placement has {k * v} stages on {k} pipeline ranks but the job has only {world} rank(s): more "
            f"stages than ranks. Launch {k} x D processes (torchrun --nproc_per_node={k}), or merge stages"
        )
    if world % k:
        raise ConfigError(
            f"WORLD_SIZE={world} is not a multiple of strategy.pipeline_size={k}: the job runs pipeline_size x "
            f"data-parallel ranks; launch {k * max(1, world // k)} or {k * (world // k + 1)} processes, or set "
            f"strategy.pipeline_size to a divisor of {world}"
        )
    spec.check(k, v, common["microbatches"])
    if n_given is not None and n_given != k * v:
        what = "strategy.placement has" if specs else "strategy.split_points make"
        raise ConfigError(
            f"{what} {n_given} stages, but pipeline_size={k} x stages_per_rank={v} needs {k * v}: give {k * v} stages, "
            f"or set pipeline_size/stages_per_rank to match"
        )
    if specs:
        ranks = spec.stage_ranks(k, v)
        for s in specs:
            if s.rank is not None and s.rank != ranks[s.index]:
                raise ConfigError(
                    f"strategy.placement[{s.index}].rank={s.rank}: schedule={spec.name} runs stage {s.index} on pipeline "
                    f"rank {ranks[s.index]} (stages go to ranks {ranks}); drop 'rank', the schedule decides"
                )
    return Options(pipeline_size=k, stages_per_rank=v, **common)
