"""Shared test helpers: tiny nets shaped like the paper's, data, LightningModules for either Lightning package, a
short fit, and tolerances. Every test module takes its helpers from here."""

from __future__ import annotations

import lightning.pytorch as L
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


def small_net(stem: nn.Conv2d) -> nn.Sequential:
    """``stem`` (8 output channels), ReLU and pooling, one more 3x3 conv, and a 4-class head."""
    return nn.Sequential(
        stem,
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
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


def zf_shaped(inplace: bool = True, width: int = 8) -> nn.Sequential:
    """ZFNet's stem in miniature: 7x7 stride-2 conv, overlapping 3x3 stride-2 pooling, 5x5 stride-2 conv,
    three 3x3 convs, padding and odd sizes; in-place ReLUs by default."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 7, stride=2, padding=1),  # 0
        nn.ReLU(inplace=inplace),  # 1
        nn.MaxPool2d(3, stride=2, padding=1),  # 2
        nn.Conv2d(w, 2 * w, 5, stride=2),  # 3
        nn.ReLU(inplace=inplace),  # 4
        nn.MaxPool2d(3, stride=2, ceil_mode=True),  # 5
        nn.Conv2d(2 * w, 3 * w, 3, padding=1),  # 6
        nn.ReLU(inplace=inplace),  # 7
        nn.Conv2d(3 * w, 3 * w, 3, padding=1),  # 8
        nn.ReLU(inplace=inplace),  # 9
        nn.Conv2d(3 * w, 2 * w, 3, padding=1),  # 10
        nn.ReLU(inplace=inplace),  # 11
        nn.MaxPool2d(3, stride=2),  # 12
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def images(n: int = 24, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)


def _image_and_label(batch):
    return (batch["image"], batch["label"]) if isinstance(batch, dict) else batch


class FunctionalPooling(nn.Module):
    """A max-pooling called functionally: the module trace cannot see it, so fields are unknown."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(F.max_pool2d(self.conv1(x), 3, stride=1, padding=1)))


class RectifiedFunctionalPooling(nn.Module):
    """Functional pooling between rectified convolutions: support crops whose size changes as it trains."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        x = F.max_pool2d(self.relu1(self.conv1(x)), 2)
        return self.relu3(self.conv3(self.relu2(self.conv2(x))))


class Classifier(L.LightningModule):
    """What a user writes: a network as ``self.net`` (built now or in ``configure_model``), loaders given to fit()."""

    def __init__(
        self, build=tiny_net, in_configure_model: bool = False, with_forward: bool = True, lr: float = 0.01
    ) -> None:
        super().__init__()
        self.build, self.in_configure_model, self.lr = build, in_configure_model, lr
        self.net = None if in_configure_model else build()
        if with_forward:
            self.forward = self._forward  # a forward of its own; else the steps call self.net directly

    def configure_model(self) -> None:
        if self.net is None:
            self.net = self.build()

    def _forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = _image_and_label(batch)
        return F.cross_entropy(self.net(x).flatten(1)[:, :4], y)

    def validation_step(self, batch, batch_idx):
        x, y = _image_and_label(batch)
        self.log("val_loss", F.cross_entropy(self.net(x).flatten(1)[:, :4], y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(tmp_path, model, callback, *, train=None, val=None, pl=L, max_epochs=2, **trainer_kwargs):
    x, y = images()
    train = train if train is not None else DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[callback],
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(model, train, val)
    return trainer
