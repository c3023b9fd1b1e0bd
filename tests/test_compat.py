"""The callback in the code real users write: each row a real short ``Trainer.fit`` with ``DeconvCallback`` added
and nothing else changed, asserting that every scheduled column exists for every tracked layer."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import Classifier, FunctionalPooling, fit, images, tiny_net
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_deconv import DeconvCallback

EPOCHS = (1, 2)


class DictItems(Dataset):
    def __init__(self, n: int = 24, size: int = 32) -> None:
        self.x, self.y = images(n, size)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"label": self.y[i], "image": self.x[i]}


class Stream(IterableDataset):
    """An iterable set without ``__len__``."""

    def __init__(self, n: int = 24, size: int = 32) -> None:
        self.x, self.y = images(n, size, seed=5)

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


def assert_every_column(callback, layers=None):
    assert callback.features, "no layer tracked"
    if layers is not None:
        assert list(callback.features) == layers
    for layer in callback.features:
        assert sorted(callback.history[layer]) == list(EPOCHS), layer
        assert callback.evolution(layer).shape[0] == 3


def monitor(**kwargs) -> DeconvCallback:
    return DeconvCallback(**{"features_per_layer": 2, "epochs": EPOCHS, "probe_size": 8, **kwargs})


def small_resnet():
    return torchvision.models.resnet18(weights=None, num_classes=4)


def small_vgg():
    return torchvision.models.vgg11(weights=None, num_classes=4)


def small_alexnet():
    return torchvision.models.alexnet(weights=None, num_classes=4)


ROWS = {
    "loaders passed to fit(), probe=None": dict(val=DataLoader(TensorDataset(*images(16)), batch_size=8)),
    "dict items and batches, probe=None": dict(
        train=DataLoader(DictItems(), batch_size=8), val=DataLoader(DictItems(16), batch_size=8)
    ),
    "iterable validation set without __len__, probe=None": dict(val=DataLoader(Stream(), batch_size=8)),
    "net built in configure_model": dict(model=lambda: Classifier(in_configure_model=True)),
    "no forward(): the steps call self.net": dict(model=lambda: Classifier(with_forward=False)),
    "16-mixed": dict(precision="16-mixed"),
    "bf16-mixed": dict(precision="bf16-mixed"),
    "channels_last": dict(model=lambda: Classifier().to(memory_format=torch.channels_last)),
    "torch.compile": dict(model=lambda: Classifier(lambda: torch.compile(tiny_net(), backend="eager"))),
    "LeakyReLU net": dict(
        model=lambda: Classifier(lambda: nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.LeakyReLU(0.1), nn.Conv2d(8, 4, 3)))
    ),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_user_patterns(tmp_path, row):
    settings = dict(ROWS[row])
    model = settings.pop("model", Classifier)()
    callback = monitor()
    fit(tmp_path, model, callback, **settings)
    assert_every_column(callback)


@pytest.mark.parametrize(
    "build, size, layers",
    [
        (small_resnet, 32, ["net.maxpool", "net.layer1", "net.layer2", "net.layer3", "net.layer4"]),
        (small_alexnet, 64, [f"net.features.{i}" for i in (2, 5, 7, 9, 12)]),
        (small_vgg, 32, [f"net.features.{i}" for i in (2, 5, 10, 15, 20)]),
    ],
)
def test_torchvision_net_wrapped_as_a_child(tmp_path, build, size, layers):
    x, y = images(16, size)
    callback = monitor(probe=x)
    fit(tmp_path, Classifier(build), callback, train=DataLoader(TensorDataset(x, y), batch_size=8))
    assert_every_column(callback, layers)


def test_leaky_relu_rule_is_named_at_fit_start(tmp_path, caplog):
    net = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.LeakyReLU(0.1), nn.Conv2d(8, 4, 3), nn.PReLU())  # noqa: E731
    with caplog.at_level(logging.INFO):
        fit(tmp_path, Classifier(net), monitor(epochs=(1,)))
    said = " ".join(r.getMessage() for r in caplog.records if "lightning-deconv" in r.getMessage())
    assert "deconvnet" in said and "LeakyReLU" in said and "PReLU" in said


def test_standalone_pytorch_lightning(tmp_path):
    import pytorch_lightning as PL

    class Standalone(PL.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callback = monitor()
    fit(tmp_path, Standalone(), callback, pl=PL)  # probe=None: from the training loader given to fit()
    assert_every_column(callback)


class Exploding(DeconvCallback):
    """A callback whose first firing breaks inside the projection."""

    calls = 0

    def _project_share(self, rank, world, state):
        type(self).calls += 1
        if type(self).calls == 1:
            raise RuntimeError("projection exploded")
        return super()._project_share(rank, world, state)


def test_a_failing_firing_warns_and_training_goes_on(tmp_path):
    Exploding.calls = 0
    callback = Exploding(features_per_layer=2, epochs=(1, 2, 3), fire_at_end=False)
    model = Classifier()
    with pytest.warns(UserWarning, match=r"after epoch 1 failed and was skipped \(rank 0: RuntimeError: projection"):
        trainer = fit(tmp_path, model, callback, max_epochs=3)
    assert trainer.current_epoch == 3  # all epochs trained
    for layer in callback.features:
        assert sorted(callback.history[layer]) == [2, 3]  # the next firings worked
    Exploding.calls = 0
    with pytest.raises(RuntimeError, match="projection exploded"):
        fit(tmp_path, Classifier(), Exploding(features_per_layer=2, epochs=(1,), strict=True))


def test_a_logger_that_raises_never_stops_training(tmp_path):
    class Broken(L.loggers.CSVLogger):
        def log_metrics(self, metrics, step=None):
            if any(k.startswith("deconv") for k in metrics):
                raise OSError("disk full")
            super().log_metrics(metrics, step)

    callback = monitor()
    with pytest.warns(UserWarning, match="disk full"):
        trainer = L.Trainer(
            max_epochs=2,
            callbacks=[callback],
            logger=Broken(tmp_path),
            enable_progress_bar=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(Classifier(), DataLoader(TensorDataset(*images()), batch_size=8))
    assert trainer.current_epoch == 2


def test_diverged_weights_are_marked_not_fatal(tmp_path):
    class Diverging(Classifier):
        def on_train_batch_end(self, outputs, batch, batch_idx):  # runs before the callback's hook
            if self.current_epoch == 1:
                with torch.no_grad():
                    self.net[0].weight.fill_(float("nan"))

    callback = monitor()
    with pytest.warns(UserWarning, match="NaN/Inf"):
        fit(tmp_path, Diverging(), callback)
    layer = next(iter(callback.features))
    assert callback.history[layer][1]["marks"] == [None, None]
    assert callback.history[layer][2]["marks"] == ["NaN", "NaN"]
    assert torch.isfinite(callback.evolution(layer)).all()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"probe": torch.full((4, 3, 32, 32), float("nan"))}, ValueError, "NaN or Inf"),
        (
            {"probe": TensorDataset(torch.arange(8))},
            ValueError,
            r"must be \[C, H, W\] images; got tensors of shape \(\)",
        ),
        ({"probe": DictItems(), "image_key": "pixels"}, ValueError, "no key 'pixels'; their keys are 'label', 'image'"),
        ({"probe": TensorDataset(torch.randn(8, 32, 32))}, ValueError, r"\[C, H, W\] images"),
    ],
)
def test_bad_probes_fail_before_training(tmp_path, kwargs, error, message):
    model = Classifier()
    steps = []
    model.on_train_batch_start = lambda *a: steps.append(1)
    with pytest.raises(error, match=message):
        fit(tmp_path, model, monitor(**kwargs))
    assert steps == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"features_per_layer": "4"}, "`features_per_layer` must be an integer, got str '4'"),
        ({"probe_size": 2.5}, "`probe_size` must be an integer"),
        ({"batch_size": True}, "`batch_size` must be an integer"),
        ({"seed": None}, "`seed` must be an integer"),
        ({"image_key": 3}, "`image_key` must be a string"),
        ({"epochs": "1, 2"}, "positive integers"),
    ],
)
def test_wrong_argument_types_are_named(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        DeconvCallback(**kwargs)


def test_probe_draw_touches_no_generator(monkeypatch):
    """Drawing consumes and reseeds nothing: not the global torch/NumPy/Python streams, never CUDA's."""
    import random

    import numpy as np

    from lightning_deconv.probe import draw_probe

    def forbidden(*args, **kwargs):
        raise AssertionError("the probe draw reseeded a global generator")

    monkeypatch.setattr(torch, "manual_seed", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)

    class Jittered(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(3, 4, 4) + random.random() + float(np.random.rand()), i

    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = draw_probe(Jittered(), 4, seed=3)
    assert torch.equal(first, draw_probe(Jittered(), 4, seed=3))  # random transforms made deterministic
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert (before[2] == np.random.get_state()[1]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_is_untouched(tmp_path):
    torch.cuda.init()
    before = torch.cuda.get_rng_state_all()
    fit(tmp_path, Classifier(), monitor(probe=DictItems()), accelerator="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, torch.cuda.get_rng_state_all(), strict=True))


def test_ddp_functional_pooling_support_crops_and_a_failing_rank(tmp_path):
    """2 CPU processes: a net with F.max_pool2d in forward (unknown field: support crops of different sizes per
    rank and per firing) keeps every column of 4 firings; a firing that fails on rank 1 only is skipped on all
    ranks, without a hang."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(here / "ddp_cases.py"), str(tmp_path)],
        env=env,
        timeout=240,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["functional"] == {f"net.relu{i}": [1, 2, 3, 4] for i in (1, 2, 3)}  # every column
    assert result["failing"] == {"net.conv1": [2], "net.relu": [2]}  # epoch 1 failed on rank 1: skipped
    assert "rank 1: RuntimeError: rank 1 broke" in result["warning"]
    # Fig. 2 over a validation set sharded across the ranks equals the single-process top k on the same weights
    from lightning_deconv.analysis.top_k import top_k
    from lightning_deconv.analysis.top_k_files import load_top_k

    model = Classifier(FunctionalPooling)
    model.load_state_dict(torch.load(tmp_path / "top_k_model.pt"))
    (path,) = tmp_path.rglob("top3_epoch_002.pt")
    saved = load_top_k(path)
    want = top_k(model, TensorDataset(*images(11, seed=3)), {layer: t.channels for layer, t in saved.top.items()}, k=3)
    for layer, got in saved.top.items():
        assert torch.equal(got.source, want[layer].source) and torch.allclose(got.value, want[layer].value)
