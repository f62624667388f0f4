"""DeepSpeed as an engine behind the Strategy interface: ZeRO stages 0-3, bf16, accumulation and
clipping taken from the Session's options (one source of truth), checkpoints through DeepSpeed's
own ``save_checkpoint``/``load_checkpoint``.

Launch it like every other strategy (``torchrun --nproc_per_node=N -m disttrain strategy=deepspeed``):
the process group is torch's (gloo on CPU, NCCL on GPUs), which DeepSpeed adopts. The user's
torch optimizer is handed to DeepSpeed (so no fused op is compiled and LR schedulers keep working
on it). ZeRO partitions optimizer state (1), gradients (2) and parameters (3) across the ranks;
the result still equals one process training on the gathered batch (tests/test_deepspeed.py).

Install: ``pip install -c requirements/constraints.txt -e '.[deepspeed]'`` (see docs/engines.md).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from disttrain import checkpoint as ckpt
from disttrain.env import DistEnv
from disttrain.errors import ConfigError
from disttrain.strategies.base import Strategy, require
from disttrain.tree import map_tensors, to_plain

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with: pip install -c requirements/constraints.txt -e '.[deepspeed]' "
    "(or: bash scripts/setup_env.sh dev,deepspeed); see docs/engines.md"
)

#: DeepSpeed config keys that disttrain derives from its own options: set those instead.
_OWNED_KEYS = {
    "gradient_accumulation_steps": "trainer.gradient_accumulation_steps",
    "gradient_clipping": "trainer.grad_clip",
    "bf16": "precision=bf16",
    "bfloat16": "precision=bf16",
    "fp16": "precision=bf16 (fp16 is not offered: bf16 needs no loss scaling)",
    "train_batch_size": "data.batch_size (the global batch; disttrain feeds the batches)",
    "optimizer": "optimizer=... (disttrain hands your torch optimizer to DeepSpeed)",
}



def import_deepspeed(what: str = "strategy=deepspeed") -> Any:
    """``import deepspeed`` or a ConfigError saying how to install it."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip accelerator probing (and its warning)
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(f"{what} needs DeepSpeed, which is not installed ({exc}): {INSTALL_HINT}") from exc
    return deepspeed


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge ``extra`` into a copy of ``base`` (``extra`` wins)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class DeepSpeedStrategy(Strategy):
    """``deepspeed.initialize`` around the model and the user's optimizer.

    ``zero_stage`` (0-3) picks the ZeRO stage; ``config`` is merged last into the DeepSpeed config
    that disttrain builds, for any other DeepSpeed key (e.g. ``zero_optimization.overlap_comm``,
    ``communication_data_type``). Accumulation, clipping and bf16 come from the Session."""

    name = "deepspeed"

    def __init__(
        self,
        zero_stage: int = 1,
        config: Mapping[str, Any] | None = None,
        log_level: str = "warning",
        shm_comm_op: bool = False,
    ) -> None:
        super().__init__()
        self.shm_comm_op = bool(shm_comm_op)
        self.zero_stage = zero_stage
        self.extra_config: dict[str, Any] = dict(to_plain(config) or {})
        self.log_level = str(log_level)
        self.engine: Any = None
        self._ds: Any = None
        self._unwatch_clipping: Any = None

    # ------------------------------------------------------------------ lifecycle
    def validate(self, env: DistEnv) -> None:
        require(
            isinstance(self.zero_stage, int) and not isinstance(self.zero_stage, bool) and self.zero_stage in (0, 1, 2, 3),
            f"strategy.zero_stage={self.zero_stage!r}: expected one of [0, 1, 2, 3] "
            f"(0: plain data parallel, 1: shard optimizer state, 2: + gradients, 3: + parameters)",
        )
        require(
            isinstance(self.extra_config, dict),
            f"strategy.config={self.extra_config!r}: expected a mapping of DeepSpeed config keys, e.g. "
            f"strategy.config={{zero_optimization: {{overlap_comm: true}}}}",
        )
        for key, instead in _OWNED_KEYS.items():
            require(
                key not in self.extra_config,
                f"strategy.config.{key} is set, but disttrain derives it from its own options: remove it and set "
                f"{instead} instead (one source of truth)",
            )
        zero = self.extra_config.get("zero_optimization", {})
        require(
            not isinstance(zero, Mapping) or "stage" not in zero,
            f"strategy.config.zero_optimization.stage={zero.get('stage') if isinstance(zero, Mapping) else None!r}: "
            f"set strategy.zero_stage instead (allowed: 0, 1, 2, 3)",
        )
        levels = ("debug", "info", "warning", "error")
        require(self.log_level in levels, f"strategy.log_level={self.log_level!r}: expected one of {list(levels)}")
        self._ds = import_deepspeed()

    def setup(self, env: DistEnv, device: torch.device, backend: str, timeout_s: float) -> None:
        super().setup(env, device, backend, timeout_s)
        if not dist.is_initialized():
            # DeepSpeed always needs a process group; one process gets a private one-rank group
            # (in-memory store: no port), ended by the Session like any other.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self._group_started = True
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # deepspeed.initialize insists on it
        logging.getLogger("DeepSpeed").setLevel(self.log_level.upper())
        with self._comm_start():
            self._ds.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)

    def _comm_start(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if self.shm_comm_op else _without_shm_op()

    def teardown(self) -> None:
        if self._unwatch_clipping is not None:
            self._unwatch_clipping()
            self._unwatch_clipping = None
        if self.engine is not None:
            self.engine.destroy()  # releases its hooks and buffers before the process group ends
        self.engine = None
        _forget_process_groups()


    # ------------------------------------------------------------------ config
    def ds_config(self) -> dict[str, Any]:
        """The DeepSpeed config: disttrain's options, then ``strategy.config`` merged last."""
        ro = self.run_options
        cfg: dict[str, Any] = {
            # DeepSpeed insists on a micro-batch size; disttrain feeds the batches itself, so it
            # only affects DeepSpeed's own throughput prints (override it in strategy.config).
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": ro.gradient_accumulation_steps,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": ro.precision == "bf16"},
            "zero_allow_untested_optimizer": True,  # the user's torch optimizer
            "steps_per_print": 2**31 - 1,  # disttrain logs progress itself
            "wall_clock_breakdown": False,
        }
        # always set: DeepSpeed's own default (1.0) would clip when trainer.grad_clip is null
        cfg["gradient_clipping"] = float(ro.grad_clip) if ro.grad_clip else 0.0
        return _merge(cfg, self.extra_config)

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        """``deepspeed.initialize``. Returns the engine and the user's optimizer object (which
        DeepSpeed steps inside its ZeRO wrapper: LR schedulers built on it keep working)."""
        model = model.to(self.device)
        with self._comm_start():  # initialize may start DeepSpeed's comm backend again
            self.engine, _, _, _ = self._ds.initialize(
                model=model, optimizer=optimizer, config=self.ds_config(), dist_init_required=False
            )
        if self._unwatch_clipping is None:
            self._unwatch_clipping = watch_user_clipping(self.engine)
        return self.engine, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def apply_precision(self, model: nn.Module, precision: str) -> nn.Module:
        """DeepSpeed's bf16 keeps bf16 weights (fp32 master copies in the optimizer): cast the
        floating-point inputs to bf16 and return fp32 outputs, so callers see no difference."""
        if precision == "bf16":
            model.forward = _bf16_io_forward(model.forward)
        return model

    # ------------------------------------------------------------------ one step, in parts
    def set_grad_sync(self, model: Any, enabled: bool) -> None:
        # DeepSpeed reduces gradients (and ZeRO partitions them) at the accumulation boundary.
        self._sync_next = enabled
        if hasattr(model, "set_gradient_accumulation_boundary"):
            model.set_gradient_accumulation_boundary(enabled)

    def backward(self, loss: torch.Tensor, model: Any) -> None:
        # The Session (and train_step) already divided the loss by the accumulation steps.
        model.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        raise NotImplementedError(
            "strategy=deepspeed clips inside its step: set trainer.grad_clip (Session(grad_clip=...)) instead of "
            "calling clip_grad_norm_ yourself"
        )

    def optimizer_step(self, model: Any, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        """``engine.step()``: reduce/partition gradients, clip (``gradient_clipping`` is the
        Session's grad_clip), step the optimizer, zero the gradients. Called only at the end of
        an accumulation cycle, but the plug-in face may already have announced the next
        micro-step's (non-)sync: DeepSpeed steps only at a boundary, so mark one for the step."""
        model.set_gradient_accumulation_boundary(True)
        try:
            model.step()
        finally:
            model.set_gradient_accumulation_boundary(getattr(self, "_sync_next", True))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """The full model weights (gathered under ZeRO-3) for in-memory use; the optimizer's
        state is sharded by ZeRO, so checkpoints go through ``save_checkpoint``."""
        module = self.unwrap(model)
        if self.zero_stage == 3:
            params = list(module.parameters())
            with self._ds.zero.GatheredParameters(params, modifier_rank=None):
                state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return {"model": state, "optimizer": None}

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
        """Load full model weights (as ``state_dict`` returns them) and refresh ZeRO's fp32
        master copies from them. Optimizer state is restored only by ``load_checkpoint``."""
        module = self.unwrap(model)
        if self.zero_stage == 3:
            params = list(module.parameters())
            with self._ds.zero.GatheredParameters(params, modifier_rank=0):
                module.load_state_dict(state["model"])
        else:
            module.load_state_dict(state["model"])
        inner = getattr(model, "optimizer", None)
        if inner is not None and hasattr(inner, "refresh_fp32_params"):
            inner.refresh_fp32_params()

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"zero_stage": self.zero_stage}

    def check_resume(self, meta: dict[str, Any]) -> None:
        saved_stage, saved_world = meta.get("zero_stage"), meta.get("world_size")
        require(
            saved_stage is not None,
            f"the checkpoint was written by strategy={meta.get('strategy')!r}, not by strategy=deepspeed (it has no "
            f"DeepSpeed shards): resume it with the strategy that wrote it, or start fresh",
        )
        require(
            saved_stage == self.zero_stage,
            f"the checkpoint was written with strategy.zero_stage={saved_stage}, this run has zero_stage="
            f"{self.zero_stage}: resume with strategy.zero_stage={saved_stage}",
        )
        world = self.env.world_size if self.env is not None else None
        require(
            self.zero_stage == 0 or saved_world is None or world is None or saved_world == world,
            f"the checkpoint's ZeRO-{saved_stage} shards were written by {saved_world} ranks, this run has {world}: "
            f"resume with --nproc_per_node={saved_world} (or convert it with DeepSpeed's universal checkpoint tools)",
        )

    def checkpoint_layout(self) -> str:
        return "deepspeed"

    def save_checkpoint(self, model: Any, optimizer: torch.optim.Optimizer | None, path: Path) -> dict | None:
        """DeepSpeed's ``save_checkpoint`` into ``checkpoint.shards_dir(path)`` on every rank; once
        every shard is written, rank 0 returns the manifest (the Session writes it atomically and
        advances ``latest``): the pointer never names a partial checkpoint."""
        shards = ckpt.shards_dir(Path(path))
        model.save_checkpoint(str(shards.parent), tag=shards.name, client_state={}, save_latest=False)
        self.barrier()
        if self.env is None or self.env.is_rank_zero:
            return {"deepspeed": {"tag": shards.name, "zero_stage": self.zero_stage}}
        return None

    def load_checkpoint(
        self, model: Any, optimizer: torch.optim.Optimizer | None, path: Path, manifest: dict
    ) -> None:
        """DeepSpeed's ``load_checkpoint``, with every ``torch.load`` it makes restricted to
        ``weights_only=True`` (DeepSpeed itself passes ``weights_only=False``, which would run
        whatever a crafted shard's pickle asks): only the DeepSpeed data classes its files hold
        are allowed besides tensors and containers."""
        info = manifest.get("deepspeed")
        if info is None:
            raise ConfigError(
                f"{path} was not written by strategy=deepspeed (no DeepSpeed shards): resume it with the strategy "
                f"that wrote it, or start fresh"
            )
        shards = ckpt.shards_dir(Path(path))
        with weights_only_loads():
            # every rank checks every shard (memory-mapped: the pickles only, not the tensor data)
            # before DeepSpeed's collective load: a refused file stops every rank alike, none
            # waits in a collective the others never reach
            for f in sorted(shards.rglob("*.pt")):
                ckpt.load(f, mmap=True)
            load_path, _ = model.load_checkpoint(
                str(shards.parent), tag=shards.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {shards}")

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        return {"zero_stage": self.zero_stage}



def _deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes its ZeRO checkpoint files pickle (plain data: a loss-scaler's
    numbers, an enum, a named tuple of offsets); nothing that can run code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every ``torch.load`` (DeepSpeed's included: it calls ``torch.load`` by attribute)
    runs with ``weights_only=True`` and DeepSpeed's data classes allow-listed."""
    real = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = real  # type: ignore[assignment]


def _bf16_io_forward(forward: Any) -> Any:
    import functools

    def cast(x: Any, dtype: torch.dtype) -> Any:
        return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, x)

    @functools.wraps(forward)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return cast(forward(*cast(args, torch.bfloat16), **cast(kwargs, torch.bfloat16)), torch.float32)

    return wrapped


def _forget_process_groups() -> None:
    """DeepSpeed caches its process groups (and its comm backend) in module globals; once the
    Session ends the default group they are dead handles, and a later Session in the same process
    (a notebook, a test) would fail with "Group ... is not registered". Reset them to their
    import-time values so the next ``deepspeed.initialize`` makes fresh ones."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()
    ds_comm.cdb = None



def watch_user_clipping(engine: Any) -> Any:
    """Warn once when the user's own ``torch.nn.utils.clip_grad_norm_`` is called on parameters
    DeepSpeed manages: DeepSpeed keeps their gradients in its own buffers (ZeRO-1 and up leave
    ``p.grad`` empty: the call clips nothing) and clips inside its step, so the run silently
    departs from ddp's. Returns the function that removes the watch."""
    import torch.nn.utils as nn_utils
    import torch.nn.utils.clip_grad as clip_grad

    original = nn_utils.clip_grad_norm_
    managed = {id(q) for q in engine.module.parameters()}
    warned = [False]

    def clip_grad_norm_(parameters: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        params = [parameters] if torch.is_tensor(parameters) else list(parameters)
        if not warned[0] and any(id(q) in managed for q in params):
            warned[0] = True
            log.warning(
                "strategy=deepspeed: torch.nn.utils.clip_grad_norm_ on the model DeepSpeed manages does not clip "
                "what DeepSpeed steps with (it holds the gradients itself and clips inside its step, after "
                "reducing them across ranks): remove the call and set setup(grad_clip=...) / trainer.grad_clip"
            )
        return original(params, *args, **kwargs)

    nn_utils.clip_grad_norm_ = clip_grad_norm_
    clip_grad.clip_grad_norm_ = clip_grad_norm_

    def unwatch() -> None:
        nn_utils.clip_grad_norm_ = original
        clip_grad.clip_grad_norm_ = original

    return unwatch


@contextlib.contextmanager
def _without_shm_op() -> Iterator[None]:
    """DeepSpeed's CPU shared-memory allreduce op serves only ``inference_all_reduce``
    (DeepSpeed-Inference); training never calls it and falls back to torch's all_reduce without
    it. Not building it saves a C++ compile of minutes on first use, and the hang on
    torch_extensions' stale lock if that compile is ever interrupted (seen here: a killed test
    run left the lock, and every later DeepSpeed start waited on it forever)."""
    import importlib

    # (not ``import deepspeed.comm.torch as m``: deepspeed.comm's attribute ``torch`` is torch)
    ds_torch_comm: Any = importlib.import_module("deepspeed.comm.torch")
    build = ds_torch_comm.build_shm_op
    ds_torch_comm.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch_comm.build_shm_op = build
