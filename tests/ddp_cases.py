"""Run by test_compat.py in a subprocess: two 2-process CPU DDP fits (Lightning re-launches this script)."""

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from helpers import Classifier, FunctionalPooling, RectifiedFunctionalPooling, images
from torch.utils.data import DataLoader, TensorDataset

from lightning_deconv import DeconvCallback

out = Path(sys.argv[1])


class FailsOnRankOne(DeconvCallback):
    """Its first firing breaks on rank 1 only."""

    calls = 0

    def _project_share(self, rank, world, state):
        self.calls += 1
        if rank == 1 and self.calls == 1:
            raise RuntimeError("rank 1 broke")
        return super()._project_share(rank, world, state)


def run(callback, val=None, epochs=2, build=FunctionalPooling):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        default_root_dir=out,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model = Classifier(build)
    trainer.fit(model, DataLoader(TensorDataset(*images(16)), batch_size=4), val)
    return trainer, model


result = {}
kwargs = {"probe": images(8)[0], "features_per_layer": 3, "epochs": (1, 2), "crop": "support"}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    functional = DeconvCallback(**{**kwargs, "epochs": (1, 2, 3, 4)})  # support crops that change size
    trainer, _ = run(functional, epochs=4, build=RectifiedFunctionalPooling)
    failing = FailsOnRankOne(**kwargs)
    run(failing)
    scanning = DeconvCallback(**{**kwargs, "epochs": (1,), "top_k": 3})
    _, model = run(scanning, val=DataLoader(TensorDataset(*images(11, seed=3)), batch_size=4))
if trainer.is_global_zero:
    result["functional"] = {layer: sorted(h) for layer, h in functional.history.items()}
    result["failing"] = {layer: sorted(h) for layer, h in failing.history.items()}
    result["warning"] = " ".join(str(w.message) for w in caught if "failed and was skipped" in str(w.message))
    (out / "result.json").write_text(json.dumps(result))
    torch.save(model.state_dict(), out / "top_k_model.pt")
