"""The projection plan: one fast path for every caller, equal to whole-image projections wherever it is used."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomise_bn, rel_err, zf_shaped
from reference import explicit_deconvnet, strongest, swapped_relu_projection
from torch import nn

from lightning_deconv import Projector, deconvolve, find_maxima, support_boxes
from lightning_deconv.kernels import CPU_PASS_BYTES, per_pass
from lightning_deconv.paper.models import ZFNet
from lightning_deconv.tails import find_tail


def _zfnet():
    return ZFNet(num_classes=10, width=0.25, input_size=99).double()


NETS = {
    "zfnet": (_zfnet, ["features.pool1", "features.pool2", "features.relu4", "features.pool5"], 99),
    "alexnet": (lambda: torchvision.models.alexnet(weights=None).double(), ["features.2", "features.9"], 99),
    "vgg11": (lambda: torchvision.models.vgg11(weights=None).double(), ["features.2", "features.12"], 56),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None).double(), ["relu", "layer1", "layer3"], 61),
}


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
@pytest.mark.parametrize("net", list(NETS))
def test_multi_layer_form_equals_single_layer_and_whole_images(net, rule):
    """deconvolve({layer: channels, ...}) == one deconvolve per layer == whole-image projections, crops too."""
    builder, layers, size = NETS[net]
    torch.manual_seed(0)
    model = builder().eval()
    randomise_bn(model)
    images = torch.randn(4, 3, size, size + 3, dtype=torch.float64)
    wanted = {layer: [0, 2, 5] for layer in layers}
    many = deconvolve(model, images, wanted, rule=rule)
    plan = Projector(model, wanted, input_size=images.shape[1:], rule=rule)
    assert sum(layer.windows is not None for layer in plan.layers.values()) >= len(layers) - 1  # the fast path is taken
    whole = Projector(model, wanted, input_size=images.shape[1:], rule=rule, windows=False)(images)
    assert list(many) == layers
    for layer in layers:
        one = deconvolve(model, images, {layer: wanted[layer]}, rule=rule)[layer]
        assert torch.equal(many[layer].source, one.source) and torch.equal(many[layer].position, one.position)
        assert torch.equal(many[layer].images, one.images)
        assert torch.equal(many[layer].boxes, whole[layer].boxes)
        assert whole[layer].images.abs().amax() > 0
        assert rel_err(many[layer].images, whole[layer].images) < 1e-9
        assert rel_err(many[layer].crops, whole[layer].crops) < 1e-9
        assert torch.equal(many[layer].patches, whole[layer].patches)


class HiddenPool(nn.Module):
    """A 3x3 stride-1 max-pool called functionally: it widens the field but keeps the map size, so the field
    traced through the modules is too small."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = nn.functional.max_pool2d(self.conv1(x), 3, stride=1, padding=1)
        return self.relu(self.conv2(x))


def test_a_field_that_fails_the_check_is_used_neither_for_windows_nor_crops():
    torch.manual_seed(0)
    model = HiddenPool().double()
    images = torch.randn(5, 3, 40, 36, dtype=torch.float64)
    with pytest.warns(UserWarning, match="'relu' on whole images"):
        plan = Projector(model, {"conv1": [0, 1], "relu": [0, 2, 4]}, input_size=images.shape[1:])
    assert plan.layers["conv1"].windows is not None and plan.layers["conv1"].field is not None
    assert plan.layers["relu"].windows is None and plan.layers["relu"].field is None
    got = plan(images)["relu"]
    assert torch.equal(got.boxes, support_boxes(got.images))  # cropped to the support, not the wrong field
    whole = Projector(model, {"relu": [0, 2, 4]}, input_size=images.shape[1:], windows=False)(images)["relu"]
    assert rel_err(got.images, whole.images) < 1e-12


