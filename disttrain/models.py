"""Small built-in models: an MLP classifier for digits, a linear/MLP regressor for exact tests, and
a residual MLP of repeated blocks (for per-block sharding and activation checkpointing).

All keep their layers in an ``nn.Sequential`` named ``layers`` so that placements such as
``layers.0-3`` address them by index.
"""

from __future__ import annotations

from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"model.activation={name!r}: expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class MLP(nn.Module):
    """``in_features -> hidden x depth -> out_features`` with ReLU (or Tanh) between layers."""

    def __init__(
        self,
        in_features: int = 64,
        hidden: int = 128,
        out_features: int = 10,
        depth: int = 2,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"model.depth={depth}: must be >= 1 (the number of hidden layers)")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), _activation(activation)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Linear(nn.Module):
    """A single linear layer (linear regression): the smallest exact oracle."""

    def __init__(self, in_features: int = 8, out_features: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, out_features))

    def forward(self, x):
        return self.layers(x)


class Block(nn.Module):
    """A pre-norm residual feed-forward block (a transformer layer's MLP half):
    ``x + W2 act(W1 LayerNorm(x))``. The unit that ``strategy.wrap: [Block]`` shards and
    ``activation_checkpointing: [Block]`` recomputes."""

    def __init__(self, width: int, expansion: int = 4, activation: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, expansion * width)
        self.act = _activation(activation)
        self.fc2 = nn.Linear(expansion * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.fc2(self.act(self.fc1(self.norm(x)))))


class ResidualMLP(nn.Module):
    """``in_features -> hidden``, ``depth`` residual :class:`Block` s of width ``hidden``
    (``expansion x hidden`` inside), ``LayerNorm -> out_features``: a model made of repeated
    blocks, as transformers are, for sharding and activation checkpointing per block. Takes the
    same keys as :class:`MLP` (plus ``expansion``)."""

    def __init__(
        self,
        in_features: int = 64,
        hidden: int = 128,
        out_features: int = 10,
        depth: int = 2,
        activation: str = "gelu",
        dropout: float = 0.0,
        expansion: int = 4,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"model.depth={depth}: must be >= 1 (the number of blocks)")
        blocks = [Block(hidden, expansion, activation, dropout) for _ in range(depth)]
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden), *blocks, nn.LayerNorm(hidden), nn.Linear(hidden, out_features)
        )

    def forward(self, x):
        return self.layers(x)
