"""Measuring Figure 4: linear CKA, dead features, drift, the first-layer filters, in a real fit and from its files."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import Classifier, small_net
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deconv import DeconvCallback
from lightning_deconv.analysis.settling import cka_from_grams, dead_share, drift, gram, linear_cka
from lightning_deconv.paper.settling import settled_at, settling_figure, settling_from_run


def cka_by_the_formula(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. (2019), Eq. (2)-(3): HSIC(K, L) = tr(K H L H) / (n - 1)^2, with an explicit H."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l = x @ x.T, y @ y.T  # noqa: E741

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def test_linear_cka_is_the_formula_and_has_its_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, 4, 4, generator=g)
    y = torch.randn(30, 50, generator=g) + x.flatten(1)[:, :50]
    assert linear_cka(x, y) == pytest.approx(cka_by_the_formula(x, y), rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    rotation, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
    rotated = x.flatten(1).double() @ rotation
    assert linear_cka(rotated * 3.5, y) == pytest.approx(linear_cka(x, y), rel=1e-9)  # rotation, isotropic scale
    stretched = x.flatten(1) * torch.linspace(0.1, 10, 96)  # not isotropic: CKA changes
    assert abs(linear_cka(stretched, y) - linear_cka(x, y)) > 1e-3
    assert cka_from_grams(gram(x), gram(y)) == pytest.approx(linear_cka(x, y), rel=1e-12)
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(x, y[:10])


def test_dead_share_and_drift():
    assert dead_share(torch.tensor([0.0, -1.0, 2.0, 3.0])) == 0.5
    a = torch.randn(4, 3, 5, 5)
    change, moved = drift(a, a * 2, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 5, 3]))
    assert change == pytest.approx(0.0, abs=1e-12) and moved == 0.25
    change, _ = drift(a, -a, torch.zeros(4), torch.zeros(4))
    assert change == pytest.approx(2.0)


def _net() -> nn.Sequential:
    net = small_net(nn.Conv2d(3, 8, 5, stride=2, padding=2))
    with torch.no_grad():
        net[0].bias[:3] = -100.0  # three channels that never fire: dead, and they stay dead (no gradient)
    return net


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short fit with the measures on: the callback, the trained model and the run's log dir."""
    tmp = tmp_path_factory.mktemp("settling")
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 24, 24, generator=g), torch.randint(0, 4, (32,), generator=g))
    probe = torch.randn(10, 3, 24, 24, generator=g)
    callback = DeconvCallback(probe=probe, features={"net.1": [0, 4, 6], "net.4": [1, 2]}, epochs=(1, 2, 4))
    L.seed_everything(0, verbose=False)
    model = Classifier(_net, lr=0.1)
    trainer = L.Trainer(
        max_epochs=4,
        callbacks=[callback],
        logger=TensorBoardLogger(tmp, name="run"),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True))
    return callback, model, Path(trainer.log_dir)


def _activations(model, probe, upto):
    with torch.no_grad():
        return model.net[: upto + 1](probe)


def test_dead_share_and_gram_equal_brute_force_on_the_same_weights(run):
    callback, model, _ = run
    last = torch.load(callback.folder / "epoch_004.pt", weights_only=True)
    for layer, upto in (("net.1", 1), ("net.4", 4)):
        acts = _activations(model, callback.probe, upto)
        dead = sum(int(acts[:, c].max() <= 0) for c in range(acts.shape[1])) / acts.shape[1]
        assert last["measures"][f"deconv/{layer}/dead"] == pytest.approx(dead)
        assert torch.allclose(last["layers"][layer]["gram"], gram(acts), rtol=1e-5)
    assert last["measures"]["deconv/net.1/dead"] == pytest.approx(3 / 8)
    # the tracked dead feature (channel 0 of net.1) is marked in every column of the grid
    assert all(callback.history["net.1"][e]["marks"][0] == "dead" for e in (1, 2, 4))
    assert all(mark is None for mark in callback.history["net.1"][4]["marks"][1:])


def test_scalars_filters_and_layout_are_in_the_event_file(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, log_dir = run
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for layer in ("net.1", "net.4"):
        assert [e.step for e in events.Scalars(f"deconv/{layer}/dead")] == [1, 2, 4]
        for measure in ("cka_previous", "drift", "source_changed"):
            assert [e.step for e in events.Scalars(f"deconv/{layer}/{measure}")] == [2, 4]  # vs the previous firing
        assert [e.step for e in events.Images(f"deconv/{layer}/evolution")] == [1, 2, 4]  # one step convention
    assert [e.step for e in events.Scalars("deconv/seconds")] == [1, 2, 4]
    assert [e.step for e in events.Images("deconv/net.0/filters")] == [1, 2, 4]
    assert "deconv/net.0/filter_rms" in tags["histograms"]
    assert "custom_scalars__config__" in tags["tensors"]
    cka = [e.value for e in events.Scalars("deconv/net.4/cka_previous")]
    assert all(0 < v <= 1 + 1e-6 for v in cka)


def test_settling_panel_is_rebuilt_from_the_files_alone(run, tmp_path):
    callback, _, log_dir = run
    curves = settling_from_run(log_dir)
    assert list(curves) == ["net.1", "net.4"]
    for layer, curve in curves.items():
        assert sorted(curve) == [1, 2, 4] and curve[4] == pytest.approx(1.0)
        first, last = (torch.load(callback.folder / f"epoch_00{e}.pt")["layers"][layer]["gram"] for e in (1, 4))
        assert curve[1] == pytest.approx(cka_from_grams(first, last))
        assert torch.equal(callback.state_dict()["grams"][layer], last)  # memory keeps the last Gram only
    out = settling_figure(log_dir, tmp_path / "settling.png")
    with Image.open(out) as image:
        assert image.size[0] > 500
    assert settled_at({1: 0.5, 2: 0.95, 3: 0.85, 4: 1.0}) == 4
    assert settled_at({1: 0.5, 2: 0.95, 4: 1.0}) == 2
