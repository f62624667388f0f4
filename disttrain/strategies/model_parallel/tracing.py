"""Cutting any traceable ``forward`` into stages with torch's tracing front end.

``torch.distributed.pipelining.pipeline`` exports the whole model (``torch.export``) on the meta
device (no memory: a skeleton of the user's model) with a split before each stage's first module
(``SplitPoint.BEGINNING``), so a GPT whose forward adds a positional embedding to a token
embedding, then loops over ``blocks`` and ends in ``ln_f`` and ``head``, splits as written, with
no change to its code. Each traced stage keeps the user's fully qualified names
(``blocks.4.attn.in_proj_weight``) and gets this rank's real tensors by those names.

torch's schedules for several stages per rank exchange activations only between adjacent stages,
so every stage is wrapped in a :class:`StageAdapter` that takes the values live at its input
boundary and returns those live at its output boundary: a value a later stage needs (a skip
connection, a model input used again further on) is passed through the stages in between.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn

from disttrain.errors import ConfigError


@dataclass
class TracedStages:
    """The model cut into ``len(modules)`` traced stages (on meta), with their boundaries."""

    modules: list[nn.Module]
    args: list[list[str]]  # per stage: the values its traced module takes, in order
    produces: list[list[tuple[str, int | None]]]  # per stage: (value, index into its output or None)
    live: list[list[str]]  # live[b]: values crossing from stage b to b+1
    inputs: list[str]  # the model's positional inputs, in order
    output: str

    def adapter(self, s: int, device: torch.device) -> "StageAdapter":
        from torch.distributed.pipelining._IR import _modify_graph_op_device

        module = self.modules[s]
        if isinstance(module, fx.GraphModule):
            _modify_graph_op_device(module, device)  # ops such as arange were traced on meta
        ins = self.inputs if s == 0 else self.live[s - 1]
        outs = [self.output] if s == len(self.modules) - 1 else self.live[s]
        return StageAdapter(module, ins, self.args[s], self.produces[s], outs, last=s == len(self.modules) - 1)

    def tensor_names(self, s: int) -> set[str]:
        """Fully qualified names of the parameters and buffers stage ``s`` uses."""
        m = self.modules[s]
        return {n for n, _ in m.named_parameters(remove_duplicate=False)} | {n for n, _ in m.named_buffers()}


class StageAdapter(nn.Module):
    """Runs one traced stage on the values live at its input boundary and returns the values
    live at its output boundary (the last stage: the model's output)."""

    def __init__(self, traced: nn.Module, ins: Sequence[str], args: Sequence[str],
                 produces: Sequence[tuple[str, int | None]], outs: Sequence[str], last: bool) -> None:
        super().__init__()
        self.traced = traced
        self.ins, self.args_, self.produces, self.outs, self.last = list(ins), list(args), list(produces), list(outs), last

    def forward(self, *values: Any) -> Any:
        env = dict(zip(self.ins, values))
        result = self.traced(*[env[a] for a in self.args_])
        for name, index in self.produces:
            env[name] = result if index is None else result[index]
        if self.last:
            return env[self.outs[0]]
        return tuple(env[o] for o in self.outs)


def check_placement(traced: TracedStages, names: list[list[str]] | None, skeleton: nn.Module) -> None:
    """The traced stages hold what the placement says: every tensor used by one stage only, and
    each placed module in its stage. ConfigError naming the user's modules if not."""
    owner: dict[str, int] = {}
    for s in range(len(traced.modules)):
        for t in traced.tensor_names(s):
            if t in owner:
                raise ConfigError(
                    f"{t!r} is used by stage {owner[t]} and stage {s}: a tensor (a tied weight?) must be used by one "
                    f"stage only; place the modules that use it in the same stage"
                )
            owner[t] = s
    for s, stage_names in enumerate(names or []):
        for n in stage_names:
            wrong = sorted({owner[t] for t in tensor_names(skeleton, n) if t in owner and owner[t] != s})
            if wrong:
                raise ConfigError(
                    f"strategy.placement puts {n!r} in stage {s}, but forward runs it in stage {wrong[0]}: a stage "
                    f"starts where forward calls its first listed module ({stage_names[0]!r}), so list the modules "
                    f"of every stage in the order forward calls them"
                )


def tensor_names(model: nn.Module, module_name: str) -> list[str]:
    """Fully qualified names of the parameters and buffers inside ``model.<module_name>``."""
    m = model.get_submodule(module_name)
    return [f"{module_name}.{n}" for n, _ in m.named_parameters(remove_duplicate=False)] + [
        f"{module_name}.{n}" for n, _ in m.named_buffers()
    ]


def trace(skeleton: nn.Module, example: tuple[Any, ...], first_modules: Sequence[str]) -> TracedStages:
    """Export ``skeleton`` (a meta-device copy of the user's model) on ``example`` inputs and cut
    it before each of ``first_modules`` (the first module of stages 1..S-1). ConfigError, naming
    the user's modules, when the forward cannot be traced or the cut does not give S stages."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    meta_args = tuple(a.to("meta") if torch.is_tensor(a) else a for a in example)
    want = len(first_modules) + 1
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices from inside export
            warnings.simplefilter("ignore", FutureWarning)
            model = copy.deepcopy(skeleton)  # pipeline() rewrites forward methods in place
            pipe = pipeline(model, meta_args, split_spec=dict.fromkeys(first_modules, SplitPoint.BEGINNING))
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(
            f"strategy=model_parallel could not trace {type(skeleton).__name__}.forward with torch.export to cut it "
            f"into {want} stages ({type(cause).__name__}: {str(cause).splitlines()[0][:300]}). A pipeline over "
            f"processes needs a forward torch.export can capture (no data-dependent Python control flow)"
        ) from exc
    if pipe.num_stages != want:
        raise ConfigError(
            f"cutting {type(skeleton).__name__}.forward before {list(first_modules)} gave {pipe.num_stages} stages, not "
            f"{want}: each stage's first module must be called exactly once, in stage order (is one of them called "
            f"twice, or never?)"
        )
    return _read_graph(pipe, want)


def _read_graph(pipe: Any, num_stages: int) -> TracedStages:
    graph = pipe.split_gm.graph
    inputs: list[str] = []
    stage_of: dict[str, int] = {}  # value -> the stage that produces it (-1: a model input)
    args: list[list[str]] = []
    produces: list[list[tuple[str, int | None]]] = []
    users: dict[str, set[int]] = {}
    output = ""
    for node in graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
            stage_of[node.name] = -1
        elif node.op == "call_module":
            s = len(args)
            if node.kwargs:
                raise ConfigError(f"stage {s} of the traced model takes keyword inputs, which pipelines do not send")
            args.append([_value(a) for a in node.args])
            produces.append([(node.name, None)])
            stage_of[node.name] = s
            for a in args[-1]:
                users.setdefault(a, set()).add(s)
        elif node.op == "call_function" and node.target is operator.getitem:
            src, index = node.args
            s = stage_of[src.name]
            produces[s] = [p for p in produces[s] if p[0] != src.name] + [(node.name, int(index))]
            stage_of[node.name] = s
        elif node.op == "output":
            out = node.args[0]
            if isinstance(out, (tuple, list)):
                # (logits, None): a model that returns its own loss, traced without targets
                values = [o for o in out if o is not None]
                if len(values) != 1:
                    raise ConfigError(
                        "the model's forward returns several values; a pipeline computes the loss on the last stage "
                        "from one output: return one tensor (the logits), or (logits, loss) with loss None when no "
                        "targets are given (data.loss then computes it)"
                    )
                out = values[0]
            output = _value(out)
            users.setdefault(output, set()).add(num_stages)
    if stage_of.get(output) != num_stages - 1:
        raise ConfigError(
            f"the model's output is computed in stage {stage_of.get(output)} of {num_stages}: the last stage must "
            f"compute the output (move the modules after it into the last stage)"
        )
    live = [
        [v for v, s in stage_of.items() if s <= b and max(users.get(v, {-1})) > b]
        for b in range(num_stages - 1)
    ]
    modules = [pipe.get_stage_module(s) for s in range(num_stages)]
    return TracedStages(modules, args, produces, live, inputs, output)


def _value(node: Any) -> str:
    if not isinstance(node, fx.Node):
        raise ConfigError(f"a traced stage takes a constant ({node!r}) where a tensor is expected")
    return node.name
