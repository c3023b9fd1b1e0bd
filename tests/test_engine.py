"""The projection engine against independent references, on sequential, functional and residual nets."""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomise_bn, rel_err, zf_shaped
from reference import explicit_deconvnet, strongest, swapped_relu_projection
from torch import nn

from lightning_deconv import Projector, deconvolve, find_maxima, kernels, project, receptive_field
from lightning_deconv.geometry import ReceptiveField, input_field
from lightning_deconv.maxima import pooling_switches
from lightning_deconv.paper.models import ZFNet


def live_channels(net: nn.Sequential, images: torch.Tensor, upto: int) -> list[int]:
    """Channels whose strongest activation is positive (a dead channel projects to zero)."""
    with torch.no_grad():
        peaks = net[: upto + 1](images.clone()).amax(dim=(0, 2, 3))
    return (peaks > 0).nonzero().flatten().tolist()


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
@pytest.mark.parametrize("mode", ["max", "map"])
@pytest.mark.parametrize("upto", [2, 4, 6, 11, 12])
def test_matches_explicit_deconvnet(zf_net, probe, rule, mode, upto):
    channels = [0, 3, 7]
    got = deconvolve(zf_net, probe, {str(upto): channels}, mode=mode, rule=rule)[str(upto)]
    with torch.no_grad():
        acts = zf_net[: upto + 1](probe.clone())
    for k, channel in enumerate(channels):
        image, row, col = strongest(acts, channel)
        assert (got.source[k].item(), *got.position[k].tolist()) == (image, row, col)
        assert got.value[k].item() == pytest.approx(acts[image, channel, row, col].item(), rel=1e-6)
        where = None if mode == "map" else (row, col)
        want, _ = explicit_deconvnet(zf_net, probe[image : image + 1], upto, channel, where, rule)
        assert want.abs().max() > 0
        assert rel_err(got.images[k], want[0]) < 1e-5
    assert got.images.dtype == torch.float32 and got.images.shape == (3, *probe.shape[1:])


def test_shared_switches_add_up(zf_net, probe):
    """Overlapping 3x3/2 pooling: a pixel that is the max of two windows receives both contributions."""
    x = zf_net[:2](probe[:1].clone())
    _, switches = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    flat = switches.flatten(2)
    assert (flat.sort(dim=2).values.diff(dim=2) == 0).any(), "the fixture must contain shared switches"
    got = deconvolve(zf_net, probe[:1], {"2": [1]}, mode="map")["2"]
    want, _ = explicit_deconvnet(zf_net, probe[:1], 2, 1, None, "deconvnet")
    assert rel_err(got.images[0], want[0]) < 1e-5
    # a unpooling that overwrites instead of adding (max_unpool2d) gives a different answer
    pooled = F.max_pool2d(x, 3, 2, 1)
    seed = torch.zeros_like(pooled)
    seed[0, 1] = pooled[0, 1]
    overwritten = F.max_unpool2d(seed, switches, 3, 2, 1, output_size=x.shape[-2:])
    wrong = F.conv_transpose2d(overwritten.clamp(min=0), zf_net[0].weight, None, 2, 1)
    assert wrong.shape == got.images[:1].shape
    assert rel_err(got.images[0], wrong[0]) > 1e-3


class FunctionalReLUNet(nn.Module):
    """The same convolutions, with every ReLU called functionally in forward, six different ways."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.conv1, self.pool1, self.conv2, self.pool2 = seq[0], seq[2], seq[3], seq[5]
        self.conv3, self.conv4, self.conv5, self.pool5 = seq[6], seq[8], seq[10], seq[12]

    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(x), inplace=True))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = self.conv3(x).relu()
        x = torch.relu_(self.conv4(x))
        x = self.conv5(x).relu_()
        return self.pool5(F.relu(x))


@pytest.mark.parametrize("layer, upto", [("pool1", 2), ("pool2", 5), ("conv4", 8), ("pool5", 12)])
def test_functional_relus_get_the_rule(zf_net, probe, layer, upto):
    net = FunctionalReLUNet(zf_net)
    channels = live_channels(zf_net, probe, upto)[:2]
    got = deconvolve(net, probe, {layer: channels})[layer]
    for k, channel in enumerate(channels):
        image, row, col = got.source[k].item(), *got.position[k].tolist()
        want, _ = explicit_deconvnet(zf_net, probe[image : image + 1], upto, channel, (row, col), "deconvnet")
        assert rel_err(got.images[k], want[0]) < 1e-5


class ResidualNet(nn.Module):
    """A residual stage with BatchNorm and a strided 1x1 shortcut; ReLUs are nn.ReLU modules reused."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.BatchNorm2d(8), nn.ReLU())
        self.conv_a = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn_a = nn.BatchNorm2d(16)
        self.conv_b = nn.Conv2d(16, 16, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(16)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))
        self.relu = nn.ReLU(inplace=True)
        self.block = nn.Identity()

    def forward(self, x):
        x = self.stem(x)
        out = self.relu(self.bn_a(self.conv_a(x)))
        out = self.bn_b(self.conv_b(out))
        out += self.shortcut(x)
        return self.block(self.relu(out))


