"""The maxima pass computes only the tracked channels of a last convolution whose chain to the deepest layer is
channel-wise, and all of them wherever anything else could read the others."""

from __future__ import annotations

import pytest
import torch
from helpers import randomise_bn
from reference import strongest
from torch import nn

from lightning_deconv import Projector, find_maxima, project


def outputs_of(model: nn.Module, images: torch.Tensor, module: nn.Module) -> list[torch.Tensor]:
    """Every output ``module`` gives in one forward pass of the model as it is."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        model(images.clone())
    handle.remove()
    return seen


def assert_true_maxima(model: nn.Module, images: torch.Tensor, layers: dict[str, list[int]], found: dict) -> None:
    """The plan's maxima against the strongest activations of the model run as it is, module by module."""
    modules = dict(model.named_modules())
    for name, channels in layers.items():
        (maps,) = outputs_of(model, images, modules[name])[:1]
        for k, channel in enumerate(channels):
            image, row, col = strongest(maps, channel)
            assert (found[name].source[k, 0].item(), *found[name].position[k, 0].tolist()) == (image, row, col)
            assert torch.allclose(found[name].value[k, 0], maps[image, channel, row, col], rtol=1e-5, atol=1e-6)


def computed_channels(plan: Projector, images: torch.Tensor, conv: nn.Module, **maxima: object) -> list[int]:
    """The channels of ``conv``'s output the plan's maxima pass computed (the others it leaves at zero)."""
    seen: list[torch.Tensor] = []
    handle = conv.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    plan.maxima(images, **maxima)
    handle.remove()
    return torch.cat(seen).ne(0).flatten(2).any(dim=2).any(dim=0).nonzero().flatten().tolist()


def vgg_end() -> nn.Sequential:
    """A VGG-like end: the last convolution, a BatchNorm, a ReLU and a pooling, tracked at two of them."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
    )
    model.append(nn.MaxPool2d(2))
    randomise_bn(model)
    return model.eval()


def test_the_last_convolution_computes_only_the_tracked_channels_and_the_maxima_are_the_models():
    model, images = vgg_end(), torch.randn(5, 3, 20, 20)
    layers = {"1": [0, 3], "4": [1, 5], "5": [5, 9, 12]}  # conv 2 feeds "4" and "5"
    plan = Projector(model, layers, input_size=(3, 20, 20))
    assert computed_channels(plan, images, model[2]) == [1, 5, 9, 12]
    assert computed_channels(plan, images, model[0]) == list(range(8))  # it feeds conv 2: all of them
    assert_true_maxima(model, images, layers, plan.maxima(images))
    # With summaries (every channel's peak and the Gram matrix), every channel.
    assert computed_channels(plan, images, model[2], summaries=True) == list(range(16))
    found = plan.maxima(images, summaries=True)
    (full,) = outputs_of(model, images, model[5])
    assert torch.allclose(found["5"].peaks, full.amax(dim=(0, 2, 3)))
    # The projections are those of the maxima of a whole pass (find_maxima computes every channel).
    ours, theirs = plan(images), project(model, images, find_maxima(model, images, layers))
    for name in layers:
        assert torch.equal(ours[name].source, theirs[name].source)
        assert torch.allclose(ours[name].images, theirs[name].images, rtol=1e-5, atol=1e-6)


def test_tracking_every_channel_computes_them_all():
    model, images = vgg_end(), torch.randn(3, 3, 20, 20)
    plan = Projector(model, {"5": range(16)}, input_size=(3, 20, 20))
    assert computed_channels(plan, images, model[2]) == list(range(16))


class Mixed(nn.Module):
    """A channel-mixing op between the convolution and its ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.pool = nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return self.pool(self.relu(out + out.roll(1, dims=1)))


class Reused(nn.Module):
    """One convolution run twice, the tracked ReLU after the second run."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, padding=1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv(self.relu1(self.conv(self.stem(x)))))


class Shared(Reused):
    """Two convolutions with one weight, the tracked ReLU after the second."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Conv2d(6, 6, 3, padding=1)
        self.second.weight = self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.second(self.relu1(self.conv(self.stem(x)))))


@pytest.mark.parametrize(
    ("build", "layer", "conv"),
    [
        (Mixed, "pool", "conv"),
        (Reused, "relu2", "conv"),
        (Shared, "relu2", "second"),
        (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=2), nn.ReLU()), "3", "2"),
        (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.LocalResponseNorm(3)), "2", "0"),
    ],
    ids=["channels-mixed", "convolution-reused", "weight-shared", "grouped", "normalised-across-channels"],
)
def test_no_narrowing_where_other_channels_are_read(build, layer, conv):
    torch.manual_seed(0)
    model, images = build().eval(), torch.randn(4, 3, 16, 16)
    layers = {layer: [1, 4]}
    plan = Projector(model, layers, input_size=(3, 16, 16))
    assert computed_channels(plan, images, dict(model.named_modules())[conv]) == list(range(6))
    assert_true_maxima(model, images, layers, plan.maxima(images))