def _activation_net(activation: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 5, stride=2, padding=1),
        activation,
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(6, 8, 3, padding=1),
        type(activation)() if not isinstance(activation, nn.PReLU) else nn.PReLU(8),
    ).double()


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
@pytest.mark.parametrize(
    "activation", [nn.LeakyReLU(0.2), nn.LeakyReLU(0.1, inplace=True), nn.PReLU(6), nn.ReLU6()], ids=repr
)
def test_relu_like_activations_get_the_rules_analogue(activation, rule):
    """LeakyReLU, PReLU and ReLU6 against the explicit chain with the analogue written out (tests/reference.py)."""
    torch.manual_seed(0)
    net = _activation_net(activation)
    if isinstance(activation, nn.PReLU):
        with torch.no_grad():
            for prelu in (net[1], net[4]):
                prelu.weight.uniform_(0.05, 0.4)
    images = torch.randn(3, 3, 41, 37, dtype=torch.float64) * 4  # ReLU6's cap is reached
    got = deconvolve(net, images, {"4": [0, 3, 7]}, rule=rule)["4"]
    for k, channel in enumerate([0, 3, 7]):
        image, where = got.source[k].item(), tuple(got.position[k].tolist())
        want, _ = explicit_deconvnet(net, images[image : image + 1], 4, channel, where, rule)
        assert want.abs().max() > 0
        assert rel_err(got.images[k], want[0]) < 1e-6  # float32 output


def test_smooth_activations_get_one_clear_warning():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    with pytest.warns(UserWarning, match=r"GELU, SiLU.*ordinary gradient") as caught:
        got = deconvolve(net, torch.randn(2, 3, 16, 16), {"5": [0, 1]})["5"]
    assert len([w for w in caught if "ordinary gradient" in str(w.message)]) == 1
    assert got.images.abs().amax() > 0
    with warnings.catch_warnings():  # ReLU-only nets, and the plain gradient rule, say nothing
        warnings.simplefilter("error")
        deconvolve(zf_shaped(), torch.randn(2, 3, 64, 64), {"4": [0]})
        deconvolve(net, torch.randn(2, 3, 16, 16), {"5": [0]}, rule="gradient")


class Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def test_compiled_models_are_named_and_run_as_written():
    torch.manual_seed(0)
    net = zf_shaped().double()
    images = torch.randn(3, 3, 65, 63, dtype=torch.float64)
    want = deconvolve(net, images, {"2": [0, 1], "7": [3]})
    for compiled, prefix in ((torch.compile(net, backend="eager"), ""), (Wrapper(torch.compile(net)), "net.")):
        got = deconvolve(compiled, images, {f"{prefix}2": [0, 1], f"{prefix}7": [3]})
        for layer in ("2", "7"):
            assert torch.equal(got[prefix + layer].images, want[layer].images)
    with pytest.raises(ValueError, match="Nearest valid names"):
        deconvolve(torch.compile(net), images, {"_orig_mod.2": [0]})


def test_plan_is_reused_on_live_weights_and_knows_when_it_no_longer_fits():
    torch.manual_seed(0)
    net = zf_shaped().double()
    images = torch.randn(3, 3, 65, 63, dtype=torch.float64)
    plan = Projector(net, {"5": [0, 1]}, input_size=images.shape[1:])
    before = plan(images)["5"].images
    with torch.no_grad():
        net[3].weight.mul_(-1)  # training moves the weights: the same plan sees the new ones
    after = plan(images)["5"]
    assert torch.equal(after.images, deconvolve(net, images, {"5": [0, 1]})["5"].images)
    assert not torch.equal(after.images, before)
    assert plan.fits(net, images.shape[1:]) and not plan.fits(net, (3, 64, 64))
    net.append(nn.Conv2d(16, 4, 1))
    assert not plan.fits(net, images.shape[1:])
    with pytest.raises(ValueError, match="made for images of size"):
        plan(torch.randn(2, 3, 64, 64, dtype=torch.float64))


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (("2", [0]), {}, TypeError, "positional"),  # the options are keyword-only
        (("2",), {}, TypeError, "as a mapping"),
        (({"2": [0]}, "map"), {}, TypeError, "positional"),
        (({"2": [0]},), {"crop": "box"}, ValueError, "Unknown crop"),
        (({"2": [0], "5": [99]},), {}, ValueError, "out of range"),
    ],
)
def test_deconvolve_argument_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        deconvolve(zf_shaped(), torch.randn(2, 3, 64, 64), *args, **kwargs)


