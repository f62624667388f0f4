"""The full-run face: epochs or max steps, accumulation, LR schedule, evaluation, checkpoints,
logging and sanity checks, on top of a Session. The loop stays a loop: every distributed act is a
Session (and so a Strategy) call, and nothing here asks which strategy or role this rank has."""

from __future__ import annotations

import itertools
import logging
import math
import pickle
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sized, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from disttrain import checkpoint as ckpt
from disttrain import faults, forward, schema, straggler
from disttrain.bottleneck import DataWaitCheck
from disttrain.errors import ConfigError, NonFiniteLossError
from disttrain.flops import FlopsMeter
from disttrain.loaders import ShardedLoader
from disttrain.observe import RunLogger
from disttrain.preemption import Preempted, job_store
from disttrain.session import Session
from disttrain.straggler import RankTimes, Verdict
from disttrain.watchdog import Watchdog, hang_key

log = logging.getLogger("disttrain")


@dataclass(frozen=True)
class TrainerConfig:
    """``conf/trainer/*.yaml``; checked in ``__post_init__`` (types from the annotations, then
    ranges) so a bad value fails before any work, with the key, the value and the rule."""

    max_epochs: int = 10
    max_steps: int | None = None
    gradient_accumulation_steps: int = 1
    grad_clip: float | None = None
    log_every_n_steps: int = 10
    eval_every_n_epochs: int = 1
    checkpoint_every_n_steps: int | None = None  # None: at the end of every epoch
    checkpoint_keep_last: int | None = 3
    resume: str | None = None  # None | "auto" | path to a checkpoint file or directory
    preflight_steps: int = 0  # >0: overfit one batch first and require the loss to fall
    check_finite: bool = True
    check_in_sync: bool = True
    progress_bar: str | bool = "auto"
    # straggler experiments: {rank: r, factor: f, model: busy | idle}; see straggle()
    slowdown: dict[str, Any] | None = field(default=None)
    save_on_preempt: bool = True  # SIGTERM/SIGUSR1: finish the step, checkpoint, exit 75
    data_wait_warn_fraction: float | None = 0.2  # warn once when waiting on data exceeds this share of a step
    estimate_only: bool = False  # print the memory estimate (disttrain.estimate) and exit before training
    straggler_margin: float = 0.2  # name the slowest rank when its data+compute exceeds the median by this fraction
    hang_timeout_s: float | None = 120.0  # a step or collective longer than this: dump stacks, name the late rank
    peak_flops: float | None = None  # per device, for MFU (None: the table of known GPUs)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], prefix: str = "trainer") -> "TrainerConfig":
        """From config values, naming any unknown key (``trainer.max_epoch`` is a typo)."""
        schema.check_dataclass_keys(cls, values, prefix)
        return cls(**values)

    def __post_init__(self) -> None:
        schema.check_dataclass_fields(self, "trainer")

        def bad(key: str, value: Any, rule: str) -> ConfigError:
            return ConfigError(f"trainer.{key}={value!r}: {rule}")

        if self.max_epochs < 1:
            raise bad("max_epochs", self.max_epochs, "must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", self.max_steps, "must be >= 1 or null (train for max_epochs)")
        if self.gradient_accumulation_steps < 1:
            raise bad("gradient_accumulation_steps", self.gradient_accumulation_steps, "must be >= 1")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise bad("grad_clip", self.grad_clip, "must be > 0 or null (no clipping)")
        for key in ("log_every_n_steps", "eval_every_n_epochs"):
            if getattr(self, key) < 1:
                raise bad(key, getattr(self, key), "must be >= 1")
        if self.checkpoint_every_n_steps is not None and self.checkpoint_every_n_steps < 1:
            raise bad("checkpoint_every_n_steps", self.checkpoint_every_n_steps, "must be >= 1 or null (every epoch)")
        if self.checkpoint_keep_last is not None and self.checkpoint_keep_last < 1:
            raise bad("checkpoint_keep_last", self.checkpoint_keep_last, "must be >= 1 or null (keep every checkpoint)")
        if self.preflight_steps < 0:
            raise bad("preflight_steps", self.preflight_steps, "must be >= 0 (0 disables the pre-flight)")
        if isinstance(self.progress_bar, str) and self.progress_bar != "auto":
            raise bad("progress_bar", self.progress_bar, "expected auto, true or false")
        if self.data_wait_warn_fraction is not None and not 0 < self.data_wait_warn_fraction < 1:
            raise bad("data_wait_warn_fraction", self.data_wait_warn_fraction, "must be in (0, 1) or null (no check)")
        if self.straggler_margin < 0:
            raise bad("straggler_margin", self.straggler_margin, "must be >= 0 (a fraction of the median step time)")
        if self.hang_timeout_s is not None and self.hang_timeout_s <= 0:
            raise bad("hang_timeout_s", self.hang_timeout_s, "must be > 0 seconds, or null (no hang watchdog)")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise bad("peak_flops", self.peak_flops, "must be > 0 FLOP/s per device, or null (known GPUs only)")
        if self.slowdown is not None:
            sd = self.slowdown
            if (not {"rank", "factor"} <= set(sd) <= {"rank", "factor", "model"} or float(sd["factor"]) < 1
                    or sd.get("model", "busy") not in STRAGGLER_MODELS):
                raise bad("slowdown", sd, "expected {rank: <int>, factor: <float >= 1>, model: busy | idle} or null "
                                          "(model busy: extra compute on the shared cores; idle: the rank holds "
                                          "without using the CPU, as a separate slower device would)")


