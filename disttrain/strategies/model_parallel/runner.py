"""The schedule adapter: one traced pipeline for one micro-batch shape, run by torch.

A :class:`Runner` holds this rank's stages as torch ``PipelineStage`` objects (each over a
``StageAdapter`` whose traced module uses the ``StageModule``'s own tensors, bound by name) and
the torch schedule over them. torch does the point-to-point work and the ordering; the runner
hands it the batch (inputs to the rank with the first stage, targets to the rank with the last)
and collects the weighted micro-batch losses. torch.export specialises a trace to its input
shapes and to train/eval mode, so the pipeline keeps one runner per (shape, mode).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from disttrain.errors import ConfigError
from disttrain.strategies.model_parallel.schedules import ScheduleSpec
from disttrain.strategies.model_parallel.stats import Meter
from disttrain.strategies.model_parallel.tracing import TracedStages


class Runner:
    """This rank's stages of one traced pipeline, and the torch schedule that runs them."""

    def __init__(self, traced: TracedStages, local: list[int], tensors: nn.Module, spec: ScheduleSpec, m: int,
                 loss_fn: Callable | None, device: torch.device, group: Any, meter: Meter | None) -> None:
        from torch.distributed.pipelining import PipelineStage

        n = len(traced.modules)
        self.stages = []
        for s in local:
            adapter = traced.adapter(s, device)
            bind(adapter.traced, tensors)
            stage = PipelineStage(adapter, s, n, device, group=group)
            if meter is not None:
                meter.instrument(stage)
            self.stages.append(stage)
        self.schedule = spec.build(self.stages, m, loss_fn) if loss_fn is not None else spec.build_forward_only(self.stages, m)
        self.has_first = any(st.is_first for st in self.stages)
        self.has_last = any(st.is_last for st in self.stages)

    def step(self, inputs: tuple[Any, ...], targets: Any, losses: list[torch.Tensor]) -> None:
        """One schedule step (forward, backward) over one batch; appends the micro-batch losses
        on the rank holding the last stage."""
        args = inputs if self.has_first else ()
        if self.has_last:
            mine: list[torch.Tensor] = []  # torch clears the list it is given
            self.schedule.step(*args, target=targets, losses=mine)
            losses.extend(mine)
        else:
            self.schedule.step(*args)

    def forward(self, inputs: tuple[Any, ...]) -> Any:
        """Forward only (evaluation): the merged outputs on the rank with the last stage."""
        return self.schedule.step(*(inputs if self.has_first else ()))


def bind(traced: nn.Module, tensors: nn.Module) -> None:
    """Make ``traced`` (a stage traced on meta) run on the user's own objects: every module its
    graph calls (``blocks.4``, ``ln_f``) becomes the user's module of that name, held by
    ``tensors`` (the ``StageModule``), so it runs the user's eager code on its real tensors; the
    code between those calls (``tok_emb(idx) + pos_emb(pos)``) stays traced. Any parameter or
    buffer the graph reads directly is bound by name too."""
    graph = getattr(traced, "graph", None)
    for node in graph.nodes if graph is not None else ():
        if node.op == "call_module":
            try:
                own = tensors.get_submodule(node.target)
            except AttributeError:
                continue
            parent, _, leaf = node.target.rpartition(".")
            setattr(traced.get_submodule(parent) if parent else traced, leaf, own)
    for kind, items in (("parameter", traced.named_parameters(remove_duplicate=False)),
                        ("buffer", traced.named_buffers(remove_duplicate=False))):
        for name, _ in list(items):
            mod, _, leaf = name.rpartition(".")
            owner = traced.get_submodule(mod) if mod else traced
            try:
                real = tensors.get_parameter(name) if kind == "parameter" else tensors.get_buffer(name)
            except AttributeError:
                raise ConfigError(
                    f"a traced pipeline stage uses {kind} {name!r}, which this rank's part of the model does not hold: "
                    f"the placement and the traced forward disagree (is {name.rpartition('.')[0] or name!r} used by "
                    f"two stages?)"
                ) from None
            (owner._parameters if kind == "parameter" else owner._buffers)[leaf] = real  # type: ignore[assignment]
    for mod_name, module in traced.named_modules():
        for attr, value in vars(module).items():
            if torch.is_tensor(value) and value.is_meta and not isinstance(value, nn.Parameter):
                raise ConfigError(
                    f"the traced stage holds a tensor constant {mod_name + '.' if mod_name else ''}{attr} that is not a "
                    f"parameter or buffer of the model, so it has no value outside the trace: register it with "
                    f"register_buffer() in the model"
                )
