"""The monitors composed as a user composes Lightning callbacks: one Watch shared by DeconvCallback, TopKMonitor and
OcclusionMonitor records exactly what the one-line ``DeconvCallback(top_k=..., occlusion=...)`` records; each monitor
also works alone, on a user's LightningModule wrapping a torchvision net, with loaders and dict batches given to fit."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torchvision
from helpers import Classifier, images
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_deconv import DeconvCallback, OcclusionMonitor, TopKMonitor, Watch, load_top_k
from lightning_deconv.paper.figure2 import find_top_k
from lightning_deconv.record import find_firings, load_record


def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4)


X, Y = images(24, 32, seed=3)
LAYERS = ["net.layer1", "net.layer3"]


def fit(tmp_path: Path, callbacks: list, *, data: Dataset | None = None, max_epochs: int = 2) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    data = data if data is not None else TensorDataset(X, Y)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
        num_sanity_val_steps=0,
    )
    trainer.fit(Classifier(resnet), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return trainer


def image_tags(log_dir: str) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"images": 0})
    events.Reload()
    return {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}


def test_monitors_on_one_watch_record_what_the_one_line_form_records(tmp_path):
    watch = Watch(probe=X[:8], layers=LAYERS, features_per_layer=2)
    evolution = DeconvCallback(watch=watch, epochs=(1,))
    top = TopKMonitor(watch, k=3)
    occluded = OcclusionMonitor(watch, images=2, epochs=(2,), fire_at_end=False)
    composed = fit(tmp_path / "composed", [evolution, top, occluded])
    one_line = DeconvCallback(
        probe=X[:8], layers=LAYERS, features_per_layer=2, epochs=(1,), top_k=3, occlusion=2, occlusion_epochs=(2,)
    )
    single = fit(tmp_path / "single", [one_line])

    assert evolution.monitor_name == one_line.monitor_name == watch.name  # the same settings, the same folder
    assert top.watch.features is evolution.features and evolution.features == one_line.features
    for trainer, callback in ((composed, evolution), (single, one_line)):
        assert [p.name for p in find_firings(trainer.log_dir)] == ["epoch_001.pt", "epoch_002.pt"]
        assert list(find_top_k(trainer.log_dir)) == [2]
        assert image_tags(trainer.log_dir)["deconv/occlusion"] == [2]
        assert callback.top_k_done == [2] if callback is one_line else top.done == [2]
    for epoch in (1, 2):  # monitoring never changes training: both runs trained alike and recorded alike
        a = load_record(evolution.folder / f"epoch_{epoch:03d}.pt")["layers"]
        b = load_record(one_line.folder / f"epoch_{epoch:03d}.pt")["layers"]
        for layer in LAYERS:
            assert torch.equal(a[layer]["source"], b[layer]["source"])
            assert torch.allclose(a[layer]["crops"], b[layer]["crops"], atol=1e-6)
    a, b = load_top_k(evolution.folder / "top3_epoch_002.pt"), load_top_k(one_line.folder / "top3_epoch_002.pt")
    for layer in LAYERS:
        assert torch.equal(a.top[layer].source, b.top[layer].source)
        assert torch.allclose(a.crops[layer], b.crops[layer], atol=1e-6)


class DictItems(Dataset):
    def __len__(self) -> int:
        return len(X)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixels": X[i], "image": X[i], "label": Y[i]}


def test_a_monitor_alone_draws_its_own_probe_and_records_its_figure(tmp_path):
    """A TopKMonitor without a DeconvCallback: its own watch draws the probe from the validation data (dict items,
    the image under a named key), chooses the features and writes the top-k files the figure command reads."""
    top = TopKMonitor(Watch(probe_size=6, image_key="pixels", layers=LAYERS, features_per_layer=3), k=2, epochs=(1,))
    occluded = OcclusionMonitor(Watch(probe_size=4, image_key="pixels", layers=LAYERS), images=1, epochs=(1,))
    trainer = fit(tmp_path, [top, occluded], data=DictItems(), max_epochs=2)
    assert top.done == [1] and list(find_top_k(trainer.log_dir)) == [1]
    saved = load_top_k(top.watch.folder / "top2_epoch_001.pt")
    assert {layer: len(t.channels) for layer, t in saved.top.items()} == {"net.layer1": 3, "net.layer3": 3}
    assert top.watch.probe.shape == (6, 3, 32, 32) and occluded.watch.probe.shape == (4, 3, 32, 32)
    assert image_tags(trainer.log_dir)["deconv/occlusion"] == [1, 2]  # and at the end: epoch 2 was not scheduled
    assert not list(top.watch.folder.glob("epoch_*.pt"))  # no evolution was asked for


def test_bad_compositions_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"either `watch` or \['probe'\]"):
        DeconvCallback(watch=Watch(), probe=X)
    mode = "".join(["m", "ax"])  # equal to the default, but another object, as a config parser makes it
    assert DeconvCallback(watch=Watch(), mode=mode, layers="auto").watch.mode == "max"
    with pytest.raises(TypeError, match=r"must be a lightning_deconv\.Watch"):
        TopKMonitor({"probe": X})
    with pytest.raises(ValueError, match="`k`"):
        TopKMonitor(k=0)
    with pytest.raises(ValueError, match="`epochs`"):
        OcclusionMonitor(epochs=(0,))
    monitor = OcclusionMonitor(Watch(probe=X[:4], layers=LAYERS), layer="net.fc")  # not a 4-D map: before training
    trainer = L.Trainer(
        max_epochs=1, callbacks=[monitor], logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    with pytest.raises(ValueError, match=r"layer='net.fc'.*4-D"):
        trainer.fit(Classifier(resnet), DataLoader(TensorDataset(X, Y), batch_size=8))
    assert trainer.global_step == 0
    misspelt = OcclusionMonitor(Watch(probe=X[:4], layers=LAYERS), layer="net.layr4")
    trainer = L.Trainer(
        max_epochs=1, callbacks=[misspelt], logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    with pytest.raises(ValueError, match=r"Unknown layer 'net.layr4'.*Nearest valid names: net\.layer4"):
        trainer.fit(Classifier(resnet), DataLoader(TensorDataset(X, Y), batch_size=8))
    assert trainer.global_step == 0


def test_a_monitor_keeps_its_record_across_a_checkpoint():
    first = TopKMonitor(Watch(probe=X[:4]), k=3)
    first.watch.probe, first.watch.features, first.done = X[:4], {"layer1": [0, 1]}, [2, 5]
    state = first.state_dict()
    again = TopKMonitor(Watch(probe=X[:4]), k=3)
    assert again.state_key == first.state_key
    again.load_state_dict(state)
    assert again.done == [2, 5] and again.watch.features == {"layer1": [0, 1]} and torch.equal(again.watch.probe, X[:4])


def test_monitors_on_one_watch_keep_its_probe_once_and_resume_together(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def monitors() -> list:
        watch = Watch(probe=X[:8], layers=LAYERS, features_per_layer=2)
        top = TopKMonitor(watch, k=2, epochs=(1, 2))  # listed first, made first: the DeconvCallback still keeps
        return [top, DeconvCallback(watch=watch, epochs=(1, 2)), ModelCheckpoint(dirpath=tmp_path / "ckpt")]

    first = monitors()
    fit(tmp_path / "a", first, max_epochs=1)
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    states = torch.load(checkpoint, weights_only=False)["callbacks"]
    holders = [key for key, state in states.items() if "probe" in state]
    assert len(holders) == 1 and holders[0].startswith("DeconvCallback")

    again = monitors()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=2, callbacks=again, logger=TensorBoardLogger(tmp_path / "b", name="run"),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    loader = DataLoader(TensorDataset(X, Y), batch_size=8)
    trainer.fit(Classifier(resnet), loader, loader, ckpt_path=checkpoint)
    top, evolution = again[0], again[1]
    assert top.watch.resumed and top.done == [1, 2] and sorted(evolution.history["net.layer1"]) == [1, 2]
    assert torch.equal(top.watch.probe, X[:8])