STRAGGLER_MODELS = ("busy", "idle")


def straggle(extra_s: float, model: str = "busy") -> None:
    """Make a step ``extra_s`` seconds longer. ``busy``: extra compute on this process's core (a
    straggler sharing the machine's CPUs also slows the others). ``idle``: hold without using
    the CPU, simulating a separate, slower device (on a cluster each worker has its own)."""
    if extra_s <= 0:
        return
    if model == "idle":
        time.sleep(extra_s)
        return
    a = torch.randn(64, 64)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < extra_s:
        a = torch.tanh(a @ a)


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]] = {
    # each returns (sum over the batch, how many it summed), so sums reduce exactly across ranks
    "accuracy": lambda out, y: ((out.argmax(-1) == y).sum().double(), y.numel()),  # per target (token)
    "mse": lambda out, y: (((out.float() - y.float()) ** 2).mean(tuple(range(1, out.dim()))).sum().double(), len(y)),
}


class Trainer:
    """Train ``model`` with ``session``'s strategy. Build it after ``Session(...)``; call ``fit()``."""

    def __init__(
        self,
        session: Session,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[..., torch.Tensor] | None,
        train_data: Dataset,
        batch_size: int,
        config: TrainerConfig = TrainerConfig(),
        eval_data: Dataset | None = None,
        metric: str | None = None,
        scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None = None,
        run_dir: Path | None = None,
        num_workers: int = 0,
        seed: int = 0,
        hparams: dict[str, Any] | None = None,
        memory_watch: Any = None,
    ) -> None:
        if metric is not None and metric not in METRICS:
            raise ConfigError(f"data.metric={metric!r}: expected one of {sorted(METRICS)} or null")
        self.s, self.cfg = session, config
        self.loss_fn, self.metric = loss_fn, metric
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.ckpt_dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        check_checkpoint_dir(self.ckpt_dir, config.resume)
        self.batch_size = batch_size
        # before any collective of the strategy's own: a rank with another model or config
        # stops every rank here with the differing entry named, instead of hanging later
        session.verify_same_job(model, hparams)
        self.flops = FlopsMeter.measure(model, train_data, loss_fn, session.device, session.precision,
                                        session.world_size, config.peak_flops)
        self.rank_times = RankTimes(config.straggler_margin, session.training_ranks)
        self.watchdog = Watchdog(config.hang_timeout_s, session.rank, session.world_size,
                                 self.run_dir / "hang" if self.run_dir else None, job_store(), hang_key(session.env))
        self.model, prepared = session.prepare_model(model, optimizer)
        self.optimizer: torch.optim.Optimizer = cast(torch.optim.Optimizer, prepared)  # given one, every strategy returns one
        self.scheduler = scheduler_factory(self.optimizer) if scheduler_factory else None
        if self.scheduler is not None:
            session.register_for_checkpointing(self.scheduler)
        loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers)
        self.train_loader: ShardedLoader = session.prepare_loader(loader, seed=seed)
        self.eval_data = eval_data
        self.logger = RunLogger(self.run_dir, enabled=session.is_main)
        self.hparams = hparams or {}
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # optimizer steps taken in the current epoch
        self.history: list[tuple[int, float]] = []  # (step, this rank's loss), kept on training ranks
        self.stop = session.stop_request() if config.save_on_preempt else None
        self.preempted = False
        self.data_check = DataWaitCheck(config.data_wait_warn_fraction, rank=session.rank)
        self.memory_watch = memory_watch  # disttrain.footprint.MemoryWatch: measured vs estimated memory
        if memory_watch is not None:
            memory_watch.attach(self.model)

    # ------------------------------------------------------------------ public
    def fit(self) -> dict[str, Any]:
        """Train, then evaluate, checkpoint and summarise on every rank; returns the summary.
        Stopped by SIGTERM/SIGUSR1 (``save_on_preempt``): checkpoint, then raise Preempted."""
        try:
            self._resume()
            if self.stop is not None:
                self.stop.install()
            self.watchdog.start()
            self.rank_times.attach(self.s.unwrap(self.model))
            t0 = time.perf_counter()
            self.s.run(self._train, self.logger)  # ranks with other roles (servers) serve here
            elapsed = time.perf_counter() - t0
            self.watchdog.idle()
            self.s.finish_training()
            self._agree_on_progress()  # ranks that did not run the loop learn how far it got
            metrics = {} if self.preempted else self.evaluate()
            if metrics:
                self.logger.eval(self.step, metrics)
            path = self.save_checkpoint()
            if self.preempted:
                assert self.stop is not None
                raise Preempted(self.step, self.stop.signal_name, str(path) if path else None)
            return self._finish(metrics, elapsed)
        finally:
            if self.stop is not None:
                self.stop.uninstall()
            self.watchdog.stop()
            self.rank_times.detach()
            self.logger.close()

    def evaluate(self) -> dict[str, float]:
        """Loss (and the metric) over the whole eval set, reduced exactly across ranks: each
        rank sums over its own disjoint slice, then the sums are added."""
        if self.eval_data is None:
            return {}
        index, count = self.s.eval_shard
        part = Subset(self.eval_data, range(index, len(cast(Sized, self.eval_data)), count))  # no padding
        loader = DataLoader(part, batch_size=max(self.batch_size // count, 1))
        # Every rank runs as many forwards as the rank with the most batches (the others add empty
        # ones): a forward that communicates (fsdp gathers parameters) would otherwise wait forever.
        missing = int(self.s.reduce(torch.tensor(float(len(loader))), "max").item()) - len(loader)
        empty = [[t[:0] for t in default_collate([self.eval_data[0]])]] * missing
        sums = torch.zeros(4, dtype=torch.float64, device=self.s.device)  # loss, samples, metric, its count
        self.model.eval()
        for x, y in itertools.chain(loader, empty):
            out = self.s.eval_forward(self.model, x, y)
            if out is None or len(y) == 0:
                continue
            pred = forward.prediction_of(out)
            y = y.to(pred.device)
            sums[0] += forward.loss_of(out, y, self.loss_fn).double() * len(y)
            sums[1] += len(y)
            if self.metric:
                total, count = METRICS[self.metric](pred, y)
                sums[2] += total
                sums[3] += count
        self.model.train()
        sums = self.s.reduce(sums, "sum")
        result = {"loss": sums[0].item() / max(sums[1].item(), 1.0)}
        if self.metric:
            result[self.metric] = sums[2].item() / max(sums[3].item(), 1.0)
        return result

    # ------------------------------------------------------------------ the loop
    def _train(self) -> None:
        """The loop, on the ranks that train."""
        cfg, s = self.cfg, self.s
        self._check_in_sync()
        if cfg.preflight_steps and self.step == 0:
            self._preflight()
        max_steps = cfg.max_steps or math.inf
        steps_per_epoch = len(self.train_loader) // cfg.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise ConfigError(
                f"an epoch has {len(self.train_loader)} batches per rank, fewer than "
                f"trainer.gradient_accumulation_steps={cfg.gradient_accumulation_steps}: lower the batch size or accumulation"
            )
        log.info(
            "training: strategy=%s world=%d data-parallel=%d global batch=%d accumulation=%d steps/epoch=%d",
            s.strategy_name, s.world_size, s.data_shard[1], self.batch_size, cfg.gradient_accumulation_steps, steps_per_epoch,
        )
        bar = self._progress_bar(min(max_steps, cfg.max_epochs * steps_per_epoch))
        t_window, samples_window = time.perf_counter(), 0
        while self.epoch < cfg.max_epochs and self.step < max_steps and not self.preempted:
            for micro in self._micro_batches(steps_per_epoch):
                loss = s.train_step(self.model, self.optimizer, micro, self.loss_fn)
                self._slow_down(s.timer.step)
                self.rank_times.add(s.timer.step, s.timer.ended.get("backward"))
                self.watchdog.idle()  # between steps (logging, checkpoints, eval) collectives alone are watched
                if self.scheduler is not None:
                    self.scheduler.step()
                self.step += 1
                self.batch_in_epoch += 1
                phases = s.timer.end_step()
                self.data_check.observe(phases)
                if self.memory_watch is not None:
                    self.memory_watch.observe(self.step)
                local = loss.item()
                if cfg.check_finite and not math.isfinite(local):
                    raise NonFiniteLossError(
                        f"loss is {local} at step {self.step} (epoch {self.epoch}) on rank {s.rank}: lower "
                        f"optimizer.lr, set trainer.grad_clip, or check the data for NaN/inf"
                    )
                self.history.append((self.step, local))
                faults.inject("step", s.rank, self.step)
                samples_window += self.batch_size * cfg.gradient_accumulation_steps
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.log_every_n_steps == 0:
                    mean_loss = s.reduce(loss, "mean").item()
                    now = time.perf_counter()
                    rate = samples_window / max(now - t_window, 1e-9)
                    t_window, samples_window = now, 0
                    self._log_step(mean_loss, rate, phases, bar, self.rank_times.gather(s.all_gather_object))
                if self.stop is not None and self.stop.should_stop(self.step):
                    self.preempted = True
                    break
                if cfg.checkpoint_every_n_steps and self.step % cfg.checkpoint_every_n_steps == 0:
                    self.save_checkpoint()
                if self.step >= max_steps:
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
                self.train_loader.end_epoch()  # a partial accumulation group left over is dropped
                if self.eval_data is not None and self.epoch % cfg.eval_every_n_epochs == 0 and self.epoch < cfg.max_epochs:
                    metrics = self.evaluate()
                    self.logger.eval(self.step, metrics)
                    log.info("epoch %d step %d eval %s", self.epoch, self.step, _fmt(metrics))
                if not cfg.checkpoint_every_n_steps and self.epoch < cfg.max_epochs:
                    self.save_checkpoint()  # the last epoch's is the final checkpoint, written by fit()
                continue
            break  # max_steps reached, or a stop agreed, inside the epoch
        if bar is not None:
            bar.close()

    def _micro_batches(self, steps_per_epoch: int) -> Iterator[list]:
        """Groups of ``gradient_accumulation_steps`` batches; time spent waiting on the loader
        is recorded as the ``data`` phase. The loader resumes mid-epoch where it left off."""
        accum = self.cfg.gradient_accumulation_steps
        it = iter(self.train_loader)
        for _ in range(steps_per_epoch - self.batch_in_epoch):
            self.watchdog.beat(self.step + 1)
            with self.s.timer.phase("data"):
                faults.inject("data", self.s.rank, self.step + 1)
                group = [next(it) for _ in range(accum)]
            yield group

    # ------------------------------------------------------------------ pieces
    def _log_step(self, loss: float, rate: float, phases: dict[str, float], bar: Any, ranks: Verdict | None) -> None:
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else float("nan")
        scalars = {"train/loss": loss, "train/lr": lr, "train/samples_per_sec": rate}
        scalars.update({f"time/{k}_ms": v * 1e3 for k, v in phases.items()})
        scalars.update(self.s.strategy_metrics())
        scalars.update(self.flops.scalars(rate))
        if ranks is not None:
            scalars.update(straggler.scalars(ranks))
        self.logger.scalars(self.step, scalars)
        msg = f"epoch {self.epoch} step {self.step} loss {loss:.4f} lr {lr:.3g} {rate:.0f} samples/s"
        if "perf/tflops" in scalars:
            msg += f" {scalars['perf/tflops']:.3g} TFLOP/s" + (f" MFU {scalars['perf/mfu']:.1%}" if "perf/mfu" in scalars else "")
        if bar is not None:
            bar.set_postfix_str(f"loss {loss:.4f} {rate:.0f} samples/s")
        else:
            log.info(msg + " | " + " ".join(f"{k} {v * 1e3:.1f}ms" for k, v in phases.items()))

    def _finish(self, metrics: dict[str, float], elapsed: float) -> dict[str, Any]:
        timer = self.s.timer
        samples = self.step * self.batch_size * self.cfg.gradient_accumulation_steps
        strategy = self.s.strategy_summary()
        summary = {
            "steps": self.step,
            "epochs": self.epoch,
            "elapsed_s": elapsed,
            "samples_per_sec": samples / max(elapsed, 1e-9),
            "step_time_ms": {k: v * 1e3 for k, v in timer.mean().items()},
            **{f"eval_{k}": v for k, v in metrics.items()},
            **strategy,
            **self.data_check.summary(),
            **(self.memory_watch.summary() if self.memory_watch is not None else {}),
            **self.flops.summary(samples / max(elapsed, 1e-9)),
        }
        # every rank learns the verdict (rank 0, which writes, may not train: a parameter server)
        verdict = next((v for v in self.s.all_gather_object(self.rank_times.run_verdict(), everyone=True) if v), None)
        if verdict is not None:
            summary["straggler"] = verdict.as_dict()
            if verdict.flagged and self.s.is_main:
                log.warning("%s", verdict.message())
        self.logger.hparams({**self.hparams, "world_size": self.s.world_size}, {f"eval_{k}": v for k, v in metrics.items()})
        self.logger.plot(self.history)
        self.logger.summary(summary)
        extra = " ".join(f"{k}={v}" for k, v in strategy.items())
        log.info(
            "done: %d steps in %.1fs, %.0f samples/s, %s | mean step %s %s",
            self.step, elapsed, summary["samples_per_sec"], _fmt(metrics),
            " ".join(f"{k} {v:.1f}ms" for k, v in summary["step_time_ms"].items()), extra,
        )
        return summary

    def _agree_on_progress(self) -> None:
        """After the loop, every rank takes the progress (step, epoch, loader position, loss
        history) of the rank that got furthest (the lowest such rank): ranks that did not train
        (parameter servers) then write a final checkpoint that resumes where training stopped."""
        if self.s.world_size == 1:
            return
        steps = self.s.all_gather_object(self.step)
        lead = max(range(len(steps)), key=lambda r: (steps[r], -r))
        if all(st == steps[lead] for st in steps):
            return  # every rank trained (data parallel): each keeps its own
        mine = (self.step, self.epoch, self.batch_in_epoch, self.train_loader.state_dict(), self.history)
        state = self.s.broadcast_object(mine, src_index=lead)
        self.step, self.epoch, self.batch_in_epoch, loader, self.history = state
        self.train_loader.load_state_dict(loader)

    def _check_in_sync(self) -> None:
        if not self.cfg.check_in_sync:
            return
        differing = self.s.check_in_sync()
        if differing:
            raise RuntimeError(
                f"parameters differ across ranks after setup: {differing[:5]}{' ...' if len(differing) > 5 else ''}. "
                f"Seed every rank the same (seed=...) or let the strategy broadcast from rank 0"
            )

    def _preflight(self) -> None:
        """Overfit one batch for ``preflight_steps`` steps; the loss must at least halve. Then
        restore the model and optimizer, so the pre-flight leaves no trace on the real run."""
        snapshot = self.s.snapshot()
        batch = next(iter(self.train_loader.loader))
        losses = [
            self.s.reduce(self.s.train_step(self.model, self.optimizer, [batch], self.loss_fn), "mean").item()
            for _ in range(self.cfg.preflight_steps)
        ]
        first, last = losses[0], losses[-1]
        self.s.timer.step.clear()
        self.s.restore(snapshot)
        log.info("pre-flight: loss on one batch %.4f -> %.4f in %d steps", first, last, self.cfg.preflight_steps)
        if not (last < 0.5 * first):
            raise RuntimeError(
                f"pre-flight failed: the model could not overfit one batch (loss {first:.4f} -> {last:.4f} in "
                f"{self.cfg.preflight_steps} steps). Check the learning rate, the loss and the labels before a full run"
            )

    def _slow_down(self, phases: dict[str, float]) -> None:
        """The straggler knob: make this rank's compute take ``factor`` times as long, by extra
        busy work (``model: busy``, the default) or by holding idle (``model: idle``)."""
        sd = self.cfg.slowdown
        if not sd or int(sd["rank"]) != self.s.rank:
            return
        compute = phases.get("forward", 0.0) + phases.get("backward", 0.0) + phases.get("compute", 0.0)
        t0 = time.perf_counter()
        straggle((float(sd["factor"]) - 1.0) * compute, str(sd.get("model", "busy")))
        self.s.timer.add("straggle", time.perf_counter() - t0)

    def _progress_bar(self, total: float) -> Any:
        show = self.cfg.progress_bar
        if show == "auto":
            show = sys.stderr.isatty()
        if not show or not self.s.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=None if math.isinf(total) else int(total), unit="step", dynamic_ncols=True)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """The Trainer's part of a checkpoint; the Session adds model, optimizer, the loader's
        position, the scheduler, every rank's RNG states and the run's layout."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "global_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
            # this rank's per-step losses so far: a resumed run's history (plot, checks) is whole
            "loss_history": torch.tensor(self.history, dtype=torch.float64) if self.history else None,
        }

    def save_checkpoint(self) -> Path | None:
        if self.ckpt_dir is None:
            return None
        faults.inject("save", self.s.rank, self.step)
        path = self.ckpt_dir / f"step_{self.step:08d}.pt"
        return self.s.save(path, keep_last=self.cfg.checkpoint_keep_last, **self.checkpoint_state())

    def _find_checkpoint(self, where: str) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint ``trainer.resume`` names on this rank, loaded (so known complete)."""
        if where == "auto":
            if self.ckpt_dir is None or not self.ckpt_dir.is_dir():
                return None
            path = self.ckpt_dir
        else:
            path = Path(where)
            if not path.exists():
                raise ConfigError(f"trainer.resume={where!r}: no such file or directory (use auto, a .pt file or a checkpoint directory)")
        if path.is_dir():
            directory = path if path.name == "checkpoints" or not (path / "checkpoints").is_dir() else path / "checkpoints"
            found = ckpt.find_latest(directory)
            if found is None and (where != "auto" or ckpt.list_checkpoints(directory)):
                names = [p.name for p in ckpt.list_checkpoints(directory)]
                raise ConfigError(
                    f"trainer.resume={where!r}: no checkpoint in {directory} loads ({len(names)} found: {names[:5]}; "
                    f"see the warnings above for why each was skipped). Nothing was trained: move them away to start "
                    f"this run fresh in that directory, or point hydra.run.dir at a new one"
                )
            return found
        try:
            return path, ckpt.load(path)
        except Exception as exc:
            raise ConfigError(
                f"trainer.resume={where!r}: the checkpoint does not load ({ckpt.describe_load_error(exc)}). "
                f"Resume from another checkpoint (trainer.resume=auto picks the newest that loads) or set trainer.resume=null"
            ) from exc

    def _agree_on_checkpoint(self, found: tuple[Path, dict[str, Any]] | None) -> None:
        """Every rank must resume from the same checkpoint; a rank that sees another one (no
        shared filesystem, a file that loads on one node only) stops every rank alike."""
        mine = None if found is None else (found[0].name, int(found[1].get("extra", {}).get("step", -1)))
        seen = self.s.all_gather_object(mine, everyone=True)
        if len({repr(x) for x in seen}) > 1:
            listing = ", ".join(f"rank {r}: {x[0] if x else 'none'}" for r, x in enumerate(seen))
            raise ConfigError(
                f"trainer.resume={self.cfg.resume!r}: ranks found different checkpoints ({listing}). Put the run "
                f"directory on a filesystem every node shares, or pass the same checkpoint file to every rank"
            )

    def _resume(self) -> None:
        where = self.cfg.resume
        if not where:
            return
        found = self._find_checkpoint(str(where))
        self._agree_on_checkpoint(found)
        if found is None:
            log.info("resume=auto: no checkpoint yet in %s, starting fresh", self.ckpt_dir)
            return
        path, manifest = found
        try:
            extra = self.s.load(path, manifest=manifest)
        except ConfigError:
            raise
        except pickle.UnpicklingError as exc:  # a shard of a sharded checkpoint (the manifest loaded)
            raise ConfigError(
                f"trainer.resume: checkpoint {path} does not load ({ckpt.describe_load_error(exc)}). Resume from "
                f"another checkpoint or set trainer.resume=null"
            ) from exc
        except Exception as exc:  # every rank loads the same file, so every rank fails alike
            raise ConfigError(
                f"trainer.resume: checkpoint {path} does not fit this run ({type(exc).__name__}: {str(exc)[:300]}). "
                f"Resume with the model and optimizer config it was saved with, or start fresh (trainer.resume=null)"
            ) from exc
        del manifest
        self.step = int(extra["step"])
        self.epoch, done = self.train_loader.position()
        accum = self.cfg.gradient_accumulation_steps
        if done % accum:
            raise ConfigError(
                f"trainer.resume: checkpoint {path} stopped {done} batches into epoch {self.epoch}, not a whole number "
                f"of steps of trainer.gradient_accumulation_steps={accum}: resume with "
                f"trainer.gradient_accumulation_steps={extra.get('gradient_accumulation_steps')}"
            )
        self.batch_in_epoch = done // accum
        history = extra.get("loss_history")
        if history is not None:
            self.history = [(int(st), float(v)) for st, v in history.tolist() if st <= self.step]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)


def check_checkpoint_dir(ckpt_dir: Path | None, resume: str | None) -> None:
    """Before any work: the checkpoint directory can be written, and a fresh run (``resume``
    null) does not start in a directory that already holds checkpoints (another run's, or this
    run's from before a restart without ``trainer.resume=auto``): its saves would be mixed with
    them and ``resume=auto`` later could pick the other run's. ConfigError naming the fix."""
    if ckpt_dir is None:
        return
    existing = ckpt.list_checkpoints(ckpt_dir)
    if existing and not resume:
        raise ConfigError(
            f"{ckpt_dir} already holds {len(existing)} checkpoint(s) ({existing[-1].name}, ...) and trainer.resume is "
            f"null: set trainer.resume=auto to continue that run, or give this run its own directory "
            f"(hydra.run.dir=...); disttrain does not mix two runs' checkpoints"
        )
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write-test-{uuid.uuid4().hex[:8]}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"the checkpoint directory {ckpt_dir} cannot be written ({exc.strerror or exc}): fix its permissions or "
            f"free space, or point hydra.run.dir at a writable directory, before training starts"
        ) from exc


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
