"""How a batch goes through a user's model and becomes a loss, whatever the model returns.

* Inputs: a tensor (or any object) is passed as the one positional argument; a dict is passed as
  keyword arguments (``model(**batch_inputs)``, as Hugging Face models take them).
* Targets: passed to the model too when its ``forward`` names them (``targets``, ``labels``,
  ``target``, ``label`` or ``y``: nanoGPT's ``forward(idx, targets=None)``, Hugging Face's
  ``labels=``), so a model that computes its own loss gets what it needs.
* Output: a tensor (the loss function gives the loss: ``loss_fn(output, targets)``), a pair
  ``(output, loss)``, or a mapping with ``"loss"`` (and ``"logits"``): the model's own loss is used.
  Metrics read the prediction: the tensor, the pair's first item, or the mapping's ``"logits"``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, cast

import torch
from torch import nn

from disttrain.errors import ConfigError

TARGET_NAMES = ("targets", "labels", "target", "label", "y")
_KEYWORDS: dict[type, str | None] = {}


def user_module(model: nn.Module) -> nn.Module:
    """The user's module inside wrappers that keep it as ``.module`` (DDP, DeepSpeed's engine)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = cast(nn.Module, model.module)
    return model


def target_keyword(model: nn.Module) -> str | None:
    """The name under which ``model.forward`` takes the targets, or None."""
    inner = user_module(model)
    cls = type(inner)
    if cls not in _KEYWORDS:
        params: Mapping[str, Any]
        try:
            params = inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):
            params = {}
        _KEYWORDS[cls] = next((n for n in TARGET_NAMES if n in params), None)
    return _KEYWORDS[cls]


def call(model: nn.Module, inputs: Any, targets: Any = None) -> Any:
    """``model`` applied to ``inputs`` (and ``targets``, if its forward takes them)."""
    kwargs = {}
    key = target_keyword(model) if targets is not None else None
    if key is not None:
        kwargs[key] = targets
    if isinstance(inputs, dict):
        return model(**inputs, **kwargs)
    return model(inputs, **kwargs)


def loss_of(output: Any, targets: Any, loss_fn: Callable[..., torch.Tensor] | None) -> torch.Tensor:
    """The loss of one batch: the model's own when its output carries one, else ``loss_fn``
    of the prediction (the output tensor, or ``(logits, None)``'s logits: a model asked without
    targets, as pipeline stages run it)."""
    own = model_loss(output)
    if own is not None:
        return own
    if loss_fn is None:
        raise ConfigError(
            f"the model returned a {type(output).__name__} without a loss, and no loss function is set: set "
            f"data.loss (e.g. data.loss._target_=torch.nn.CrossEntropyLoss), or return (output, loss) or "
            f"{{'loss': ...}} from forward"
        )
    return loss_fn(prediction_of(output), targets)


def model_loss(output: Any) -> torch.Tensor | None:
    """The loss a model returned with its output (``(out, loss)`` or ``{"loss": ...}``), or None."""
    if isinstance(output, dict):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and len(output) == 2:
        loss = output[1]
    else:
        return None
    return loss if torch.is_tensor(loss) and loss.dim() == 0 else None


def prediction_of(output: Any) -> Any:
    """What metrics compare with the targets: the output tensor, ``(output, loss)[0]`` or
    ``output["logits"]``."""
    if isinstance(output, dict):
        return output.get("logits", next(iter(output.values())))
    if isinstance(output, (tuple, list)):
        return output[0]
    return output
