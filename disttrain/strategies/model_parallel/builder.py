"""Stage building for a pipeline over ranks: from the user's model (and optimizer) to this rank's
stages, and from a micro-batch shape to a runnable traced pipeline.

The stages are known when the placement is: at ``adopt`` for a placement of module names (this
rank keeps only its stages' tensors at once, unless the model holds tensors at its root, which go
wherever the trace puts them), at the first batch for ``placement: auto`` (measured then) and for
``split_points`` (the trace decides which module goes where). Every check against the model runs
before any message is exchanged and reaches the same verdict on every rank.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from disttrain import forward
from disttrain.errors import ConfigError
from disttrain.strategies.model_parallel import autoplace, tracing
from disttrain.strategies.model_parallel import placement as pl
from disttrain.strategies.model_parallel.options import Options
from disttrain.strategies.model_parallel.runner import Runner
from disttrain.strategies.model_parallel.stage_module import StageModule, narrow_optimizer
from disttrain.strategies.model_parallel.stats import Meter


class StageBuilder:
    """This rank's part of the user's model, and the traced pipelines that run it."""

    def __init__(self, opts: Options, local: list[int], device: torch.device) -> None:
        self.opts, self.local, self.device = opts, local, device
        self.n_stages = opts.pipeline_size * opts.stages_per_rank
        self.module: StageModule | None = None
        self.skeleton: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.names: list[list[str]] | None = None  # module names per stage, once known
        self.first_modules: list[str] | None = list(opts.split_points) if opts.split_points else None
        self.proposal: autoplace.Proposal | None = None
        self.runners: dict[tuple, Runner] = {}
        # how the last cut replaced parameters, by id: valid only while the old objects live (an
        # optimizer built before the cut holds them), so used at once and then cleared
        self.replaced: dict[int, nn.Parameter | None] = {}
        self.on_cut: list[Callable[[], None]] = []  # run once the stages' tensors are final

    # ------------------------------------------------------------------ the user's model
    def adopt(self, model: nn.Module, skeleton: nn.Module, on_meta: bool) -> StageModule:
        """Check the placement against the model and keep this rank's stages if known now."""
        self.skeleton, self.module = skeleton, StageModule(model, on_meta)
        if self.opts.specs is not None:
            self.names = pl.resolve(skeleton, self.opts.specs, root_tensors_free=True)
            self.first_modules = [names[0] for names in self.names[1:]]
            if not any(True for _ in skeleton.parameters(recurse=False)) and not any(True for _ in skeleton.buffers(recurse=False)):
                self.cut({t for s in self.local for n in self.names[s] for t in tracing.tensor_names(skeleton, n)})
        elif self.first_modules is not None:
            pl.expand(skeleton, self.first_modules)  # unknown names fail here, naming the model's modules
            if len(self.first_modules) + 1 != self.n_stages:
                raise ConfigError(
                    f"strategy.split_points has {len(self.first_modules)} names, which cut the model into "
                    f"{len(self.first_modules) + 1} stages, but pipeline_size={self.opts.pipeline_size} x "
                    f"stages_per_rank={self.opts.stages_per_rank} = {self.n_stages} stages are needed"
                )
        elif len(pl.units(skeleton)) < self.n_stages:
            raise ConfigError(
                f"placement: auto cannot make {self.n_stages} stages of {type(skeleton).__name__}: it has only "
                f"{len(pl.units(skeleton))} placeable modules {pl.units(skeleton)} (more stages than layers); use "
                f"fewer stages (strategy.pipeline_size, strategy.stages_per_rank)"
            )
        return self.module

    def cut(self, keep: set[str]) -> None:
        """Keep only the tensors named ``keep`` (this rank's stages); narrow the optimizer."""
        assert self.module is not None
        self.replaced = self.module.keep(keep, self.device)
        if self.optimizer is not None:
            narrow_optimizer(self.optimizer, self.replaced)
            self.replaced = {}
        for hook in self.on_cut:
            hook()

    @property
    def is_cut(self) -> bool:
        return self.module is not None and self.module.kept is not None

    # ------------------------------------------------------------------ runnable pipelines
    def runner(self, example: tuple[Any, ...], target: Any, training: bool, loss: Callable | None,
               group: Any, meter: Meter | None, profile_loss: Callable | None) -> Runner:
        """The traced pipeline for micro-batches like ``example`` (built on first use; the
        first one also measures ``placement: auto`` and cuts the stages if not cut yet)."""
        assert self.module is not None and self.skeleton is not None
        key = (training, self.module.training,
               tuple((tuple(a.shape), a.dtype) if torch.is_tensor(a) else repr(a) for a in example))
        if key in self.runners:
            return self.runners[key]
        if self.first_modules is None:  # placement: auto, measured on this micro-batch
            self._propose(example, target, profile_loss)
        assert self.first_modules is not None
        self.skeleton.train(self.module.training)
        traced = tracing.trace(self.skeleton, example, self.first_modules)
        tracing.check_placement(traced, self.names, self.skeleton)
        if not self.is_cut:
            self.cut({t for s in self.local for t in traced.tensor_names(s)})
        self.runners[key] = Runner(traced, self.local, self.module, self.opts.spec, self.opts.microbatches,
                                   loss if training else None, self.device, group, meter if training else None)
        return self.runners[key]

    def _propose(self, example: tuple[Any, ...], target: Any, loss_fn: Callable | None) -> None:
        assert self.module is not None and self.skeleton is not None
        o = self.opts
        measure = (lambda out: forward.loss_of(out, target, loss_fn)) if loss_fn is not None and target is not None else (
            lambda out: forward.prediction_of(out).float().mean())
        self.proposal = autoplace.propose(
            self.module.root, self.module.on_meta, self.skeleton, pl.units(self.skeleton), example, measure,
            self.optimizer, o.spec, o.pipeline_size, o.stages_per_rank, o.microbatches, o.memory_cap_gb, self.device,
        )
        self.names = self.proposal.names
        self.first_modules = [n[0] for n in self.names[1:]]