def test_plain_tails_skip_their_forward_only_where_the_model_runs_them_as_a_chain():
    """ZFNet's conv3..relu5 need no forward pass under the deconvnet rule; a model that puts an op between two
    modules of its Sequential (here a doubling) is projected through the full pass, and still exactly."""
    zfnet = _zfnet().eval()
    plan = Projector(
        zfnet, {f"features.{n}": [0] for n in ("pool1", "pool2", "relu3", "relu4", "pool5")}, input_size=(3, 99, 99)
    )
    tails = {name: layer.tail for name, layer in plan.layers.items()}
    assert tails["features.pool1"] is None  # nothing runs before its stretch: the input itself
    assert tails["features.relu4"].before == "features.norm2"
    assert tails["features.pool5"].before == "features.norm2"  # started at the switch: conv3 .. relu5
    assert tails["features.pool2"].before == "features.norm1"
    for rule in ("guided", "gradient"):  # their backward passes need the forward's masks
        plan = Projector(zfnet, {"features.relu4": [0]}, input_size=(3, 99, 99), rule=rule)
        assert all(layer.tail is None for layer in plan.layers.values())

    class Doubling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 6, 5, stride=2),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(6, 8, 3),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3),
            ).double()

        def forward(self, x):
            x = self.features[:3](x)
            return self.features[3:](2 * x)  # conv2 is not fed the pooling's output

    torch.manual_seed(0)
    model = Doubling()
    images = torch.randn(3, 3, 45, 41, dtype=torch.float64)
    plan = Projector(model, {"features.5": [1, 2]}, input_size=images.shape[1:])
    assert plan.layers["features.5"].tail is None
    got = plan(images)["features.5"]
    for k, channel in enumerate([1, 2]):
        image, where = got.source[k].item(), tuple(got.position[k].tolist())
        want = swapped_relu_projection(model, images[image : image + 1], "features.5", channel, where, "deconvnet")
        assert rel_err(got.images[k], want[0]) < 1e-6


def test_the_survey_is_kept_with_the_model_while_its_structure_stays():
    """A second plan of the same model runs no forward pass to plan (so repeated deconvolve calls do not trace
    again); another input size or a changed structure is surveyed anew, warnings still come every time, and the
    kept survey does not keep the model alive."""
    torch.manual_seed(0)
    net = zf_shaped()
    passes = []
    net[0].register_forward_hook(lambda module, inputs, output: passes.append(len(inputs[0])))
    Projector(net, {"5": [0, 1], "7": [0]}, input_size=(3, 65, 63))
    assert passes
    passes.clear()
    plan = Projector(net, {"5": [2], "7": [1, 3]}, input_size=(3, 65, 63))  # other channels, same question
    assert not passes
    with torch.no_grad():
        net[3].weight.mul_(-1)
    images = torch.randn(3, 3, 65, 63)
    got = plan(images)
    passes.clear()
    Projector(net, {"5": [2], "7": [1, 3]}, input_size=(3, 64, 64))
    assert passes  # another input size is surveyed anew
    net.append(nn.Conv2d(24, 4, 1))
    passes.clear()
    again = Projector(net, {"5": [2], "7": [1, 3]}, input_size=(3, 65, 63))
    assert passes  # a new structure is surveyed anew
    assert torch.equal(again(images)["5"].images, got["5"].images)

    model = HiddenPool().double()
    for _ in range(2):
        with pytest.warns(UserWarning, match="'relu' on whole images"):
            Projector(model, {"relu": [0]}, input_size=(3, 40, 36))
    alive = weakref.ref(net)
    del net, plan, again
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("inplace", [False, True])
def test_cpu_passes_are_cut_to_keep_the_maps_alive_at_once_small(inplace):
    """On CPU the maxima pass runs as many images at once as keep the maps alive at once (a module's input and
    output, one map where it works in place) within CPU_PASS_BYTES (more are page-faulted in afresh on every
    pass), and finds what one pass over all images finds."""
    torch.manual_seed(0)
    relu = nn.ReLU(inplace=inplace)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), relu, nn.MaxPool2d(2), nn.Conv2d(64, 8, 3)).double()
    images = torch.randn(10, 3, 96, 96, dtype=torch.float64)
    conv, pooled = 64 * 96 * 96 * 8, 64 * 48 * 48 * 8  # the first conv's map and the pooled one, float64
    per_image = conv + pooled if inplace else 2 * conv  # the pooling's input and output; the ReLU's
    plan = Projector(net, {"2": [0, 5, 9], "3": [1, 7]}, input_size=images.shape[1:])
    assert plan.images_per_pass(10) == CPU_PASS_BYTES // per_image < 10
    assert plan._survey.grad_bytes == 2 * conv  # the ReLU's backward holds two gradients, in place or not
    assert Projector(net, {"3": [1]}, input_size=images.shape[1:], batch_size=2).images_per_pass(10) == 2
    assert per_pass(10, per_image, "cuda") == 10 and per_pass(10, per_image, "cuda", most=4) == 4
    passes = []
    net[0].register_forward_hook(lambda module, inputs, output: passes.append(len(inputs[0])))
    cut = plan.maxima(images)
    assert sum(passes) == 10 and max(passes) == plan.images_per_pass(10)  # the pass was cut
    whole = find_maxima(net, images, {"2": [0, 5, 9], "3": [1, 7]})
    for name in cut:
        assert torch.equal(cut[name].source, whole[name].source)
        assert torch.equal(cut[name].position, whole[name].position)
        assert torch.allclose(cut[name].value, whole[name].value, rtol=1e-12)
        assert cut[name].switch is None  # the first pooling runs through itself: no switches


