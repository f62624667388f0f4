"""Export a checkpoint as one consolidated file for inference: ``python -m disttrain.export
outputs/<run>/checkpoints/step_00000100.pt model.pt``.

One process, no process group: a sharded checkpoint (``dcp`` layout, written by ``strategy=fsdp``
at any world size) is read whole from its shards; a whole one (``full`` layout: ddp, single,
horovod, ...) is copied. The output is what ``ds.save(path, full=True)`` writes:
``{"model": state_dict, "extra": {"step": ...}}``, loadable with ``torch.load(path, weights_only=True)``
into the unwrapped model. Reading refuses pickled code, as every disttrain load does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from disttrain import checkpoint as ckpt
from disttrain.errors import ConfigError

_PREFIX = "model."  # the model's entries in a sharded checkpoint: {"model": ..., "optimizer": ...}


def consolidate(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole model state dict of checkpoint ``path`` and its manifest's ``extra``."""
    manifest = ckpt.load(path)
    extra = manifest.get("extra") or {}
    layout = (extra.get("meta") or {}).get("layout", "full")
    if layout == "full":
        return manifest["model"], extra
    if layout != "dcp":
        raise ConfigError(
            f"{path} holds model state in the {layout!r} layout of strategy={extra.get('meta', {}).get('strategy')!r}, "
            f"which this tool cannot read: export it from a run of that strategy with ds.save(path, full=True)"
        )
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    shards = ckpt.shards_dir(Path(path))
    entries = ckpt.sharded_metadata(shards).state_dict_metadata
    model = {
        fqn[len(_PREFIX):]: torch.empty(md.size, dtype=md.properties.dtype)
        for fqn, md in entries.items()
        if fqn.startswith(_PREFIX) and isinstance(md, TensorStorageMetadata)
    }
    state = {"model": model}
    ckpt.load_sharded(state, shards)  # one process: every shard read into the whole tensors
    return state["model"], extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disttrain.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint manifest, e.g. outputs/<run>/checkpoints/step_N.pt")
    parser.add_argument("out", type=Path, help="the consolidated file to write")
    args = parser.parse_args(argv)
    try:
        model, extra = consolidate(args.checkpoint)
    except (ConfigError, OSError) as exc:
        print(f"disttrain.export: {exc}", file=sys.stderr)
        return 2
    step = extra.get("step")
    ckpt.write_full(args.out, model, {"step": step} if step is not None else {})
    print(f"wrote {args.out}: {len(model)} tensors, {sum(t.numel() for t in model.values()):,} parameters and buffers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
