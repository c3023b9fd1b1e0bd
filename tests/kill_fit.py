"""Run by test_record.py in a subprocess: a real fit that can be SIGKILLed while a firing's file is written.

``python kill_fit.py OUT [KILL_AT] [--resume]``: trains the tiny net for 3 epochs (firings after epochs 1 and 2,
and at the end of training) with a last checkpoint each epoch. With ``KILL_AT`` (a file name such as
``epoch_002.pt``), writing that file stops half-way, says so in ``OUT/writing`` and waits to be killed.
``--resume`` resumes from ``OUT/ckpt/last.ckpt`` (the logger then writes a new version).
"""

import sys
import time
from pathlib import Path

import lightning.pytorch as L
from helpers import dataset, module_class
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_deconv.record as record
from lightning_deconv import DeconvCallback

out = Path(sys.argv[1])
kill_at = next((a for a in sys.argv[2:] if not a.startswith("--")), None)
resume = "--resume" in sys.argv

if kill_at:
    atomic_write = record.atomic_write

    def stalling_write(path, write):
        if Path(path).name != kill_at:
            return atomic_write(path, write)

        def half_then_wait(file):
            write(file)
            file.truncate(file.tell() // 2)
            file.flush()
            (out / "writing").write_text(str(path))
            time.sleep(120)  # killed here

        return atomic_write(path, half_then_wait)

    record.atomic_write = stalling_write

L.seed_everything(0, verbose=False)
trainer = L.Trainer(
    max_epochs=3,
    callbacks=[
        DeconvCallback(probe=dataset(12, 7).tensors[0], features_per_layer=2, epochs=(1, 2)),
        ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_epochs=1),
    ],
    logger=TensorBoardLogger(out, name="run"),
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)
trainer.fit(module_class(L)(shuffle=False), ckpt_path=out / "ckpt" / "last.ckpt" if resume else None)