def _check_against_swapped(model, images, layer, channels, rule):
    got = deconvolve(model, images, {layer: channels}, rule=rule)[layer]
    for k, channel in enumerate(channels):
        image, where = got.source[k].item(), tuple(got.position[k].tolist())
        want = swapped_relu_projection(model, images[image : image + 1], layer, channel, where, rule)
        assert want.abs().max() > 0
        assert rel_err(got.images[k], want[0]) < 1e-4


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
def test_residual_net_with_batchnorm(rule):
    torch.manual_seed(0)
    model = ResidualNet()
    randomise_bn(model)
    _check_against_swapped(model, torch.randn(4, 3, 33, 31), "block", [0, 9, 15], rule)


@pytest.mark.parametrize(
    "builder, layer, size",
    [
        (torchvision.models.alexnet, "features.10", 95),
        (torchvision.models.vgg11, "features.10", 48),
        (torchvision.models.resnet18, "layer2", 64),
    ],
)
def test_torchvision_models(builder, layer, size):
    torch.manual_seed(0)
    model = builder(weights=None)
    randomise_bn(model)
    _check_against_swapped(model, torch.randn(3, 3, size, size), layer, [1, 4], "deconvnet")


def test_cross_check_with_captum(probe):
    captum = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    net = zf_shaped(inplace=False).double()
    channels = live_channels(net, probe, 9)[:3]
    got = deconvolve(net, probe, {"9": channels})["9"]
    for k, channel in enumerate(channels):
        image, (row, col) = got.source[k].item(), got.position[k].tolist()
        attr = captum.NeuronDeconvolution(net, net[9]).attribute(
            probe[image : image + 1], neuron_selector=(channel, row, col)
        )
        assert rel_err(got.images[k], got.value[k] * attr[0]) < 1e-5


def test_batched_and_stops_at_layer(zf_net, probe):
    batches, later_calls = [], []
    zf_net[9].register_forward_hook(lambda m, i, o: later_calls.append(1))
    plan = Projector(zf_net, {"5": [0, 1, 2, 3]}, input_size=probe.shape[1:])
    zf_net[0].register_forward_hook(lambda m, i, o: batches.append(len(i[0])))
    plan(probe)
    assert batches[0] == len(probe)  # one pass to find the maxima
    assert sum(batches[1:]) == 4 and len(batches) <= 1 + 4  # each row projected once, rows of one window batched
    assert later_calls == []  # nothing past the layer ran, plan-time checks included


def test_cpu_projection_passes_are_cut_to_what_their_rows_keep(zf_net, probe, monkeypatch):
    """On CPU a projection pass takes as many rows as keep what they hold at most within CPU_PASS_BYTES (each
    row's window's share of every map the forward makes and of the gradients the backward holds at once), and
    gives what one pass gives."""
    layers = {"5": [0, 1, 2, 3, 4], "12": [0, 1, 2]}
    plan = Projector(zf_net, layers, input_size=probe.shape[1:])
    found = plan.maxima(probe)
    whole = plan.project(probe, found)
    row = plan._window_bytes(plan.layers["5"])
    assert 0 < row < plan._survey.kept_bytes + plan._survey.grad_bytes  # a window's share of the image's
    monkeypatch.setattr(kernels, "CPU_PASS_BYTES", 2 * row + 1)
    passes = []
    zf_net[0].register_forward_hook(lambda m, i, o: passes.append(len(i[0])))
    cut = plan.project(probe, {"5": found["5"]})
    assert passes == [2, 2, 1]
    assert torch.allclose(cut["5"].images, whole["5"].images, rtol=1e-5, atol=1e-7)


def test_one_set_of_ops_lays_each_filter_out_once_for_both_halves(zf_net, probe):
    """The ops given to maxima and project (as a firing and the plan's call do) lay each filter out once, and the
    projections are those of separate ops."""
    plan = Projector(zf_net, {"5": [0, 3], "12": [1]}, input_size=probe.shape[1:])
    ops = plan.ops()
    found = plan.maxima(probe, ops=ops)
    laid_out = {copy for _, copy in ops._filters.values()}
    assert laid_out  # the pass laid its filters out
    given, filters = [], ops.filters
    ops.filters = lambda weight: given.append(filters(weight)) or given[-1]
    shared = plan.project(probe, found, ops=ops)
    assert given and all(any(copy is known for known in laid_out) for copy in given)  # the same copies, reused
    separate = plan.project(probe, plan.maxima(probe))
    for layer in shared:
        assert torch.equal(shared[layer].images, separate[layer].images)


