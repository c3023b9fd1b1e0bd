"""Occlusion sensitivity and invariance (paper Figs. 7 and 5) against explicit loops, and their figures."""

from __future__ import annotations

import copy
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from lightning_deconv.analysis.invariance import invariance, transform_images
from lightning_deconv.analysis.occlusion import occlusion
from lightning_deconv.paper.models import ZFNet


def classifier(dropout: float = 0.0) -> nn.Sequential:
    """A small classifier with conv maps, an in-place ReLU, BatchNorm, dropout and a fully connected head."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 5, stride=2, padding=1),  # 0
        nn.BatchNorm2d(6),  # 1
        nn.ReLU(inplace=True),  # 2: overwrites 1's output in place
        nn.MaxPool2d(3, stride=2),  # 3
        nn.Conv2d(6, 8, 3, padding=1),  # 4
        nn.ReLU(inplace=True),  # 5
        nn.AdaptiveAvgPool2d(2),  # 6
        nn.Flatten(),  # 7
        nn.Dropout(dropout),  # 8
        nn.Linear(32, 16),  # 9
        nn.ReLU(inplace=True),  # 10
        nn.Linear(16, 7),  # 11
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)  # non-trivial statistics, so that eval mode matters
        net[1].running_var.uniform_(0.5, 2.0)
        for linear in (net[9], net[11]):  # a head that tells the images apart (biases would dominate)
            linear.weight.mul_(4)
            linear.bias.zero_()
    return net.double().eval()


@pytest.fixture
def net() -> nn.Sequential:
    return classifier()


@pytest.fixture
def images() -> torch.Tensor:
    """Non-square images; with patch 7 and stride 3 the stride divides neither (H - patch) nor (W - patch)."""
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(3, 3, 23, 30, generator=generator, dtype=torch.float64)
    return noise + torch.randn(3, 3, 1, 1, generator=generator, dtype=torch.float64)  # a colour cast per image


def output_of(net: nn.Module, image: torch.Tensor, layer: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits, the layer's output copied when it ran)`` for one forward pass."""
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.clone())) if layer is not None else None
    try:
        with torch.no_grad():
            logits = net(image)
    finally:
        if handle is not None:
            handle.remove()
    return logits, (seen[0] if seen else None)


def brute_force(net, images, patch, stride, fill, layer=None, targets=None):
    """The paper's experiment written out: every position of every image, one occluded copy at a time."""
    n, _, height, width = images.shape
    tops, lefts = range(0, height - patch + 1, stride), range(0, width - patch + 1, stride)
    probability = torch.zeros(n, len(tops), len(lefts), dtype=torch.float64)
    label = torch.zeros(n, len(tops), len(lefts), dtype=torch.long)
    feature = torch.zeros(n, len(tops), len(lefts), dtype=torch.float64)
    for i in range(n):
        logits, act = output_of(net, images[i : i + 1], layer)
        target = int(logits.argmax()) if targets is None else int(targets[i])
        channel = int(act[0].amax(dim=(1, 2)).argmax()) if layer is not None else None
        for r, top in enumerate(tops):
            for c, left in enumerate(lefts):
                occluded = images[i : i + 1].clone()
                occluded[:, :, top : top + patch, left : left + patch] = fill
                logits, act = output_of(net, occluded, layer)
                probability[i, r, c] = F.softmax(logits, dim=1)[0, target]
                label[i, r, c] = logits.argmax()
                if layer is not None:
                    feature[i, r, c] = act[0, channel].sum()
    return probability, label, feature


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------- occlusion


