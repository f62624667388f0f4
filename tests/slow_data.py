"""A dataset made slow by construction, for the data-loading bottleneck tests: every
``__getitem__`` sleeps ``delay_s`` (a loader reading a slow disk or decoding images)."""

from __future__ import annotations

import time

from torch.utils.data import Dataset

from disttrain.data import synthetic_regression


class SlowDataset(Dataset):
    def __init__(self, inner: Dataset, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        time.sleep(self.delay_s)
        return self.inner[i]


def slow_regression(delay_s: float = 0.004, num_samples: int = 256, in_features: int = 8, out_features: int = 1,
                    noise: float = 0.1, seed: int = 0):
    """``disttrain.data.synthetic_regression`` whose training set sleeps ``delay_s`` per sample."""
    train, evaluation = synthetic_regression(num_samples, in_features, out_features, noise, seed)
    return SlowDataset(train, delay_s), evaluation