def test_find_maxima_one_pass_for_all_layers(zf_net, probe):
    calls = []
    zf_net[0].register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    found = find_maxima(zf_net, probe, {"2": [0, 1], "11": [3]}, batch_size=2)
    assert calls == [2, 2, 1]
    with torch.no_grad():
        deep = zf_net[:12](probe.clone())
    assert (found["11"].source.item(), *found["11"].position[0, 0].tolist()) == strongest(deep, 3)


def _state(model):
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "modes": {k: m.training for k, m in model.named_modules()},
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
        ),
        "rng": torch.get_rng_state(),
    }


def _assert_same(before, after):
    for key in ("flags", "modes", "hooks"):
        assert before[key] == after[key], key
    for k, v in before["params"].items():
        assert torch.equal(v, after["params"][k]), k
    for k, g in before["grads"].items():
        assert (g is None and after["grads"][k] is None) or torch.equal(g, after["grads"][k]), k
    assert torch.equal(before["rng"], after["rng"])


@pytest.mark.parametrize("context", ["plain", "no_grad", "inference_mode"])
def test_no_side_effects(context):
    torch.manual_seed(0)
    model = nn.Sequential(ResidualNet(), nn.Dropout(0.5))
    model.train()
    model[0].stem[1].eval()  # a mixed-mode model must come back mixed
    model[0].conv_b.weight.requires_grad_(False)
    model[0].conv_a.weight.grad = torch.randn_like(model[0].conv_a.weight)
    model(torch.randn(4, 3, 33, 31)).sum().backward()  # grads on everything trainable
    images = torch.randn(4, 3, 33, 31)
    before = _state(model)
    ctx = {"plain": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    with ctx[context]():
        probe = images.clone()  # an inference tensor under inference_mode, as in Lightning's hooks
        got = deconvolve(model, probe, {"0.block": [0, 3]})["0.block"]
    assert got.images.abs().sum() > 0
    _assert_same(before, _state(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_is_projected_in_float32(zf_net, probe, dtype):
    low = copy.deepcopy(zf_net).to(dtype)
    rounded = copy.deepcopy(low).float()  # the same weight values, held in float32
    got = deconvolve(low, probe.float(), {"6": [1, 2]})["6"]
    assert got.images.dtype == torch.float32 and next(low.parameters()).dtype == dtype
    maxima = find_maxima(low, probe.float(), {"6": [1, 2]})
    want = project(rounded, probe.float(), maxima)["6"].images
    assert rel_err(got.images, want) < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layer": "featurs.3"}, "Nearest valid names: features.3"),
        ({"channels": [0, 99]}, "out of range"),
        ({"channels": []}, "at least one"),
        ({"images": torch.rand(3, 97, 91)}, "4-D"),
        ({"images": torch.rand(2, 1, 97, 91)}, "expects 3"),
        ({"images": torch.rand(0, 3, 97, 91)}, "empty"),
        ({"images": torch.rand(2, 3, 5, 5)}, "failed on input"),
        ({"rule": "lrp"}, "Unknown rule"),
        ({"mode": "mean"}, "Unknown mode"),
    ],
)
def test_clear_errors(kwargs, message):
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(features=zf_shaped(), flatten=nn.Flatten(), fc=nn.LazyLinear(4)))
    net(torch.rand(1, 3, 97, 91))
    args = {"images": torch.rand(2, 3, 97, 91), "layer": "features.3", "channels": [0], **kwargs}
    options = {name: args[name] for name in ("rule", "mode") if name in args}
    with pytest.raises((ValueError, TypeError), match=message):
        deconvolve(net, args["images"], {args["layer"]: args["channels"]}, **options)


def test_non_spatial_layer_is_rejected():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 5))
    with pytest.raises(ValueError, match="not a 4-D"):
        deconvolve(net, torch.rand(2, 3, 16, 16), {"2": [0]})


