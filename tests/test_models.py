"""ZFNet's geometry, the paper's filter RMS clipping under both Trainers, and the classifier."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import pytorch_lightning
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deconv.paper.classifier import ImageClassifier
from lightning_deconv.paper.clipping import FilterRMSClip
from lightning_deconv.paper.models import ZFNet

# Fig. 3 of the paper: map sides at 224x224 input, and channel counts at width 1.
SIDES = {"conv1": 110, "pool1": 55, "conv2": 26, "pool2": 13, "conv3": 13, "conv4": 13, "conv5": 13, "pool5": 6}
CHANNELS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256}


def feature_shapes(model: ZFNet, size: int) -> dict[str, torch.Size]:
    shapes = {}
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
        for name, module in model.features.named_children()
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def test_zfnet_matches_figure_3_and_width_scales_channels():
    shapes = feature_shapes(ZFNet(num_classes=1000), 224)
    assert {name: shapes[name][-1] for name in SIDES} == SIDES
    assert {name: shapes[name][1] for name in CHANNELS} == CHANNELS
    half = ZFNet(num_classes=10, width=0.5, input_size=96)
    assert {n: getattr(half.features, n).out_channels for n in CHANNELS} == {n: c // 2 for n, c in CHANNELS.items()}
    assert half(torch.zeros(2, 3, 96, 96)).shape == (2, 10)
    with pytest.raises(ValueError, match="too small"):
        ZFNet(num_classes=10, input_size=16)


def tiny_module(base: type) -> nn.Module:
    """A two-conv net on ``base`` (either package's LightningModule) whose optimiser never moves a weight,
    so every change to the filters comes from the callback."""

    class Tiny(base):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 4, 3),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(4, 2),
            )

        def training_step(self, batch, batch_idx):
            images, labels = batch
            return nn.functional.cross_entropy(self.net(images), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    module = Tiny()
    with torch.no_grad():
        for conv in (module.net[0], module.net[2]):
            # Unit-RMS filters scaled to RMS 0.5, 0.05, 0.2 and 0.01: the first and third exceed 0.1.
            weight = conv.weight.normal_()
            weight /= weight.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1)
            weight *= torch.tensor([0.5, 0.05, 0.2, 0.01]).view(-1, 1, 1, 1)
    return module


@pytest.mark.parametrize("lightning", [pl, pytorch_lightning], ids=["lightning.pytorch", "pytorch_lightning"])
def test_filter_rms_clip_rescales_exactly_the_filters_over_the_radius(lightning):
    module = tiny_module(lightning.LightningModule)
    before = [conv.weight.detach().clone() for conv in (module.net[0], module.net[2])]
    data = DataLoader(TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))), batch_size=4)
    trainer = lightning.Trainer(
        max_epochs=1,
        callbacks=[FilterRMSClip(radius=0.1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, data)
    assert trainer.global_step == 2
    for old, conv in zip(before, (module.net[0], module.net[2]), strict=True):
        new = conv.weight.detach()
        rms = new.flatten(1).pow(2).mean(1).sqrt()
        torch.testing.assert_close(rms[[0, 2]], torch.tensor([0.1, 0.1]))
        torch.testing.assert_close(new[[0, 2]], old[[0, 2]] * torch.tensor([0.2, 0.5]).view(-1, 1, 1, 1))
        assert torch.equal(new[[1, 3]], old[[1, 3]])


@pytest.mark.parametrize("radius", [0, -0.1, float("inf"), "0.1"])
def test_filter_rms_clip_rejects_invalid_radius(radius):
    with pytest.raises(ValueError, match="positive finite"):
        FilterRMSClip(radius=radius)


def test_classifier_trains_logs_and_keeps_filters_within_the_radius():
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(num_classes=3, width=0.1, input_size=64, lr=0.05, lr_step_epochs=1)
    assert model(model.example_input_array).shape == (2, 3)
    assert model.hparams.num_classes == 3 and model.hparams.lr_step_epochs == 1
    # init="he": conv1 starts as the paper's faint N(0, 1e-2) noise, the layers above He-normal.
    assert model.model.features.conv1.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert model.model.features.conv3.weight.std().item() == pytest.approx((2 / (3 * 3 * 26)) ** 0.5, rel=0.1)
    with pytest.raises(ValueError, match="init"):
        ImageClassifier(num_classes=3, init="zeros")
    data = TensorDataset(torch.randn(16, 3, 64, 64), torch.randint(0, 3, (16,)))
    start = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(
        max_epochs=1,
        limit_val_batches=1,
        callbacks=[FilterRMSClip()],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    assert 0 <= float(metrics["val/acc"]) <= 1 and torch.isfinite(metrics["val/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters(), strict=True))
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.005)
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d):
            assert conv.weight.flatten(1).pow(2).mean(1).sqrt().max() <= 0.1 + 1e-6
