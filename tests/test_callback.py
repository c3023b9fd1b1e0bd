"""DeconvCallback in real (tiny) training runs: what it logs, saves and restores, and that it changes nothing."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import dataset, module_class
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_deconv import DeconvCallback, deconvolve, evolution_grid

Tiny = module_class(L)
PROBE = dataset(12, 7).tensors[0]


def fit(tmp_path, callbacks=(), max_epochs=3, logger=None, ckpt_path=None, model=None, seed=0, **kw):
    L.seed_everything(seed, verbose=False)
    model = model or Tiny(**kw)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=logger if logger is not None else TensorBoardLogger(tmp_path, name="run"),
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        num_sanity_val_steps=0,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def tb_tags(log_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = {t: [e.step for e in events.Images(t)] for t in events.Tags()["images"]}
    tags.update({t: [e.step for e in events.Scalars(t)] for t in events.Tags()["scalars"]})
    return tags


def test_logs_evolution_grids_and_saves_each_firing(tmp_path):
    callback = DeconvCallback(probe=PROBE, features_per_layer=3, epochs=(1, 2, 5))
    trainer, model = fit(tmp_path, [callback], max_epochs=3)
    layers = ["net.3", "net.6"]  # auto: conv1+BN+ReLU+pool, conv2+ReLU+pool
    assert list(callback.features) == layers
    log_dir = Path(trainer.log_dir)
    tags = tb_tags(log_dir)
    for layer in layers:
        assert tags[f"deconv/{layer}/evolution"] == [1, 2, 3]  # 1, 2 scheduled, 3 = end of training
        assert tags[f"deconv/{layer}/epoch"] == [1, 2, 3]
        assert (callback.folder / f"{layer}_evolution.png").exists()
        assert sorted(callback.history[layer]) == [1, 2, 3]
        columns = [callback.history[layer][epoch]["crops"] for epoch in (1, 2, 3)]
        rows = [f"#{c}" for c in callback.features[layer]]
        marks = [callback.history[layer][epoch]["marks"] for epoch in (1, 2, 3)]
        expected = evolution_grid(columns, ["ep 1", "ep 2", "ep 3"], rows, marks=marks)  # rows: features
        assert torch.equal(callback.evolution(layer), expected)
        assert not torch.equal(columns[0], columns[2])  # the features changed while training
    assert len(tags["deconv/seconds"]) == 3
    assert callback.folder == log_dir / "deconv" / callback.monitor_name
    assert sorted(p.name for p in callback.folder.iterdir()) == sorted(
        [f"epoch_00{e}.pt" for e in (1, 2, 3)] + [f"{layer}_evolution.png" for layer in layers]
    )  # and no temporary file left behind
    # the last firing used the final weights: its projections are the engine's on the trained model
    saved = torch.load(callback.folder / "epoch_003.pt")
    for layer in layers:
        want = deconvolve(model, PROBE, {layer: callback.features[layer]})[layer]
        got = saved["layers"][layer]
        assert torch.equal(got["source"], want.source) and torch.equal(got["position"], want.position)
        assert torch.allclose(got["images"], want.images, rtol=1e-4, atol=1e-6)
        assert got["crops"].shape[-1] == (9 if layer == "net.3" else 21)  # 5 + 2*2, then + 2*4 + 1*4
        now = callback.snapshot()[layer]  # the same projection on demand, without logging
        assert torch.equal(now.source, got["source"]) and torch.allclose(now.crops, got["crops"])


def _metrics(path: Path) -> list[dict]:
    """The model's own logged metrics (rows that only carry the callback's deconv/* scalars dropped)."""
    with open(path) as f:
        rows = [{k: v for k, v in row.items() if not k.startswith("deconv")} for row in csv.DictReader(f)]
    return [row for row in rows if any(v for k, v in row.items() if k not in ("epoch", "step"))]


def test_training_is_untouched(tmp_path):
    """Same seed with and without monitoring: bitwise identical weights and logged metrics."""
    runs = []
    for name, callbacks in (
        ("plain", []),
        ("watched", [DeconvCallback(probe=None, features_per_layer=2, epochs=(1, 2))]),
    ):
        logger = CSVLogger(tmp_path, name=name)
        _, model = fit(tmp_path, callbacks, max_epochs=2, logger=logger, dropout=0.3)
        runs.append((model.state_dict(), _metrics(Path(logger.log_dir) / "metrics.csv")))
    (plain, plain_metrics), (watched, watched_metrics) = runs
    assert plain.keys() == watched.keys()
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
    assert plain_metrics == watched_metrics and len(plain_metrics) > 0


def test_resumed_run_equals_uninterrupted(tmp_path):
    def callback():
        return DeconvCallback(probe=PROBE, features_per_layer=2, epochs=(1, 2, 5, 10))

    full = callback()
    fit(tmp_path / "full", [full], max_epochs=10, shuffle=False)

    first = callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    fit(tmp_path / "part", [first, ckpt], max_epochs=7, shuffle=False)
    assert sorted(first.history["net.3"]) == [1, 2, 5, 7]  # 7: fire_at_end
    resumed = callback()
    fit(tmp_path / "part", [resumed], max_epochs=10, shuffle=False, ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    for layer in full.features:
        assert sorted(resumed.history[layer]) == [1, 2, 5, 10]
        assert torch.equal(resumed.evolution(layer), full.evolution(layer))


def test_probe_from_the_datamodule_is_stored_for_resume(tmp_path):
    class Data(L.LightningDataModule):
        def val_dataloader(self):
            return torch.utils.data.DataLoader(dataset(20, 3), batch_size=10)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(dataset(32, 0), batch_size=16)

    callback = DeconvCallback(probe=None, probe_size=6, features_per_layer=2, epochs=(1,), seed=4)
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    trainer.fit(Tiny(), datamodule=Data())
    indices = torch.randperm(20, generator=torch.Generator().manual_seed(4))[:6].sort().values
    assert torch.equal(callback.probe, dataset(20, 3).tensors[0][indices])
    assert torch.equal(callback.state_dict()["probe"], callback.probe)
    assert (tmp_path / "deconv" / callback.monitor_name / "epoch_001.pt").exists()  # no logger: default_root_dir


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": ["net.3", "nett.4"]}, "Nearest valid names: net.4"),
        ({"probe": torch.rand(4, 1, 32, 32)}, "expects 3"),
        ({"probe": torch.rand(4, 3, 6, 6)}, "failed on probe images"),
        ({"features_per_layer": 9}, "exceeds the 8 channels"),
        ({"features": {"net.9": [0]}}, "not a 4-D|does not output a 4-D"),
        ({"features": {"net.6": [0, 16]}}, "out of range"),
    ],
)
def test_bad_input_fails_at_fit_start(tmp_path, kwargs, message):
    model = Tiny()
    callback = DeconvCallback(**{"probe": PROBE, **kwargs})
    with pytest.raises(ValueError, match=message):
        fit(tmp_path, [callback], model=model, logger=False)
    assert model.steps == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": (0, 1)}, "positive integers"),
        ({"epochs": (-2,)}, "positive integers"),
        ({"epochs": (), "fire_at_end": False}, "Nothing would ever fire"),
        ({"probe": torch.rand(0, 3, 8, 8)}, "non-empty"),
        ({"features_per_layer": 0}, "at least 1"),
        ({"rule": "lrp"}, "Unknown rule"),
        ({"crop": "box"}, "Unknown crop"),
        ({"layers": "conv1"}, "'auto' or a non-empty list"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DeconvCallback(**kwargs)


def test_schedule_is_normalised():
    assert DeconvCallback(epochs=(10, 1, 5, 5, 2)).epochs == (1, 2, 5, 10)


def test_other_loggers_get_png_files(tmp_path):
    callback = DeconvCallback(probe=PROBE, features_per_layer=2, epochs=(1,), show_patches=True)
    trainer, _ = fit(tmp_path, [callback], max_epochs=1, logger=CSVLogger(tmp_path, name="csv"))
    out = Path(trainer.log_dir) / "deconv" / callback.monitor_name
    assert sorted(p.name for p in out.iterdir()) == ["epoch_001.pt", "net.3_evolution.png", "net.6_evolution.png"]


def test_ddp_splits_the_work_and_logs_once(tmp_path):
    """2 CPU processes (gloo): no deadlock, projections split across ranks, gathered, written once by rank 0."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(here / "ddp_fit.py"), str(tmp_path)], env=env, timeout=180, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    (folder,) = (tmp_path / "run" / "version_0" / "deconv").iterdir()
    for epoch in (0, 1):  # each firing: both ranks projected a part, together every feature once
        per_layer = {}
        for jobs in ranks:
            mine = jobs[epoch * len(jobs) // 2 : (epoch + 1) * len(jobs) // 2]
            assert mine, "each rank takes part of the work"
            for layer, channels in mine:
                per_layer.setdefault(layer, []).extend(channels)
        saved = torch.load(folder / f"epoch_00{epoch + 1}.pt")["layers"]
        expected = {layer: sorted(data["channels"].tolist()) for layer, data in saved.items()}
        assert {layer: sorted(channels) for layer, channels in per_layer.items()} == expected
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    tags = tb_tags(events[0].parent)
    assert tags["deconv/net.3/evolution"] == [1, 2] and tags["deconv/net.6/epoch"] == [1, 2]
    model = Tiny()
    model.load_state_dict(torch.load(tmp_path / "final.pt"))
    saved = torch.load(folder / "epoch_002.pt")["layers"]
    for layer, got in saved.items():
        want = deconvolve(model, dataset(12, 7).tensors[0], {layer: got["channels"]})[layer]
        assert torch.equal(got["position"], want.position)
        assert torch.allclose(got["images"], want.images, rtol=1e-4, atol=1e-6)


def test_standalone_pytorch_lightning_trainer(tmp_path):
    import pytorch_lightning as PL
    from pytorch_lightning.loggers import TensorBoardLogger as StandaloneTensorBoardLogger

    callback = DeconvCallback(probe=PROBE, features_per_layer=2, epochs=(1,))
    trainer = PL.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=StandaloneTensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module_class(PL)())
    assert tb_tags(Path(trainer.log_dir))["deconv/net.3/evolution"] == [1]


class ImageLogger(L.loggers.Logger):
    """A logger with an image API (as W&B's) and, optionally, an experiment whose add_image fails."""

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.images: list[tuple[str, int]] = []
        self.broken = broken

    name, version = "images", 0

    @property
    def experiment(self):
        if not self.broken:
            return None

        class Broken:
            def add_image(self, *args, **kwargs):
                raise OSError("disk full")

        return Broken()

    def log_image(self, key, images, step=None):
        self.images.append((key, step))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_logger_image_api_is_used_and_logging_failures_never_stop_training(tmp_path):
    callback = DeconvCallback(probe=PROBE, features_per_layer=2, epochs=(1, 2))
    logger = ImageLogger()
    fit(tmp_path, [callback], max_epochs=2, logger=logger)
    assert ("deconv/net.6/evolution", 2) in logger.images and ("deconv/net.3/epoch", 1) in logger.images

    with pytest.warns(UserWarning, match="could not log 'deconv/net.3/evolution'.*disk full"):
        _, model = fit(tmp_path, [DeconvCallback(probe=PROBE, features_per_layer=2, epochs=(1,))], max_epochs=2,
                       logger=ImageLogger(broken=True))  # fmt: skip
    assert model.steps == 8  # both epochs trained


def test_occlusion_maps_are_logged_at_their_epochs(tmp_path):
    """Fig. 7 live: the logged picture is the occlusion maps of the first probe images on the live weights."""
    from lightning_deconv.analysis.occlusion import occlusion
    from lightning_deconv.render import occlusion_grid

    callback = DeconvCallback(probe=PROBE, features_per_layer=2, epochs=(1, 2, 3), occlusion=2, occlusion_epochs=(1, 3))
    trainer, model = fit(tmp_path, [callback], max_epochs=3)
    tags = tb_tags(Path(trainer.log_dir))
    assert tags["deconv/occlusion"] == [1, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trainer.log_dir), size_guidance={"images": 0})
    events.Reload()
    logged = events.Images("deconv/occlusion")[-1]
    found = occlusion(model, PROBE[:2], "net.6", patch=8, stride=2)
    want = occlusion_grid(PROBE[:2], found.feature, found.probability, found.label)
    import io

    import numpy as np
    from PIL import Image

    pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)).convert("RGB")).copy())
    expected = (want.permute(1, 2, 0) * 255).round().to(torch.uint8)
    assert pixels.shape == expected.shape
    assert (pixels.int() - expected.int()).abs().max() <= 1
    with pytest.raises(ValueError, match="at least 0"):
        DeconvCallback(occlusion=-1)


def test_top_k_over_the_validation_set_at_the_end(tmp_path):
    """Fig. 2 live: the saved top k equal top_k() over the validation set on the final weights, projected as the
    engine projects them, drawn as a picture and logged."""
    from lightning_deconv.analysis.top_k import project_top_k, top_k
    from lightning_deconv.analysis.top_k_files import load_top_k

    callback = DeconvCallback(probe=PROBE, features_per_layer=2, epochs=(1,), top_k=4)
    trainer, model = fit(tmp_path, [callback], max_epochs=2)
    log_dir = Path(trainer.log_dir)
    saved = load_top_k(callback.folder / "top4_epoch_002.pt")
    val = dataset(32, 1)  # Tiny's validation set
    want = top_k(model, val, callback.features, k=4)
    projected = project_top_k(model, want, data=val)
    for layer, got in saved.top.items():
        assert torch.equal(got.source, want[layer].source) and torch.equal(got.position, want[layer].position)
        crops = projected[layer].crops.unflatten(0, (2, 4))
        assert torch.allclose(saved.crops[layer], crops, rtol=1e-4, atol=1e-6)
        assert (callback.folder / f"{layer}_top4.png").exists()
        assert tb_tags(log_dir)[f"deconv/{layer}/top4"] == [2]
    assert callback.state_dict()["top_k_done"] == [2]
    again, _ = fit(tmp_path / "again", [callback], max_epochs=2)  # the same callback in a new fit scans again
    assert callback.folder.parent.parent == Path(again.log_dir)
    assert (callback.folder / "top4_epoch_002.pt").exists() and callback.top_k_done == [2]
