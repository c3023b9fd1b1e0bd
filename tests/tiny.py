"""A tiny LightningModule and data for callback tests, for either Lightning package."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def tiny_net(dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(16 * 4 * 4, 4),
    )


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g))


def module_class(pl):
    """A classifier LightningModule class built on ``pl`` (``lightning.pytorch`` or ``pytorch_lightning``)."""

    class Tiny(pl.LightningModule):
        def __init__(self, dropout: float = 0.0, shuffle: bool = True) -> None:
            super().__init__()
            self.net = tiny_net(dropout)
            self.shuffle = shuffle
            self.steps = 0

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            self.steps += 1
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(dataset(64, 0), batch_size=16, shuffle=self.shuffle)

        def val_dataloader(self):
            return DataLoader(dataset(32, 1), batch_size=16)

    return Tiny