@pytest.mark.parametrize(
    "size, stride, offset, image",
    [(139, 16, -59, 224), (107, 16, -43, 224), (11, 4, -3, 67), (75, 16, -27, 60), (7, 2, -1, 7), (5, 3, 2, 40)],
)
def test_windows_have_one_size_keep_the_grid_and_hold_each_field(size, stride, offset, image):
    """Every window (one per unit of the map) has one size, starts on the stride grid, stays inside the
    image and holds all of its unit's field that lies in the image: exactly what the windows' exactness
    needs, and what lets a layer's rows run as one batch."""
    field = ReceptiveField((size, size + 2), (stride, stride), (offset, offset))
    units = (image + 2 * max(0, -offset) - size) // stride + 1
    positions = torch.cartesian_prod(torch.arange(units), torch.arange(units))
    boxes = field.windows(positions, (image, image + 3))
    sides = boxes[:, 2:] - boxes[:, :2]
    assert (sides == sides[0]).all()
    assert (boxes[:, :2] % stride == 0).all() and (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2] <= image).all() and (boxes[:, 3] <= image + 3).all()
    first = offset + positions * stride
    assert (boxes[:, :2] <= first.clamp(min=0)).all()
    last = (first + torch.tensor([size, size + 2])).minimum(torch.tensor([image, image + 3]))
    assert (boxes[:, 2:] >= last).all()


@pytest.mark.parametrize(
    "builder, layer, size",
    [
        (lambda: zf_shaped().double(), "2", 97),
        (lambda: zf_shaped().double(), "5", 97),
        (lambda: zf_shaped().double(), "7", 129),
        (lambda: torchvision.models.alexnet(weights=None).double(), "features.5", 127),
        (lambda: torchvision.models.resnet18(weights=None).double(), "layer1", 75),
        (lambda: torchvision.models.vgg11(weights=None).double(), "features.7", 61),
    ],
)
def test_projection_on_receptive_field_windows_is_exact(builder, layer, size):
    """Running each row on the window holding its receptive field changes nothing, at borders too."""
    torch.manual_seed(0)
    model = builder()
    randomise_bn(model)
    images = torch.randn(6, 3, size, size + 2, dtype=torch.float64)
    field = receptive_field(model, layer, tuple(images.shape[1:]))
    maxima = find_maxima(model.eval(), images, {layer: list(range(8))})[layer]
    plan = Projector(model, {layer: maxima.channels}, input_size=images.shape[1:])
    pool = dict(model.named_modules())[layer]
    if plan.layers[layer].starts_at_switch:  # projections start at the switch, in the pooling's input
        field, positions = input_field(field, pool), maxima.switch[:, 0]
    else:
        positions = maxima.position[:, 0]
    assert plan.layers[layer].windows == field
    boxes = field.windows(positions, images.shape[-2:])
    sides = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1)
    assert (sides < torch.tensor([size, size + 2])).any(dim=1).all(), "the test needs windows smaller than images"
    at_border = (boxes[:, :2] == 0).any(dim=1) | (boxes[:, 2] == size) | (boxes[:, 3] == size + 2)
    full = Projector(model, {layer: maxima.channels}, input_size=images.shape[1:], windows=False)
    full = full.project(images, {layer: maxima})
    windowed = plan.project(images, {layer: maxima})
    full, windowed = full[layer].images, windowed[layer].images
    assert full.abs().amax(dim=(1, 2, 3)).gt(0).sum() >= 4
    assert at_border.any()  # some windows meet the borders
    assert rel_err(windowed, full) < 1e-6


