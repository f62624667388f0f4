"""Stage building: the user's model becomes this rank's part of it, and the user's optimizer
follows, with nothing of either silently changed.

* :class:`StageModule` holds the user's modules under the user's own names (so ``state_dict``
  keys, checkpoints and error messages speak the unsplit model's names). Until the stages are
  known it holds the whole model; ``keep`` then drops every tensor no local stage uses.
* Initial values come from the user's code: ``init: full`` builds the whole model (exactly the
  unsplit model's initial weights for the same seed) and keeps this rank's part; ``init: meta``
  builds it on the meta device (no memory), allocates only this rank's tensors and fills them with
  the model's own ``init_weights()`` or ``reset_parameters()`` (the torchtitan convention);
  ``init: auto`` is ``meta`` when the model defines one of them, else ``full``.
* The optimizer is the user's object, narrowed in place to this rank's parameters
  (:func:`narrow_optimizer`): its class, its parameter groups and every option of each group stay
  as the user made them, and an LR scheduler attached to it keeps working.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, cast

import torch
from torch import nn

from disttrain.errors import ConfigError

USER_INITS = ("init_weights", "reset_parameters")
CALL_HINT = (
    "a pipeline stage is not called directly: its schedule runs forward and backward together. Replace "
    "`loss = loss_fn(model(inputs), targets); ds.backward(loss); optimizer.step()` with the one line "
    "`loss = ds.train_step(model, optimizer, (inputs, targets), loss_fn)` (evaluation: `ds.eval_forward(model, "
    "inputs)`, outputs on the last stage, None elsewhere)"
)


def user_init(model: nn.Module) -> str | None:
    """The name of the model's own whole-model initialiser, if its class defines one."""
    return next((n for n in USER_INITS if callable(getattr(type(model), n, None))), None)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device, made without
    copying any data (the skeleton that tracing cuts into stages)."""
    memo: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


class StageModule(nn.Module):
    """This rank's part of the user's model, under the user's fully qualified names. Not callable
    (see ``CALL_HINT``): the pipeline runs traced copies of its stages that share its tensors."""

    def __init__(self, model: nn.Module, on_meta: bool) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        self.model_name = type(model).__name__
        self.__dict__["_root"] = model  # not a submodule (its names would repeat); dropped by ``keep``
        self.on_meta = on_meta
        self.kept: set[str] | None = None  # None: the whole model is still here

    def forward(self, *args: object, **kwargs: object) -> None:
        raise ConfigError(CALL_HINT)

    @property
    def root(self) -> nn.Module:
        """The user's whole model (until ``keep``): what ``placement: auto`` measures."""
        assert self._root is not None, "the stages are cut already"
        return cast(nn.Module, self._root)

    def keep(self, names: set[str], device: torch.device) -> dict[int, nn.Parameter | None]:
        """Keep only the parameters and buffers named ``names`` (allocating them on ``device``
        and running the model's own initialiser if the model was built on meta), drop the rest.
        Returns how parameters were replaced: ``{id(old): new, or None if dropped}``."""
        replaced: dict[int, nn.Parameter | None] = {}
        had = {id(m) for m in self.modules() if _holds_tensors(m)}
        if self.on_meta:
            self._materialise(names, device, replaced)
        for mod_name, module in list(self.named_modules()):
            prefix = f"{mod_name}." if mod_name else ""
            for leaf, p in list(module._parameters.items()):
                if p is not None and prefix + leaf not in names:
                    replaced.setdefault(id(p), None)
                    del module._parameters[leaf]
            for leaf in [b for b in module._buffers if prefix + b not in names]:
                del module._buffers[leaf]
        _drop_emptied(self, had)
        self.kept = set(names)
        self.__dict__["_root"] = None
        return replaced

    def _materialise(self, names: set[str], device: torch.device, replaced: dict[int, nn.Parameter | None]) -> None:
        init = user_init(cast(nn.Module, self._root)) if self._root is not None else None
        assert init is not None, "build_whole builds on meta only for models with their own initialiser"
        for mod_name, module in self.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for leaf, p in list(module._parameters.items()):
                if p is not None and prefix + leaf in names and p.is_meta:
                    new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                    replaced[id(p)] = new
                    module._parameters[leaf] = new
            for leaf, b in list(module._buffers.items()):
                if b is not None and prefix + leaf in names and b.is_meta:
                    module._buffers[leaf] = torch.empty_like(b, device=device)
        self._sync_root()
        with torch.no_grad():
            getattr(self._root, init)()  # the other stages' tensors are meta: their init is a no-op
        self.on_meta = False

    def _sync_root(self) -> None:
        """Root-level tensors replaced here must be replaced on the user's root object too."""
        root = cast(nn.Module, self._root)
        assert root is not None
        for name, p in self._parameters.items():
            root._parameters[name] = p
        for name, b in self._buffers.items():
            root._buffers[name] = b


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _drop_emptied(module: nn.Module, had: set[int]) -> None:
    """Remove the submodules whose tensors were all dropped. A module that never held a tensor
    (an activation inside a kept block) stays: the block's own forward calls it."""
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if id(child) in had and not _holds_tensors(child):
            del module._modules[name]
        else:
            _drop_emptied(child, had)


def narrow_optimizer(optimizer: torch.optim.Optimizer, replaced: dict[int, nn.Parameter | None]) -> None:
    """Make ``optimizer`` (the user's object) hold only this rank's parameters: each parameter
    dropped by the stage cut leaves its group, each re-allocated one is swapped in. Groups keep
    every option and their order (an empty group stays, so schedulers' per-group lists still fit)."""
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            new = replaced.get(id(p), p)
            if new is not None:
                params.append(new)
            state = optimizer.state.pop(p, None)
            if new is not None and state:
                optimizer.state[new] = state
        group["params"] = params


def check_optimizer_covers(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], model_name: str) -> None:
    """The optimizer holds only the model's parameters (a second model's would never step)."""
    mine = {id(p) for p in params}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in mine)
    if foreign:
        raise ConfigError(
            f"the optimizer holds {foreign} parameter(s) that are not {model_name}'s: build it from "
            f"model.parameters() (or parameter groups of it) of the model you pass to the pipeline"
        )


def build_whole(factory: Callable[[], nn.Module], init: str) -> tuple[nn.Module, nn.Module, bool]:
    """``(model, skeleton, on_meta)``: the user's model built as ``init`` asks, and a meta
    skeleton of it for tracing. The meta build draws no random numbers, so the full build after
    it gives the unsplit model's initial weights for the same seed."""
    with torch.device("meta"):
        skeleton = factory()
    if init == "meta" and user_init(skeleton) is None:
        raise ConfigError(
            f"strategy.init=meta: {type(skeleton).__name__} defines neither init_weights() nor reset_parameters(), "
            f"so the values of a model built on the meta device cannot come from its own code (it initialises in "
            f"its constructor): set strategy.init=full (or auto, which builds it whole for such models)"
        )
    if init == "meta" or (init == "auto" and user_init(skeleton) is not None):
        return copy.deepcopy(skeleton), skeleton, True
    return factory(), skeleton, False
