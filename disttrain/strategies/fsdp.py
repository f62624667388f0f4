"""Sharded data parallelism with torch's own ``fully_shard`` (FSDP2), as torchtitan, Lightning's
ModelParallelStrategy and Accelerate's ``fsdp_version=2`` use it.

Each rank holds 1/N of every parameter, gradient and optimizer state (DTensors sharded on dim 0
over a DeviceMesh). ``fully_shard`` goes on each block, then on the root: a block's parameters
are all-gathered just before its forward (and again before its backward), its gradients
reduce-scattered right after. Results equal one process training on the gathered batch
(tests/test_fsdp.py). With ``replicate_size`` R > 1 the mesh is 2-D (R replicas x N/R shards,
HSDP): parameters are sharded within a replica group and gradients all-reduced across them.

Checkpoints: every rank writes its own shards, model and optimizer, with
``torch.distributed.checkpoint`` (no gather); DCP reshards on load, so a checkpoint of one
world size resumes at another. ``ds.save(path, full=True)`` gathers one whole state dict.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from disttrain import blocks
from disttrain import checkpoint as ckpt
from disttrain.env import DistEnv
from disttrain.errors import ConfigError
from disttrain.strategies.base import Strategy, require

log = logging.getLogger(__name__)


class FSDPStrategy(Strategy):
    """torch ``fully_shard`` per block, then on the root.

    ``wrap``: the block class names (``[Block]``) or ``auto`` (modules holding ``min_params``+
    parameters, see ``disttrain.blocks``). ``reshard_after_forward``: free gathered parameters
    after each block's forward (less memory, one more all-gather in backward). ``cpu_offload``:
    parameter shards, gradients and the optimizer step live on the CPU (torch's
    ``CPUOffloadPolicy``). ``replicate_size``: HSDP replica groups (1: shard over every rank).
    ``precision=bf16`` (the Session's) becomes a ``MixedPrecisionPolicy``: bf16 parameters and
    compute, fp32 gradient reduction and fp32 sharded master weights, fp32 outputs."""

    name = "fsdp"

    def __init__(
        self,
        wrap: str | list[str] = "auto",
        min_params: int = blocks.DEFAULT_MIN_PARAMS,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        replicate_size: int = 1,
    ) -> None:
        super().__init__()
        self.wrap_spec = wrap if isinstance(wrap, str) else list(wrap)
        self.min_params = min_params
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.replicate_size = replicate_size
        self.mesh: Any = None
        self.blocks: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    def validate(self, env: DistEnv) -> None:
        require(
            env.world_size > 1,
            "strategy=fsdp shards parameters, gradients and optimizer state over the ranks, but WORLD_SIZE=1: launch "
            "2 or more processes (torchrun --nproc_per_node=N), or use strategy=single for one process",
        )
        blocks.check_spec(self.wrap_spec, "strategy.wrap")
        require(self.min_params >= 1, f"strategy.min_params={self.min_params}: must be >= 1 (parameters per auto block)")
        r = self.replicate_size
        require(
            r >= 1 and env.world_size % r == 0,
            f"strategy.replicate_size={r}: must be >= 1 and divide WORLD_SIZE={env.world_size} (replicas x shards), "
            f"e.g. one of {[d for d in range(1, env.world_size + 1) if env.world_size % d == 0]}",
        )

    def setup(self, env: DistEnv, device: torch.device, backend: str, timeout_s: float) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        super().setup(env, device, backend, timeout_s)
        r = self.replicate_size
        shape, names = ((r, env.world_size // r), ("replicate", "shard")) if r > 1 else ((env.world_size,), ("shard",))
        self.mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)

    def teardown(self) -> None:
        self.mesh = None

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        """Broadcast rank 0's weights (as DDP does), ``fully_shard`` each block and the root,
        then point ``optimizer`` at the sharded parameters (``fully_shard`` replaces them)."""
        from torch.distributed.fsdp import fully_shard

        model = model.to(self.device)
        if optimizer is not None:
            _check_optimizer(optimizer, model, self.cpu_offload)
        _broadcast_from_rank0(model)
        names = {id(p): n for n, p in model.named_parameters()}
        self.blocks = blocks.select(model, self.wrap_spec, "strategy.wrap", self.min_params)
        log.info("fsdp: %d block(s) sharded one by one (%s), then the root; %d parameters, mesh %s",
                 len(self.blocks), blocks.shorten(self.blocks[::-1]) or "none", blocks.count_params(model),
                 dict(zip(self.mesh.mesh_dim_names, self.mesh.shape)))
        for name in self.blocks:
            fully_shard(model.get_submodule(name), **self._shard_options(root=False))
        fully_shard(model, **self._shard_options(root=True))
        if optimizer is not None:
            sharded = dict(model.named_parameters())
            for group in optimizer.param_groups:
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        return model, optimizer

    def _shard_options(self, root: bool) -> dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        options: dict[str, Any] = {"mesh": self.mesh, "reshard_after_forward": self.reshard_after_forward}
        if self.run_options.precision == "bf16":
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32 if root else None
            )
        if self.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        return options

    def apply_precision(self, model: nn.Module, precision: str) -> nn.Module:
        return model  # the MixedPrecisionPolicy of ``wrap`` casts parameters and inputs

    # ------------------------------------------------------------------ one step, in parts
    def set_grad_sync(self, model: nn.Module, enabled: bool) -> None:
        # Off: gradients accumulate unsharded, with no reduce-scatter, until the last micro-step.
        if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule after fully_shard
            cast(Any, model).set_requires_gradient_sync(enabled)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """torch's ``clip_grad_norm_`` over the DTensor gradient shards: the norm is the global
        one (shards' partial norms are reduced), returned as a plain tensor."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def check_in_sync(self, model: nn.Module) -> list[str]:
        """Parameters whose local shard differs across the replicate group (the ranks holding
        the same shard under HSDP). With one replica every rank's shard is its own."""
        if self.replicate_size == 1 or not dist.is_initialized():
            return []
        params = list(model.named_parameters())
        sums = torch.stack([cast(Any, p.detach()).to_local().double().sum() for _, p in params]).to(self.device)
        hi, lo = sums.clone(), sums.clone()
        group = self.mesh.get_group("replicate")
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        return [n for (n, _), h, low in zip(params, hi.tolist(), lo.tolist()) if h != low]

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_layout(self) -> str:
        return "dcp"

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"replicate_size": self.replicate_size}

    def save_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> dict | None:
        """Every rank writes its shards of model and optimizer into ``shards_dir(path)``; rank 0
        returns the manifest (written by the Session once every shard is down)."""
        state, has_optimizer_state = self._dcp_state(model, optimizer, saving=True)
        shards = ckpt.shards_dir(Path(path))
        ckpt.save_sharded(state, shards)
        if self.env is not None and not self.env.is_rank_zero:
            return None
        return {"fsdp": {"shards": shards.name, "optimizer_state": has_optimizer_state}}

    def load_checkpoint(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path, manifest: dict
    ) -> None:
        """Read this rank's part of every tensor (DCP reshards: any saving world size), then set
        it into the sharded model and optimizer."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        info = manifest.get("fsdp")
        if info is None:
            raise ConfigError(f"{path} holds no fsdp shards: resume it with the strategy that wrote it, or start fresh")
        state, _ = self._dcp_state(model, optimizer, saving=False, with_optimizer_state=info["optimizer_state"])
        ckpt.load_sharded(state, ckpt.shards_dir(Path(path)))
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    @staticmethod
    def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, saving: bool,
                   with_optimizer_state: bool = True) -> tuple[dict[str, Any], bool]:
        """``{"model": ..., "optimizer": ...}`` keyed by parameter names (DTensor shards), and
        whether the optimizer had state. torch makes a fresh optimizer's state by a zero step
        (Adam's step count becomes 1), so a stateless optimizer is saved as its hyperparameters
        only and left as it was."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if optimizer is None:
            return {"model": get_model_state_dict(model)}, False
        had_state = any(optimizer.state.values())
        model_state, optim_state = get_state_dict(model, optimizer)
        if (saving and not had_state) or not with_optimizer_state:
            optim_state = {"state": {}, "param_groups": optim_state["param_groups"]}
            if saving:
                optimizer.state.clear()  # undo torch's zero step
        return {"model": model_state, "optimizer": optim_state}, had_state

    def export_state_dict(self, model: nn.Module) -> dict[str, Any] | None:
        """The whole model gathered on rank 0, on the CPU, under the unsharded model's keys."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.env is None or self.env.is_rank_zero else None

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        return {"fsdp_blocks": len(self.blocks), "replicate_size": self.replicate_size}

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "wrap": self.wrap_spec, "min_params": self.min_params,
                "reshard_after_forward": self.reshard_after_forward, "cpu_offload": self.cpu_offload,
                "replicate_size": self.replicate_size}


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers, whatever its own seed did."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


# Optimizers whose step runs only on CUDA tensors, by module (what cpu_offload cannot take).
_CUDA_ONLY_MODULES = ("apex.", "bitsandbytes.", "transformer_engine.", "deepspeed.ops.adam.fused_adam")


def _check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, cpu_offload: bool) -> None:
    """The optimizer must hold only ``model``'s parameters and be fresh (``fully_shard``
    replaces the parameters its state is keyed by) and, with ``cpu_offload``, able to step on
    CPU tensors."""
    mine = {id(p) for p in model.parameters()}
    if any(id(p) not in mine for group in optimizer.param_groups for p in group["params"]):
        raise ConfigError(
            "strategy=fsdp got an optimizer holding parameters that are not the model's: build it on "
            "model.parameters() of the model you prepare with it"
        )
    if any(optimizer.state.values()):
        raise ConfigError(
            "strategy=fsdp got an optimizer that has already stepped: its state belongs to the unsharded "
            "parameters that fully_shard replaces. Pass the optimizer to ds.prepare() before its first step "
            "(load earlier state with ds.load after prepare)"
        )
    if not cpu_offload:
        return
    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__qualname__}"
    why = None
    if optimizer.defaults.get("capturable"):
        why = f"{name}(capturable=True) steps only on accelerator tensors"
    elif cls.__module__.startswith(_CUDA_ONLY_MODULES):
        why = f"{name} steps only on CUDA tensors"
    if why:
        raise ConfigError(
            f"strategy.cpu_offload=true keeps the parameter shards, gradients and optimizer step on the CPU, but {why}: "
            f"use an optimizer that runs on CPU tensors (e.g. torch.optim.AdamW with capturable=False, or "
            f"DeepSpeedCPUAdam), or set strategy.cpu_offload=false"
        )
