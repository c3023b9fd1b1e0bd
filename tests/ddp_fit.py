"""Run by test_callback.py in a subprocess: a 2-process CPU DDP fit (Lightning re-launches this script)."""

import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from helpers import dataset, module_class
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_deconv import DeconvCallback

out = Path(sys.argv[1])
projected: list[list] = []  # per firing, this rank's share: [[layer, channels], ...]
own_share = DeconvCallback._project_share


def recording_share(self, rank, world, state):
    share = own_share(self, rank, world, state)
    for layer in share["images"]:
        projected.append([layer, share["maxima"][layer].channels[rank::world].tolist()])
    return share


DeconvCallback._project_share = recording_share
L.seed_everything(0)
model = module_class(L)()
callback = DeconvCallback(probe=dataset(12, 7).tensors[0], features_per_layer=3, epochs=(1, 2), fire_at_end=False)
trainer = L.Trainer(
    strategy="ddp",
    accelerator="cpu",
    devices=2,
    max_epochs=2,
    callbacks=[callback],
    logger=TensorBoardLogger(out, name="run"),
    enable_progress_bar=False,
    enable_checkpointing=False,
    num_sanity_val_steps=0,
)
trainer.fit(model)
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(projected))
if trainer.is_global_zero:
    torch.save(model.state_dict(), out / "final.pt")
