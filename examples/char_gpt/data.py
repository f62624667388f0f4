"""Character-level text data, shipped inside an installed package (scikit-learn's dataset
descriptions, ~15 k characters of English): no download. The builder returns the train and eval
datasets and the facts the model config reads (``${data.facts.vocab_size}``)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def corpus() -> str:
    from sklearn import datasets as d

    loaders = (d.load_iris, d.load_digits, d.load_wine, d.load_breast_cancer, d.load_diabetes, d.load_linnerud)
    return "".join(load().DESCR for load in loaders)


def char_datasets(block_size: int = 64, eval_fraction: float = 0.1, stride: int | None = None):
    """``(train, eval, facts)``: windows of ``block_size`` characters (inputs) and the same
    windows shifted by one (targets), every ``stride`` characters (default: half a window)."""
    text = corpus()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(len(ids) * (1 - eval_fraction))

    def windows(part: torch.Tensor) -> TensorDataset:
        starts = torch.arange(0, len(part) - block_size - 1, stride or block_size // 2)
        x = torch.stack([part[s : s + block_size] for s in starts.tolist()])
        y = torch.stack([part[s + 1 : s + 1 + block_size] for s in starts.tolist()])
        return TensorDataset(x, y)

    return windows(ids[:split]), windows(ids[split:]), {"vocab_size": len(chars), "block_size": block_size}
