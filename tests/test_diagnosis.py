"""The Fig. 6 measures and diagnosis inside a real (tiny) training run."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import Classifier, small_net
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deconv import DeconvCallback, aliasing, filter_spectrum
from lightning_deconv.record import find_firings

G = torch.Generator().manual_seed(0)
DATA = TensorDataset(torch.randn(32, 3, 32, 32, generator=G), torch.randint(0, 4, (32,), generator=G))
PROBE = torch.randn(8, 3, 32, 32, generator=G)


def bad_stem() -> nn.Sequential:
    """AlexNet's mistakes in miniature: 8x8 first-layer filters at stride 4, started as loud checkerboards
    (all high frequency, RMS 3), three of eight dead (bias -1e4)."""
    net = small_net(nn.Conv2d(3, 8, 8, stride=4, padding=2))
    with torch.no_grad():
        board = (-1.0) ** (torch.arange(8)[:, None] + torch.arange(8)[None, :])
        net[0].weight.copy_(3 * board * torch.randn(8, 3, 1, 1, generator=G).sign())
        net[0].bias[:3] = -1e4
    return net


def fit(tmp_path: Path, diagnose: bool) -> tuple[DeconvCallback, Classifier, Path, list[str]]:
    callback = DeconvCallback(probe=PROBE, features={"net.2": [2, 3, 5], "net.4": [0, 1]}, epochs=(1, 2, 3),
                              diagnose=diagnose)  # fmt: skip
    L.seed_everything(0, verbose=False)
    model = Classifier(bad_stem, lr=1e-3)
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[callback],
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(DATA, batch_size=8))
    said = [str(w.message) for w in caught if "Fig. 6 diagnosis" in str(w.message)]
    return callback, model, Path(trainer.log_dir), said


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("diagnosis"), diagnose=True)


def test_measures_are_logged_saved_and_equal_the_functions_on_the_run(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, model, log_dir, _ = run
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for band in ("low", "mid", "high"):
        assert [e.step for e in events.Scalars(f"deconv/net.0/spectrum/{band}")] == [1, 2, 3]
    for layer in ("net.2", "net.4"):
        assert [e.step for e in events.Scalars(f"deconv/{layer}/aliasing")] == [1, 2, 3]
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    regexes = [r for category in layout.category for chart in category.chart for r in chart.multiline.tag]
    assert r"deconv/.*/spectrum/.*$" in regexes and r"deconv/.*/aliasing$" in regexes
    # The last firing ran on the final weights: its file and scalars are the public functions on them.
    last = torch.load(find_firings(log_dir)[2], weights_only=True)
    weight = model.net[0].weight.detach()
    assert last["filters"]["name"] == "net.0" and torch.equal(last["filters"]["weight"], weight)
    shares = filter_spectrum(weight).mean(dim=0)
    for band, share in zip(("low", "mid", "high"), shares.tolist(), strict=True):
        assert last["measures"][f"deconv/net.0/spectrum/{band}"] == pytest.approx(share, abs=1e-6)
    assert shares[1] < 0.2 and shares[2] > 0.5  # still checkerboards after three epochs at lr 1e-3
    for layer in ("net.2", "net.4"):
        want = aliasing(last["layers"][layer]["images"], period=4).nanmean().item()  # dead: NaN
        assert last["measures"][f"deconv/{layer}/aliasing"] == pytest.approx(want, rel=1e-5)


def test_the_diagnosis_warns_once_per_condition_and_names_layer_value_and_remedy(run):
    callback, _, log_dir, said = run
    assert sorted(callback.history["net.2"]) == [1, 2, 3]  # training went on, every firing recorded
    first = torch.load(find_firings(log_dir)[0], weights_only=True)["measures"]
    spectrum = [line for line in said if "mid-frequency" in line]
    assert len(spectrum) == 1 and "after epoch 1: net.0:" in spectrum[0]
    assert f"{first['deconv/net.0/spectrum/mid']:.3f} < 0.2" in spectrum[0] and "stride 2" in spectrum[0]
    rms = [line for line in said if "largest filter RMS" in line]
    assert len(rms) == 1 and "> 0.1" in rms[0] and "FilterRMSClip" in rms[0]
    dead = [line for line in said if "dead channels" in line and "net.2:" in line]
    assert len(dead) == 1 and f"{first['deconv/net.2/dead']:.3g} > 0.25" in dead[0]
    assert first["deconv/net.2/dead"] == pytest.approx(3 / 8)
    # aliasing is warned for exactly the layers whose first value crossed the threshold, with that value
    over = {layer for layer in ("net.2", "net.4") if first[f"deconv/{layer}/aliasing"] > 0.05}
    assert over  # checkerboards at stride 4 print the lattice
    warned = {re.search(r"after epoch \d+: (\S+): aliasing ", line).group(1) for line in said if ": aliasing " in line}
    assert warned == over and all("4x4 stride lattice of net.0" in line for line in said if ": aliasing " in line)
    assert len(said) == len(set(said)) and all("\n" not in line for line in said)


def test_diagnose_false_says_nothing_but_still_measures(tmp_path):
    callback, _, log_dir, said = fit(tmp_path, diagnose=False)
    assert said == []
    assert callback.diagnosis is None
    last = torch.load(find_firings(log_dir)[2], weights_only=True)
    assert "deconv/net.0/spectrum/mid" in last["measures"] and "deconv/net.4/aliasing" in last["measures"]


def test_the_dashboard_charts_each_layers_aliasing_and_the_first_layer_spectrum(run):
    pytest.importorskip("tensorboard")
    from lightning_deconv.tensorboard.store import read_firing
    from lightning_deconv.tensorboard.views import _charts

    _, _, log_dir, _ = run
    paths = find_firings(log_dir)
    firings = {firing.epoch: (path, firing) for path in paths for firing in [read_firing(path)]}
    for layer in ("net.2", "net.4"):
        logged = [torch.load(path, weights_only=True)["measures"][f"deconv/{layer}/aliasing"] for path in paths]
        assert _charts(firings, layer)["aliasing"] == [
            [e, pytest.approx(v)] for e, v in zip((1, 2, 3), logged, strict=True)
        ]
        for band in ("low", "mid", "high"):  # the first conv's spectrum, beside every layer's charts
            key = f"deconv/net.0/spectrum/{band}"
            logged = [torch.load(path, weights_only=True)["measures"][key] for path in paths]
            assert _charts(firings, layer)[f"spectrum_{band}"] == [
                [e, pytest.approx(v)] for e, v in zip((1, 2, 3), logged, strict=True)
            ]
