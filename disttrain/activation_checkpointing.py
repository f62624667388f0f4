"""Activation checkpointing per block, for every strategy: ``activation_checkpointing=[Block]``
(or ``auto``) wraps each block in torch's checkpoint wrapper (non-reentrant), so its forward
keeps only the block's input and recomputes the rest during backward: less activation memory
for about one more forward per step (measured in docs/fsdp.md).

Applied by ``Session.prepare_model`` before the strategy wraps the model (for ``fsdp``: before
``fully_shard``, which then shards each checkpointed block as one unit). Parameters and state
dict keys are unchanged (the wrapper strips its own prefix), so optimizers built on the model
and checkpoints of runs without it keep working.
"""

from __future__ import annotations

import logging
from typing import Sequence

from torch import nn

from disttrain import blocks

log = logging.getLogger(__name__)

KEY = "activation_checkpointing"


def check(spec: str | Sequence[str] | None) -> None:
    """ConfigError for a malformed spec (``None`` turns checkpointing off)."""
    if spec is not None:
        blocks.check_spec(spec, KEY)


def apply(model: nn.Module, spec: str | Sequence[str] | None) -> list[str]:
    """Wrap the blocks of ``model`` named by ``spec`` (the outermost, where they nest) in place;
    returns their names. ``auto`` picks blocks of at least ``blocks.DEFAULT_MIN_PARAMS``
    parameters that have submodules. A class name that matches nothing raises ConfigError."""
    if spec is None:
        return []
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    found = blocks.outermost(blocks.select(model, spec, KEY, single_layers=False))
    names = [n for n in found if not isinstance(model.get_submodule(n), CheckpointWrapper)]  # not prepared before
    chosen = {id(model.get_submodule(n)) for n in names}
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: id(m) in chosen)
    if names:
        log.info("activation checkpointing: %d block(s) recompute their forward in backward: %s",
                 len(names), blocks.shorten(names[::-1]))
    elif not found:  # auto found nothing (a class name that matches nothing raised in select)
        log.warning("%s=auto: no module with submodules holds %d+ parameters; nothing is checkpointed "
                    "(name the block class instead, e.g. %s=[Block])", KEY, blocks.DEFAULT_MIN_PARAMS, KEY)
    return names