def test_find_maxima_records_the_pooling_switches(zf_net, probe):
    """For max-pooling layers (padded, ceil-mode, unpadded) the switch is where the pooling took its max."""
    found = find_maxima(zf_net, probe, {"2": [0, 3], "5": [1, 2], "12": [4], "9": [0]}, batch_size=2)
    assert found["9"].switch is None
    for layer in ("2", "5", "12"):
        pool, maxima = zf_net[int(layer)], found[layer]
        with torch.no_grad():
            inputs = zf_net[: int(layer)](probe.clone())
        _, index = F.max_pool2d(
            inputs, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, return_indices=True
        )
        for k, channel in enumerate(maxima.channels.tolist()):
            row, col = maxima.position[k, 0].tolist()
            flat = index[maxima.source[k, 0], channel, row, col].item()
            assert maxima.switch[k, 0].tolist() == [flat // inputs.shape[-1], flat % inputs.shape[-1]]


class _ZeroesItsInputFromTheSecondCall(nn.Module):
    """Changes its input in place, from its second call on (so after the scan has learnt that it did not)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.mul_(0) if self.calls > 1 else x


@pytest.mark.parametrize("late", [False, True], ids=["in-place ReLU", "in place from the second pass"])
def test_maxima_of_maps_an_in_place_op_changes_later_in_the_pass(late):
    """A layer's maxima are those of its output as the layer gave it, though a later in-place op of the pass
    changes it (at once, or only from the second pass on), and one pass per batch serves every layer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3)
    with torch.no_grad():
        conv.bias[2] = -50.0  # channel 2 stays negative: a ReLU after it would turn its maxima to 0
    after = _ZeroesItsInputFromTheSecondCall() if late else nn.ReLU(inplace=True)
    net = nn.Sequential(conv, after, nn.MaxPool2d(2), nn.Conv2d(6, 4, 3)).eval()
    images = torch.randn(7, 3, 12, 12)
    passes = []
    conv.register_forward_hook(lambda module, inputs, output: passes.append(len(output)))
    found = find_maxima(net, images, {"0": [0, 2, 5], "3": [0, 3]}, batch_size=2)["0"]  # "3": the pass goes on
    assert passes == [2, 2, 2, 1]
    with torch.no_grad():
        maps = conv(images)
    for k, channel in enumerate([0, 2, 5]):
        image, row, col = strongest(maps, channel)
        assert (found.source[k, 0].item(), *found.position[k, 0].tolist()) == (image, row, col)
        assert torch.isclose(found.value[k, 0], maps[image, channel, row, col], rtol=1e-6)
    assert found.value[1, 0] < 0  # the negative channel kept its own maximum


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.MaxPool2d((2, 3), stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
        nn.MaxPool2d(2),
    ],
    ids=repr,
)
def test_pooling_switches_are_the_poolings_own_choice_at_every_position(pool):
    """Every output position of every map, on maps with many ties (values rounded to a few levels), NaNs, and
    corners of ``-inf`` (windows whose taps inside the map are all ``-inf``), channels-last: the switch found on
    the window alone is the index the pooling itself returns."""
    gen = torch.Generator().manual_seed(0)
    maps = (torch.rand(2, 3, 11, 10, generator=gen) * 3).round() - 2  # -2 to 1
    maps[0, 0, :4, :4] = maps[1, 2, -4:, -3:] = -torch.inf
    maps[0, 1, 5, 5] = maps[0, 1, 5, 6] = maps[1, 0, 0, 0] = torch.nan
    maps = maps.contiguous(memory_format=torch.channels_last)
    _, index = F.max_pool2d(
        maps, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, return_indices=True
    )
    image, channel, row, col = torch.meshgrid(*(torch.arange(n) for n in index.shape), indexing="ij")
    image, channel, row, col = (t.flatten() for t in (image, channel, row, col))
    got = pooling_switches(pool, maps, channel, image, torch.stack([row, col], dim=1))
    flat = index[image, channel, row, col]
    assert torch.equal(got, torch.stack([flat // maps.shape[-1], flat % maps.shape[-1]], dim=1))


@pytest.mark.parametrize("layer", ["features.pool2", "features.relu4", "features.pool5"])
def test_windowed_zfnet_projection_matches_reference(layer):
    """The whole fast path (switches, receptive-field windows, LRN, channels-last kernels) on the paper's
    network against the stock-op reference, image by image; a wrong switch gives a wrong answer."""
    torch.manual_seed(0)
    model = ZFNet(num_classes=10, width=0.25, input_size=131).eval()
    images = torch.randn(6, 3, 131, 131)
    every = find_maxima(model, images, {layer: range(model.features.conv5.out_channels)})[layer]
    live = every.channels[every.value[:, 0] > 0][:: max(1, int((every.value > 0).sum()) // 4)][:4]
    maxima = find_maxima(model, images, {layer: live})[layer]
    plan = Projector(model, {layer: maxima.channels}, input_size=(3, 131, 131))
    assert plan.layers[layer].windows is not None
    got = plan.project(images, {layer: maxima})[layer].images
    for k, channel in enumerate(maxima.channels.tolist()):
        image, where = maxima.source[k, 0].item(), tuple(maxima.position[k, 0].tolist())
        want = swapped_relu_projection(model, images[image : image + 1], layer, channel, where, "deconvnet")
        assert want.abs().max() > 0
        assert rel_err(got[k], want[0]) < 3e-5  # float32 rounding over five layers
    if maxima.switch is not None:
        moved = replace(maxima, switch=maxima.switch - (maxima.switch > 0).long())  # one row or column back
        assert rel_err(plan.project(images, {layer: moved})[layer].images, got) > 1e-2


def test_input_field_undoes_the_pooling():
    model = ZFNet(num_classes=10)
    for pool, below in (("pool1", "relu1"), ("pool2", "relu2"), ("pool5", "relu5")):
        field = receptive_field(model, f"features.{pool}", (3, 224, 224))
        want = receptive_field(model, f"features.{below}", (3, 224, 224))
        assert input_field(field, getattr(model.features, pool)) == want
