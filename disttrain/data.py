"""Built-in data: scikit-learn's digits (shipped inside the package, no download) and a
synthetic regression task generated from a seed. Each builder returns ``(train, eval)`` datasets
of ``(inputs, targets)`` pairs; a user's own builder with the same shape plugs in by ``_target_``."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """8x8 handwritten digits (1,797 images, 10 classes), standardised, split by a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)  # statistics of the training split only
    std[std == 0] = 1.0  # pixels that are always blank in training
    def to_ds(a, b):
        return TensorDataset(torch.tensor((a - mean) / std, dtype=torch.float32), torch.tensor(b, dtype=torch.long))
    return to_ds(x_tr, y_tr), to_ds(x_te, y_te)


def synthetic_regression(
    num_samples: int = 512, in_features: int = 8, out_features: int = 1, noise: float = 0.1, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """``y = x W + b + noise`` with fixed seeds: an exact, cheap task for oracle tests."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(in_features, out_features, generator=g)
    b = torch.randn(out_features, generator=g)
    def make(n):
        x = torch.randn(n, in_features, generator=g)
        return TensorDataset(x, x @ w + b + noise * torch.randn(n, out_features, generator=g))
    return make(num_samples), make(max(num_samples // 4, 1))