@pytest.mark.parametrize(
    ("layer", "fill", "batch_size"),
    [(1, 0.0, None), (4, 0.5, 7), (3, -1.0, 1000)],  # BatchNorm then in-place ReLU; conv; pooling
)
def test_occlusion_matches_brute_force(net, images, layer, fill, batch_size):
    patch, stride = 7, 3
    got = occlusion(net, images, str(layer), patch=patch, stride=stride, fill=fill, batch_size=batch_size)
    probability, label, feature = brute_force(net, images, patch, stride, fill, net[layer])
    assert got.probability.shape == (3, (23 - 7) // 3 + 1, (30 - 7) // 3 + 1) == (3, 6, 8)
    assert got.probability.dtype == got.feature.dtype == torch.float32
    assert rel_err(got.probability, probability) < 1e-5
    assert rel_err(got.feature, feature) < 1e-5
    assert torch.equal(got.label, label)
    assert (label != label.flatten()[0]).any(), "the labels must vary for the test to mean something"
    with torch.no_grad():
        assert torch.equal(got.targets, net(images).argmax(dim=1))  # default: the unoccluded top class
    assert got.layer == str(layer) and got.square(1, 2) == (3, 6, 10, 13)


def test_occlusion_given_targets_and_no_layer(net, images):
    targets = [4, 0, 6]
    got = occlusion(net, images, patch=9, stride=5, targets=torch.tensor(targets), batch_size=10)
    probability, label, _ = brute_force(net, images, 9, 5, 0.0, targets=targets)
    assert got.targets.tolist() == targets and got.feature is None and got.channel is None
    assert rel_err(got.probability, probability) < 1e-5
    assert torch.equal(got.label, label)


def test_occlusion_whole_image_square(net, images):
    got = occlusion(net[:5], images[:, :, :20, :20], "4", patch=20, stride=7, classify=False)
    assert got.feature.shape == (3, 1, 1)
    with torch.no_grad():
        want = net[:5](torch.zeros(3, 3, 20, 20, dtype=torch.float64))
    channels = [int(net[:5](images[i : i + 1, :, :20, :20]).amax(dim=(2, 3)).argmax()) for i in range(3)]
    assert got.channel.tolist() == channels
    assert torch.allclose(got.feature[:, 0, 0].double(), want[range(3), channels].sum(dim=(1, 2)), rtol=1e-6)


def test_feature_only_stops_at_layer(net, images):
    calls = []
    handle = net[9].register_forward_hook(lambda *_: calls.append(1))
    try:
        alone = occlusion(net, images, "4", patch=7, stride=3, classify=False)
        assert not calls, "the forward must stop at the layer"
        both = occlusion(net, images, "4", patch=7, stride=3)
    finally:
        handle.remove()
    assert calls, "with classify the forward runs to the logits"
    assert alone.probability is None and alone.label is None and alone.targets is None
    assert torch.equal(alone.feature, both.feature) and torch.equal(alone.channel, both.channel)


def test_occlusion_zfnet_float32():
    """ZFNet (LRN, overlapping pooling) in float32 through the channels-last CPU path, patch 16 / stride 12."""
    torch.manual_seed(0)
    model = ZFNet(num_classes=10, width=0.125, input_size=64).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    got = occlusion(model, images, "features.pool5", patch=16, stride=12)
    probability, label, feature = brute_force(model, images, 16, 12, 0.0, model.features.pool5)
    assert rel_err(got.probability, probability) < 1e-5
    assert rel_err(got.feature, feature) < 1e-5
    assert torch.equal(got.label, label)


# ---------------------------------------------------------------------------------------------- incremental


class AlexNetLike(nn.Module):
    """AlexNet's shape in small (11x11/4 conv, overlapping pools, grouped and dilated convs, adaptive pooling),
    with the ReLU after conv2 written as a functional op in ``forward``."""

    def __init__(self, functional_start: bool = False, skip: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.functional_start, self.skip = functional_start, skip
        self.conv1 = nn.Conv2d(3, 8, 11, stride=4, padding=2)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(3, stride=2)
        self.conv2 = nn.Conv2d(8, 12, 5, padding=2, groups=2)
        self.pool2 = nn.AvgPool2d(3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(12, 12, 3, padding=2, dilation=2)
        self.relu3 = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(108, 6))
        with torch.no_grad():  # a head that tells the occluded images apart: blind to a uniform response
            weight = self.head[2].weight
            weight.sub_(weight.mean(dim=1, keepdim=True)).mul_(100)
            self.head[2].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional_start:
            x = x.flip(-1)  # a functional op before the first layer: no cone can be traced
        pooled = self.pool1(self.relu1(self.conv1(x)))
        x = self.conv2(pooled)
        x = self.pool2(F.relu(x))  # functional: the traced chain ends at conv2
        y = self.relu3(self.conv3(x))
        return self.head(y * pooled.mean(dim=(1, 2, 3), keepdim=True) if self.skip else y)


def test_cones_of_the_chain():
    """The chain, the cones and the MAC count on a net small enough to count by hand."""
    from lightning_deconv.analysis.cones import Cones

    net = AlexNetLike().double().eval()
    with torch.no_grad(), Cones.recording(net, torch.rand(1, 3, 67, 67, dtype=torch.float64)) as cones:
        net(cones.images)
    assert [layer.module for layer in cones.layers] == [net.conv1, net.relu1, net.pool1, net.conv2]
    assert "does not take the previous layer's output" in cones.stop and "pool2" in cones.stop
    axes = cones.axes(patch=12, stride=11)  # squares at 0, 11, ..., 55 on a 67 px image
    rows = axes[0][0]  # conv1 (11/4, pad 2), 16x16 map: unit o reads 4o-2 .. 4o+8
    assert rows.first.tolist() == [0, 1, 4, 7, 9, 12] and rows.end.tolist() == [4, 7, 9, 12, 15, 16]
    pool = axes[2][0]  # pool1 (3/2) on 16 -> 7
    assert pool.first.tolist() == [0, 0, 1, 3, 4, 5] and pool.end.tolist() == [2, 4, 5, 6, 7, 7]
    full, cone = cones.macs_per_position(12, 11)
    conv1, conv2, conv3, linear = 16 * 16 * 8 * 363, 7 * 7 * 12 * 100, 4 * 4 * 12 * 108, 108 * 6
    assert full == conv1 + conv2 + conv3 + linear
    extent = [e - f for f, e in zip(rows.first.tolist(), rows.end.tolist(), strict=True)]
    conv2_rows = axes[3][0]
    extent2 = (conv2_rows.end - conv2_rows.first).double().mean().item()
    want = (sum(extent) / 6) ** 2 * 8 * 363 + extent2**2 * 12 * 100 + conv3 + linear
    assert cone == pytest.approx(want)


@pytest.mark.parametrize(("patch", "stride", "layer"), [(12, 11, "relu1"), (9, 5, "conv3"), (20, 7, "pool1")])
def test_incremental_alexnet_like(patch, stride, layer):
    net = AlexNetLike().double().eval()
    images = torch.randn(2, 3, 67, 71, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cones can be traced: no fallback
        got = occlusion(net, images, layer, patch=patch, stride=stride, fill=0.3, batch_size=13)
    probability, label, feature = brute_force(net, images, patch, stride, 0.3, getattr(net, layer))
    assert rel_err(got.probability, probability) < 1e-5 and rel_err(got.feature, feature) < 1e-5
    assert torch.equal(got.label, label) and (label != label.flatten()[0]).any()
    alone = occlusion(net, images, layer, patch=patch, stride=stride, fill=0.3, classify=False)
    assert rel_err(alone.feature, feature) < 1e-5


@pytest.mark.parametrize("waste", [1.0, 1e9])
def test_incremental_exact_for_any_grouping(waste, monkeypatch):
    """Finest groups of positions (exact cones, up to 4 per axis) or one group for all: the same exact maps."""
    from lightning_deconv.analysis import cone_geometry, cones

    monkeypatch.setattr(cone_geometry, "_WASTE", waste)
    net = AlexNetLike().double().eval()
    images = torch.randn(2, 3, 67, 71, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad(), cones.Cones.recording(net, images) as recorded:
        net(recorded.images)
    axes = recorded.axes(patch=9, stride=5)
    groups = recorded.groups(axes, recorded.switch(axes))
    assert [len(extents) for _, extents in groups] == ([4, 4] if waste == 1.0 else [1, 1])
    got = occlusion(net, images, "conv3", patch=9, stride=5, fill=0.3, batch_size=13)
    probability, label, feature = brute_force(net, images, 9, 5, 0.3, net.conv3)
    assert rel_err(got.probability, probability) < 1e-5 and rel_err(got.feature, feature) < 1e-5
    assert torch.equal(got.label, label)


@pytest.mark.parametrize(("patch", "stride"), [(16, 12), (10, 6), (24, 8)])
def test_incremental_zfnet(patch, stride):
    """ZFNet's shape in float32 (LRN, overlapping pools, stride-2 convs): the cones reach pool2's whole map."""
    torch.manual_seed(0)
    model = ZFNet(num_classes=10, width=0.125, input_size=64).eval()
    with torch.no_grad():
        model.classifier.fc8.weight.mul_(50)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for layer in ("features.relu1", "features.conv3"):
        got = occlusion(model, images, layer, patch=patch, stride=stride)
        probability, label, feature = brute_force(model, images, patch, stride, 0.0, model.get_submodule(layer))
        assert rel_err(got.probability, probability) < 1e-5 and rel_err(got.feature, feature) < 1e-5
        assert torch.equal(got.label, label)


@pytest.mark.parametrize("case", ["functional_start", "skip"])
def test_incremental_falls_back_with_one_warning(case):
    """A functional op before the first layer (no cone), or a skip connection reading the output of a traced
    layer below the switch (caught by the check of the forward from the switch): full passes, one warning."""
    net = AlexNetLike(**{case: True}).double().eval()
    images = torch.randn(2, 3, 67, 67, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = occlusion(net, images, "conv1", patch=12, stride=11)
    assert len(caught) == 1 and "whole model" in str(caught[0].message)
    probability, label, feature = brute_force(net, images, 12, 11, 0.0, net.conv1)
    assert rel_err(got.probability, probability) < 1e-5 and rel_err(got.feature, feature) < 1e-5
    assert torch.equal(got.label, label)


def snapshot(net: nn.Module) -> tuple:
    return (
        copy.deepcopy(net.state_dict()),
        [m.training for m in net.modules()],
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state()[1].copy(),
    )


@pytest.mark.parametrize("analysis", ["occlusion", "invariance"])
def test_no_side_effects(images, analysis):
    net = classifier(dropout=0.5).train()
    net[4].eval()  # a mixed state, to be given back as it was
    before = snapshot(net)
    if analysis == "occlusion":
        occlusion(net, images, "2", patch=7, stride=3)
    else:
        invariance(net, images, ["2", "10"], transform="rotate", amounts=[0, 15])
    after = snapshot(net)
    assert all(torch.equal(a, b) for a, b in zip(before[0].values(), after[0].values(), strict=True))
    assert before[1] == after[1] and net[4].training is False and net.training is True
    assert torch.equal(before[2], after[2]) and before[3] == after[3] and np.array_equal(before[4], after[4])
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch": 0}, "`patch` must be a whole number of pixels >= 1"),
        ({"stride": 0}, "`stride` must be a whole number of pixels >= 1"),
        ({"patch": 24}, "does not fit in 23x30 images; use a patch of at most 23"),
        ({"images": torch.zeros(3, 23, 30, dtype=torch.float64)}, r"must be 4-D \[N, C, H, W\]"),
        ({"targets": [1, 2]}, "one whole-number target class per image: 3 of them"),
        ({"targets": [1, 2, 7]}, r"Targets \[7\] are out of range: the model has 7 classes"),
        ({"layer": "9"}, r"Layer '9' outputs \(.*\), not a 4-D"),
        ({"layer": "nope"}, "Unknown layer 'nope'"),
        ({"classify": False}, "give a `layer`"),
        ({"classify": False, "layer": "4", "targets": [0, 0, 0]}, "need `classify=True`"),
        ({"batch_size": 0}, "`batch_size` must be at least 1"),
    ],
)
def test_occlusion_errors(net, images, kwargs, message):
    arguments = {"model": net, "images": images, "patch": 7, "stride": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        occlusion(**arguments)


def test_options_are_keyword_only(net, images):
    with pytest.raises(TypeError, match="positional"):
        occlusion(net, images, "4", 7, 3)
    with pytest.raises(TypeError, match="positional"):
        invariance(net, images, ["4"], "rotate", [0, 10])


def test_occlusion_needs_class_logits(net, images):
    with pytest.raises(ValueError, match=r"gives output of shape \(3, 8, 2, 2\).*logits \[N, classes\]"):
        occlusion(net[:7], images, patch=7, stride=3)


# ---------------------------------------------------------------------------------------------- invariance


def transformed_by_hand(image: torch.Tensor, transform: str, amount: float) -> torch.Tensor:
    """One image moved down by whole pixels with zero fill (sliced), or zoomed/rotated about the centre."""
    if transform == "translate":
        shift = int(amount)
        out = torch.zeros_like(image)
        if shift >= 0:
            out[..., shift:, :] = image[..., : image.shape[-2] - shift, :]
        else:
            out[..., :shift, :] = image[..., -shift:, :]
        return out
    if amount == (1.0 if transform == "scale" else 0.0):
        return image
    scale, angle = (amount, 0.0) if transform == "scale" else (1.0, amount)
    mode = TF.InterpolationMode.BILINEAR
    return TF.affine(image, angle=angle, translate=[0, 0], scale=scale, shear=[0.0, 0.0], interpolation=mode, fill=0.0)


@pytest.mark.parametrize(
    ("transform", "amounts"),
    [("translate", [-6, 0, 3, 11]), ("scale", [0.7, 1.0, 1.45]), ("rotate", [0, 30, 90, 200])],
)
def test_invariance_matches_explicit_loop(net, images, transform, amounts):
    layers = ["2", "10"]  # a 4-D map under an in-place ReLU, and the fully connected layer 7 analogue
    got = invariance(net, images, layers, transform=transform, amounts=amounts, batch_size=5)
    assert got.amounts.tolist() == pytest.approx(amounts) and got.probability.shape == (3, len(amounts))
    for i in range(len(images)):
        original = images[i : i + 1]
        logits, _ = output_of(net, original, None)
        assert int(got.targets[i]) == int(logits.argmax())
        for a, amount in enumerate(amounts):
            moved = transformed_by_hand(original, transform, amount)
            logits, _ = output_of(net, moved, None)
            assert float(got.probability[i, a]) == pytest.approx(float(F.softmax(logits, 1)[0, got.targets[i]]), 1e-6)
            for name in layers:
                _, before = output_of(net, original, net[int(name)])
                _, after = output_of(net, moved, net[int(name)])
                want = float((after - before).flatten().norm())
                assert float(got.distance[name][i, a]) == pytest.approx(want, rel=1e-5, abs=1e-12)
    identity = amounts.index(1.0 if transform == "scale" else 0)
    assert (got.distance["10"][:, identity] == 0).all() and (got.distance["2"][:, identity] == 0).all()
    assert (got.distance["2"][:, [a for a in range(len(amounts)) if a != identity]] > 0).all()


def test_transform_images_translate_is_a_shift():
    image = torch.arange(20.0).view(1, 1, 5, 4)
    assert torch.equal(transform_images(image, "translate", 2), transformed_by_hand(image, "translate", 2))
    assert torch.equal(transform_images(image, "translate", -3), transformed_by_hand(image, "translate", -3))
    assert transform_images(image, "rotate", 0) is image


def test_invariance_given_targets(net, images):
    got = invariance(net, images, [net[4]], transform="scale", amounts=[1.2], targets=[6, 5, 4])
    assert got.targets.tolist() == [6, 5, 4] and list(got.distance) == ["4"]
    logits, _ = output_of(net, transform_images(images, "scale", 1.2), None)
    assert torch.allclose(got.probability[:, 0].double(), F.softmax(logits, 1)[range(3), [6, 5, 4]], rtol=1e-6)
    unmoved = invariance(
        net, images[:1], ["4"], transform="scale", amounts=[1.0, 1.0], targets=[6]
    )  # nothing to transform
    assert (unmoved.distance["4"] == 0).all() and torch.equal(unmoved.probability[0, 0], unmoved.probability[0, 1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transform": "shear"}, "Unknown transform 'shear'"),
        ({"amounts": []}, "at least one amount"),
        ({"transform": "scale", "amounts": [1.0, 0.0]}, "Scale factors must be positive"),
        ({"layers": []}, "at least one layer"),
        ({"layers": ["nope"]}, "Unknown layer 'nope'"),
        ({"targets": [0]}, "one whole-number target class per image"),
    ],
)
def test_invariance_errors(net, images, kwargs, message):
    arguments = {"model": net, "images": images, "layers": ["4"], "transform": "rotate", "amounts": [0, 10], **kwargs}
    with pytest.raises(ValueError, match=message):
        invariance(**arguments)


# ---------------------------------------------------------------------------------------------- figures


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run's log dir as Lightning and the callback leave it, written by hand (a tiny ZFNet, 6 probe images)."""
    torch.manual_seed(0)
    hparams = {"num_classes": 4, "width": 0.125, "input_size": 64, "dropout": 0.5, "lr": 0.01}
    model = ZFNet(num_classes=4, width=0.125, input_size=64)
    probe = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": hparams,
        "datamodule_hyper_parameters": {"input_size": 64, "photos": ["astronaut", "coffee", "chelsea", "rocket"]},
        "callbacks": {
            "ModelCheckpoint{'monitor': None}": {"best_model_path": ""},
            "DeconvCallback{'layers': 'auto'}": {"probe": probe, "features": {}, "history": {}},
        },
    }
    (tmp_path / "checkpoints").mkdir()
    torch.save(checkpoint, tmp_path / "checkpoints" / "last.ckpt")
    return tmp_path


def test_figures_from_a_run(run_dir, tmp_path, monkeypatch):
    from lightning_deconv.paper import figure5, figure7, runs

    small = ["--dpi", "50"]  # few positions and amounts, low resolution: the test is about the plumbing
    square = ["--patch", "32", "--stride", "16"]
    drawn = []
    show = figure7._show_map
    monkeypatch.setattr(figure7, "_show_map", lambda *a, **style: drawn.append(style) or show(*a, **style))
    figure7.main([str(run_dir), "-o", str(tmp_path / "f7.png"), "--count", "2", *square, *small])
    probability = [style for style in drawn if style.get("cmap") == "jet"]
    assert len(probability) == 2 and all((s["vmin"], s["vmax"]) == (0.0, 1.0) for s in probability)  # the paper's
    amounts = ["--translate", "-8", "0", "8", "--scale", "1", "1.5", "--rotate", "0", "90"]
    figure5.main([str(run_dir), "-o", str(tmp_path / "f5.png"), "--images", "0", "3", *amounts, *small])
    for name in ("f7.png", "f5.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 250
    run = runs.load_run(run_dir)
    assert run.classes == ["astronaut", "coffee", "chelsea", "rocket"] and run.probe.shape == (6, 3, 64, 64)
    with pytest.raises(ValueError, match=r"Probe indices must be in 0..5"):
        figure7.figure7(run_dir, tmp_path / "x.png", images=[6])
