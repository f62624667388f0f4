"""Digits with an MLP. plain_loop.py is ordinary one-process PyTorch; adapted_loop.py is the same
loop made distributed by disttrain (`diff` the two; run it with `torchrun --nproc_per_node=2`)."""
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import disttrain

torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loader = DataLoader(data, batch_size=64, shuffle=True)
ds = disttrain.setup(strategy="ddp")
model, optimizer, loader = ds.prepare(model, optimizer, loader)

for epoch in range(5):
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        ds.backward(loss)
        optimizer.step()
    print(f"epoch {epoch} loss {loss.item():.4f}")
