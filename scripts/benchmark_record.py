"""Benchmark: memory and checkpoint state of DeconvCallback do not grow with the number of firings.

A real ``Trainer.fit`` of the demo's ZFNet (width 0.25, 64x64 images, one training batch per epoch) with
``DeconvCallback`` firing after every epoch, on a probe of ``--probe`` images (2048: each firing's Gram matrix
is 2048 x 2048 float64, 32 MiB per layer). After firings 2 and ``--firings`` it records the process's resident
memory (after ``gc.collect()``) and the size of the callback's ``state_dict`` as ``torch.save`` writes it into a
checkpoint, and, for comparison, what the grid's crops alone add between the two: the one thing that should grow.

Usage::

    python scripts/benchmark_record.py --threads 2
"""

from __future__ import annotations

import argparse
import gc
import io
import platform
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import cpu_name, rss_mb, write_report

from lightning_deconv import DeconvCallback
from lightning_deconv.paper.models import ZFNet


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = ZFNet(num_classes=10, width=0.25, input_size=64)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Measure(L.Callback):
    """After the epochs asked for (the callback has fired by then), memory and the monitor's state size."""

    def __init__(self, monitor: DeconvCallback, at: tuple[int, ...]) -> None:
        self.monitor, self.at, self.rows = monitor, at, {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.at:
            gc.collect()
            buffer = io.BytesIO()
            state = self.monitor.state_dict()
            torch.save(state, buffer)
            crops = sum(
                c["crops"].numel() * c["crops"].element_size() for h in state["history"].values() for c in h.values()
            )
            self.rows[epoch] = {"rss_mib": rss_mb(), "state_mib": buffer.tell() / 2**20, "crops_mib": crops / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=int, default=2048)
    parser.add_argument("--firings", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="runs/benchmark_record.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(args.probe, 3, 64, 64, generator=g)
    train = DataLoader(TensorDataset(torch.randn(32, 3, 64, 64, generator=g), torch.randint(0, 10, (32,))), 32)
    monitor = DeconvCallback(probe=probe, features_per_layer=8, epochs=range(1, args.firings + 1), batch_size=256)
    measure = Measure(monitor, (2, args.firings))
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_epochs=args.firings,
            callbacks=[monitor, measure],
            default_root_dir=root,
            logger=L.loggers.TensorBoardLogger(root),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(Classifier(), train)
        file_mib = (monitor.folder / "epoch_002.pt").stat().st_size / 2**20
    first, last = measure.rows[2], measure.rows[args.firings]
    result = {
        "machine": f"{cpu_name()}, {platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "settings": vars(args) | {"layers": list(monitor.features), "features_per_layer": 8},
        "after_firing": measure.rows,
        "rss_growth": last["rss_mib"] / first["rss_mib"] - 1,
        "state_growth_mib": last["state_mib"] - first["state_mib"],
        "crops_growth_mib": last["crops_mib"] - first["crops_mib"],
        "firing_file_mib": file_mib,
    }
    print(f"| measure | after firing 2 | after firing {args.firings} |")
    print("| --- | --- | --- |")
    print(f"| resident memory (MiB) | {first['rss_mib']:.0f} | {last['rss_mib']:.0f} ({result['rss_growth']:+.1%}) |")
    print(
        f"| callback state in a checkpoint (MiB) | {first['state_mib']:.1f} | {last['state_mib']:.1f} "
        f"(+{result['state_growth_mib']:.2f}; the grid's crops: +{result['crops_growth_mib']:.2f}) |"
    )
    print(f"one firing file: {file_mib:.0f} MiB ({len(monitor.features)} layers' Gram matrices on {args.probe} images)")
    write_report(args.json, result)


if __name__ == "__main__":
    main()