@pytest.mark.parametrize("side", [9, 12])
def test_a_tail_goes_down_on_each_units_support_as_on_the_whole_map(side):
    """Tail.down runs each row on its unit's support; the padded transposed filters of the whole maps (with
    the signal rectified between them) give the same, at the borders too."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(5, 7, (3, 1), padding=(1, 0)),
    ).double()
    tail = find_tail(net, "5", at_input=False)
    assert tail is not None and tail.before == "0"
    entry = torch.Size([6, 4, side, side + 1])
    shapes = tail.shapes(entry)
    end = shapes[-1]
    corners = [[0, 0], [end[2] - 1, end[3] - 1], [0, end[3] - 1], [end[2] // 2, end[3] // 2]]
    position = torch.tensor([*corners, [end[2] - 1, 0], [1, 1]])
    channels, value = torch.tensor([0, 6, 3, 2, 5, 1]), torch.rand(6, dtype=torch.float64) + 0.5
    signal = torch.zeros(end, dtype=torch.float64)
    signal[torch.arange(6), channels, position[:, 0], position[:, 1]] = value
    for module, shape in zip(reversed(tail.modules), reversed(shapes[:-1]), strict=True):
        if isinstance(module, nn.ReLU):
            signal = signal.clamp(min=0)
            continue
        grown = F.conv_transpose2d(signal, module.weight, None, module.stride, module.padding, 0, 1, module.dilation)
        extra = [want - got for want, got in zip(shape[-2:], grown.shape[-2:], strict=True)]
        signal = F.pad(grown, (0, extra[1], 0, extra[0]))
    got = tail.down(value, channels, position, entry)
    assert got.shape == entry and torch.allclose(got, signal, rtol=1e-12, atol=1e-12)
    assert signal.abs().sum() > 0


def test_a_pooling_starts_at_its_switches_only_where_that_pays(zf_net, probe):
    """A pooling whose tail goes down from the switch starts there, and so does a deep one (small maps, a window
    that would grow much) under the guided rule; the first one (a large input map, a window that grows little)
    runs through itself: the maxima pass keeps no switches for it, and its projections are still exact."""
    layers = {"2": [0, 3], "5": [1], "12": [2]}
    plan = Projector(zf_net, layers, input_size=probe.shape[1:])
    assert {name: layer.starts_at_switch for name, layer in plan.layers.items()} == {"2": False, "5": True, "12": True}
    assert plan.layers["2"].windows == plan.layers["2"].field  # the pooling output's field
    found = plan.maxima(probe)
    assert found["2"].switch is None and found["5"].switch is not None and found["12"].switch is not None
    guided = Projector(zf_net, layers, input_size=(3, 224, 224), rule="guided")
    assert [layer.starts_at_switch for layer in guided.layers.values()] == [False, False, True]
    with torch.no_grad():
        maps = zf_net[:3](probe.clone())
    projected = plan.project(probe, {"2": found["2"]})["2"]
    for k, channel in enumerate(layers["2"]):
        image, row, col = strongest(maps, channel)
        want, _ = explicit_deconvnet(zf_net, probe[image : image + 1], 2, channel, (row, col), "deconvnet")
        assert rel_err(projected.images[k : k + 1], want) < 1e-6  # projections are float32
