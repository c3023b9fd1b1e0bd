"""Smoke test of an installed lightning-deconv: fire the callback once in a real fit, with whichever Lightning
flavour is installed (``lightning`` or ``pytorch_lightning``), from outside the repository.

    python scripts/smoke_install.py OUT_DIR

Prints the flavour and the firing file, and fails unless the firing was recorded.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

import lightning_deconv
from lightning_deconv import DeconvCallback


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(4)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


out = Path(sys.argv[1])
data = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,)))
monitor = DeconvCallback(probe=data.tensors[0][:8], features_per_layer=2, epochs=(1,))
trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], default_root_dir=out, logger=False, enable_progress_bar=False)
trainer.fit(Tiny(), DataLoader(data, batch_size=8))
files = sorted(monitor.folder.glob("epoch_*.pt"))
assert [f.name for f in files] == ["epoch_001.pt"], files
assert all(sorted(h) == [1] for h in monitor.history.values()), monitor.history
where = Path(lightning_deconv.__file__).parent
print(f"smoke: {pl.__name__} {pl.__version__}, lightning_deconv from {where}: {files[0]}")
