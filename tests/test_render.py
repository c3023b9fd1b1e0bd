"""Receptive-field geometry, cropping, normalisation and grids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_deconv import crop, deconvolve, normalize, projection_grid, receptive_field, support_boxes

# Published receptive-field sizes and strides of AlexNet's stages (e.g. Araujo et al., Distill 2019).
ALEXNET = {
    "features.0": (11, 4),
    "features.2": (19, 8),
    "features.5": (67, 16),
    "features.10": (163, 16),
    "features.12": (195, 32),
}


@pytest.mark.parametrize("layer", sorted(ALEXNET))
def test_alexnet_receptive_fields_match_the_literature(layer):
    field = receptive_field(torchvision.models.alexnet(weights=None), layer, (3, 224, 224))
    assert (field.size[0], field.stride[0]) == ALEXNET[layer]
    assert field.size[0] == field.size[1]


def test_resnet_field_goes_through_the_residual_branch():
    field = receptive_field(torchvision.models.resnet18(weights=None), "layer4", (3, 224, 224))
    assert field.size == (435, 435) and field.stride == (32, 32)


@pytest.mark.parametrize("layer", ["2", "5", "9", "12"])
def test_projection_support_lies_inside_the_receptive_field(zf_net, probe, layer):
    field = receptive_field(zf_net, layer, tuple(probe.shape[1:]))
    got = deconvolve(zf_net, probe, {layer: list(range(8))})[layer]
    boxes = field.boxes(got.position)
    for image, (top, left, bottom, right) in zip(got.images, boxes.tolist(), strict=True):
        inside = torch.zeros_like(image, dtype=torch.bool)
        inside[:, max(top, 0) : bottom, max(left, 0) : right] = True
        assert image[~inside].abs().sum() == 0
    assert sum(bool(image.abs().sum() > 0) for image in got.images) >= 4


def test_zf_stem_geometry_by_hand(zf_net):
    # conv 7x7/2 pad 1: size 7, stride 2, offset -1; then pool 3x3/2 pad 1: 7 + 2*2 = 11, stride 4, -1 - 2
    field = receptive_field(zf_net, "2", (3, 97, 91))
    assert (field.size, field.stride, field.offset) == ((11, 11), (4, 4), (-3, -3))
    assert field.boxes(torch.tensor([[2, 5]])).tolist() == [[5, 17, 16, 28]]
    # kept inside a 97 x 91 image: moved inwards at the borders, same size
    inside = field.boxes(torch.tensor([[0, 0], [2, 5], [24, 22]]), within=(97, 91))
    assert inside.tolist() == [[0, 0, 11, 11], [5, 17, 16, 28], [86, 80, 97, 91]]
    assert field.boxes(torch.tensor([[0, 0]]), within=(8, 9)).tolist() == [[0, 0, 8, 9]]


def test_receptive_field_of_unknown_resampling_says_what_to_do():
    class Upsampler(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.out = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.out(nn.functional.interpolate(self.conv(x), scale_factor=2))

    with pytest.raises(ValueError, match="support"):
        receptive_field(Upsampler(), "out", (3, 16, 16))


def test_crop_pads_outside_the_image():
    images = torch.arange(16.0).view(1, 1, 4, 4)
    out = crop(images, torch.tensor([[-1, 2, 2, 5]]), fill=-7)
    assert out[0, 0].tolist() == [[-7, -7, -7], [2, 3, -7], [6, 7, -7]]
    with pytest.raises(ValueError, match="same size"):
        crop(torch.zeros(2, 1, 4, 4), torch.tensor([[0, 0, 2, 2], [0, 0, 3, 3]]))


def test_crop_equals_slicing_the_padded_image():
    """Boxes inside, across every border, larger than the image and wholly outside, from chosen sources, against
    the explicit way: pad each image by more than any box reaches out, then slice."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 2, 7, 9, generator=gen)
    corners = torch.tensor([[0, 0], [-3, 5], [4, -2], [-6, -6], [9, 11], [2, 3], [-1, -1]])
    sources = torch.tensor([3, 0, 0, 2, 1, 3, 2])
    for height, width in [(3, 4), (5, 5), (9, 12)]:
        boxes = torch.cat([corners, corners + torch.tensor([height, width])], dim=1)
        padded = F.pad(images, (20,) * 4, value=-5.0)
        at = zip(sources.tolist(), (corners + 20).tolist(), strict=True)
        want = torch.stack([padded[k, :, t : t + height, x : x + width] for k, (t, x) in at])
        assert torch.equal(crop(images, boxes, fill=-5.0, sources=sources), want)


def test_crop_from_chosen_sources():
    images = torch.arange(3 * 16.0).view(3, 1, 4, 4)
    boxes = torch.tensor([[0, 0, 2, 2], [2, 1, 4, 3], [-1, 0, 1, 2]])
    sources = torch.tensor([2, 0, 2])
    torch.testing.assert_close(crop(images, boxes, sources=sources), crop(images[sources], boxes))
    assert crop(images, boxes[:1], sources=sources[:1])[0, 0].tolist() == [[32, 33], [36, 37]]


def test_support_boxes_cover_the_support_and_share_a_size():
    images = torch.zeros(2, 3, 20, 20)
    images[0, 1, 3:6, 4:9] = 1.0
    images[1, 0, 10, 15] = -2.0
    boxes = support_boxes(images)
    assert (boxes[:, 2] - boxes[:, 0]).unique().tolist() == [3]
    assert (boxes[:, 3] - boxes[:, 1]).unique().tolist() == [5]
    crops = crop(images, boxes)
    assert crops.abs().sum(dim=(1, 2, 3)).tolist() == images.abs().sum(dim=(1, 2, 3)).tolist()


def test_normalize():
    x = torch.tensor([-1.0, 0.0, 2.0, 0.5]).view(1, 1, 2, 2)
    assert normalize(x).flatten().tolist() == [0.25, 0.5, 1.0, 0.625]
    assert normalize(x, "minmax").flatten().tolist() == pytest.approx([0.0, 1 / 3, 1.0, 0.5])
    assert normalize(torch.zeros(2, 3, 4, 4)).unique().tolist() == [0.5]  # no signal is plain grey
    with pytest.raises(ValueError, match="symmetric"):
        normalize(x, "log")


def test_projection_grid_puts_each_patch_beside_its_projection():
    projections, patches = torch.randn(6, 3, 9, 9), torch.rand(6, 3, 9, 9)
    grid = projection_grid(projections, patches, nrow=3, padding=1)
    assert grid.shape == (3, 2 * (9 + 1) + 1, 3 * (18 + 1) + 1)
    assert torch.allclose(grid[:, 1:10, 1:10], normalize(projections[:1])[0])
    assert torch.allclose(grid[:, 1:10, 10:19], normalize(patches[:1], "minmax")[0])


def test_occlusion_colours_match_matplotlib_without_needing_it():
    from matplotlib import colormaps

    from lightning_deconv.render import _classes, _viridis

    values = torch.linspace(0, 1, 1001).view(1, 1, -1)
    ours = _viridis(values, 0.0, 1.0)[0, :, 0].T
    theirs = torch.tensor(colormaps["viridis"](values.flatten().numpy())[:, :3]).float()
    assert (ours - theirs).abs().max() < 0.021
    labels = torch.arange(40).view(1, 1, -1)
    palette = torch.tensor(colormaps["tab20"](labels.flatten().numpy() % 20)[:, :3]).float()
    assert torch.allclose(_classes(labels)[0, :, 0].T, palette, atol=1e-4)
