"""What every run leaves to look at: TensorBoard events, log lines, a loss plot, a summary.

Only the main process writes; on other ranks every method is a no-op, so callers never check the
rank themselves.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger("disttrain")


def configure_logging(rank: int, run_dir: Path | None, level: int = logging.INFO) -> None:
    """Rank 0: INFO to stdout and ``run_dir/train.log``. Other ranks: warnings only, to stderr,
    prefixed with the rank, so a failing rank is still named in the output."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if rank == 0:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(run_dir / "train.log"))
        root.setLevel(level)
    else:
        fmt = logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
        handlers = [logging.StreamHandler(sys.stderr)]
        root.setLevel(logging.WARNING)
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)


class RunLogger:
    """Rank-0 TensorBoard writer (one event file per run), eval history and plots."""

    def __init__(self, run_dir: Path | None, enabled: bool) -> None:
        self.enabled = enabled and run_dir is not None
        # only read when enabled, which needs a run directory
        self.run_dir = Path(run_dir) if run_dir is not None else Path(".")
        self.writer: Any = None
        self.evals: list[tuple[int, dict[str, float]]] = []
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, float(v), step)

    def histogram(self, step: int, tag: str, values: Sequence[float]) -> None:
        if self.writer is not None and len(values):
            import numpy as np

            self.writer.add_histogram(tag, np.asarray(values, dtype=float), step)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def eval(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.enabled:
            self.evals.append((step, dict(metrics)))
        self.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Hyperparameters and final metrics, written into the same event file (SummaryWriter's
        own add_hparams would start a second one)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        final = {f"hparam/{k}": float(v) for k, v in metrics.items()}
        for summary in hp_summary(clean, final):
            self.writer.file_writer.add_summary(summary)
        for k, v in final.items():
            self.writer.add_scalar(k, v)

    def plot(self, history: Sequence[tuple[int, float]], name: str = "loss.png") -> Path | None:
        """Training loss over steps (``history``: ``(step, loss)``; and eval loss, if any) as a
        PNG in the run directory."""
        if not self.enabled or not history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps, losses = zip(*history)
        ax.plot(steps, losses, lw=1, label="train loss (rank 0)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_yscale("log" if min(losses) > 0 else "linear")
        ax.grid(alpha=0.3)
        if self.evals and "loss" in self.evals[0][1]:
            ax.plot([s for s, _ in self.evals], [m["loss"] for _, m in self.evals], "o-", label="eval loss")
        ax.legend()
        fig.tight_layout()
        path = self.run_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def summary(self, values: Mapping[str, Any], name: str = "summary.json") -> None:
        if self.enabled:
            (self.run_dir / name).write_text(json.dumps(values, indent=2, default=str) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
