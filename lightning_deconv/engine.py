r"""Projection engine: the deconvnet of Zeiler & Fergus (2014) and its sibling rules, planned once per model.

A deconvnet projects one activation back to pixel space by running the network backwards: at each stage
it *unpools* with the switches recorded by max-pooling, *rectifies* the signal, and *filters* with the
transposed filters of the same convolution. That is backpropagation with one change, at the ReLUs
(:mod:`lightning_deconv.rules`): max-pooling's backward sends the signal to the switch (where overlapping
windows share a switch, their contributions add up) and a convolution's backward is ``conv_transpose2d``
with the same weights, so autograd over the live model computes the paper's chain exactly, on any module
graph.

A :class:`Projector` is the plan for projecting some channels of some layers of one model at one input
size. It is made once and holds everything derived from the model: the layers, their receptive fields, and
the one check (on the model itself) that decides where projecting on receptive-field windows is exact,
which then decides both the windows and the crops. Every caller goes through it: :func:`deconvolve` makes
one per call, :class:`~lightning_deconv.callback.DeconvCallback` keeps one for the whole fit.

Where the speed comes from: one forward finds the maxima of every layer (stopped at the deepest);
each projection runs on the window of its image that holds its receptive field; a max-pooling layer's
maxima start at their switches, whose field is smaller; under the deconvnet rule, plain Conv2d/ReLU
stretches at the top are gone down without their forward pass (:mod:`lightning_deconv.tails`); on CPU the
passes run with the equal, faster ops of :mod:`lightning_deconv.kernels`.

Reference: M. D. Zeiler, R. Fergus, *Visualizing and Understanding Convolutional Networks*, ECCV 2014.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_deconv import kernels
from lightning_deconv.geometry import ReceptiveField, input_field, tracing
from lightning_deconv.layers import bound_forward, check_images, eval_mode, named_layers, run_until, uncompiled
from lightning_deconv.render import crop, support_boxes
from lightning_deconv.rules import RULES, ActivationSurvey, relu_rule
from lightning_deconv.selection import Maxima, check_channels, find_maxima, resolve_features
from lightning_deconv.tails import find_tail, recording_links

__all__ = ["CROPS", "MODES", "RULES", "Projection", "Projector", "deconvolve", "project"]

Rule = Literal["deconvnet", "guided", "gradient"]
Mode = Literal["max", "map"]
Crop = Literal["receptive_field", "support", "none"]
MODES: tuple[str, ...] = ("max", "map")
CROPS: tuple[str, ...] = ("receptive_field", "support", "none")
LayerChannels = Mapping[str | nn.Module, Sequence[int] | Tensor]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Projection:
    """Projections of some activations of one layer, one row per activation.

    Attributes:
        images: ``[K, C, H, W]`` float32, the projections in the input's pixel space.
        source: ``[K]`` index into the probe images of the image holding each activation.
        position: ``[K, 2]`` (row, col) of that activation in the layer's output map.
        value: ``[K]`` the activation's value (the projection is seeded with it).
        channels: ``[K]`` the projected channels.
        layer: the layer's name.
        boxes: ``[K, 4]`` (top, left, bottom, right), end exclusive: the receptive field of each activation
            kept inside the image where it is exact, else the projection's support (or the whole image).
        crops: ``[K, C, h, w]`` the projections cut to ``boxes``.
        patches: ``[K, C, h, w]`` the same boxes cut from the probe images.
    """

    images: Tensor
    source: Tensor
    position: Tensor
    value: Tensor
    channels: Tensor
    layer: str
    boxes: Tensor
    crops: Tensor
    patches: Tensor


def check_rule_and_mode(rule: str, mode: str, crop_to: str = "receptive_field") -> None:
    """Fail clearly on an unknown rule, mode or crop."""
    for value, allowed, label in ((rule, RULES, "rule"), (mode, MODES, "mode"), (crop_to, CROPS, "crop")):
        if value not in allowed:
            raise ValueError(f"Unknown {label} {value!r}; choose one of {allowed}.")


def _working_dtype(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


@contextlib.contextmanager
def _projection_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on (even under ``no_grad``/``inference_mode``), no autocast, and compiled code run
    eagerly (so that hooks and the rule see every op), then everything restored."""
    with (
        eval_mode(model),
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(_device(model).type, enabled=False),
        torch.compiler.set_stance("force_eager"),
    ):
        yield


def _structure(model: nn.Module) -> tuple:
    """What a plan depends on: the modules' names and types and the parameters' shapes."""
    return tuple((name, type(m).__name__) for name, m in model.named_modules()) + tuple(
        (name, tuple(p.shape)) for name, p in model.named_parameters()
    )


class Projector:
    """The plan for projecting tracked channels of some layers of ``model`` at one input size.

    Made once from the model, the layers and their channels, the input size, the rule and the mode; then
    called on images as often as needed, always with the model's live weights (:meth:`fits` tells when the
    model's structure or the input size has changed and a new plan is due).

    At construction it resolves the layers (names as in ``model.named_modules()``; ``torch.compile``'s
    ``_orig_mod.`` is left out), traces each layer's receptive field and checks, with one forward pass of a
    seeded random image and the window forward passes it implies, that projecting on receptive-field windows
    reproduces the whole-image pass. A layer whose field passes is projected on windows and cropped to its
    receptive field; one whose field fails (or cannot be traced, e.g. behind a functional pooling) is
    projected on whole images and cropped to the projection's support, with one warning. It also records which
    activations the model calls: ReLU, LeakyReLU, PReLU and ReLU6 get the rule (see
    :mod:`lightning_deconv.rules`); smooth ones (SiLU, GELU, ...) are passed with their plain gradient, with
    one warning naming them. The same pass records which modules fed which, so that the deconvnet skips the
    forward pass of a plain Conv2d/ReLU stretch (:mod:`lightning_deconv.tails`) only where the model runs it as
    one chain.

    Args:
        model: any ``nn.Module`` (compiled or not) taking images of ``input_size``.
        layers: ``{layer: channels}``, layer a name from ``model.named_modules()`` or the module.
        input_size: ``(C, H, W)`` of the images the plan will be called on.
        rule: ``"deconvnet"`` (Zeiler & Fergus), ``"guided"`` (Springenberg et al.) or ``"gradient"``.
        mode: ``"max"`` projects the single strongest activation (the paper); ``"map"`` the channel's whole
            map in the image holding that maximum.
        crop: cut projections to the activation's ``"receptive_field"`` (where exact, else the support), to
            their ``"support"``, or not at all (``"none"``).
        windows: project on receptive-field windows where exact (``False``: always whole images).
        batch_size: images per forward pass when searching the maxima, rows per projection pass (default:
            all at once).

    Raises:
        ValueError: unknown layer (nearest names listed), empty or out-of-range channels, a layer whose output
            is not 4-D, an input size the model does not accept, unknown rule, mode or crop.

    Example::

        >>> import torchvision
        >>> net = torchvision.models.alexnet(weights=None)
        >>> plan = Projector(net, {"features.2": [0, 5], "features.12": [3]}, input_size=(3, 128, 128))
        >>> found = plan(torch.rand(8, 3, 128, 128))
        >>> found["features.12"].images.shape, found["features.2"].crops.shape
        (torch.Size([1, 3, 128, 128]), torch.Size([2, 3, 19, 19]))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerChannels,
        input_size: Sequence[int],
        rule: Rule = "deconvnet",
        mode: Mode = "max",
        crop: Crop = "receptive_field",
        windows: bool = True,
        batch_size: int | None = None,
    ) -> None:
        check_rule_and_mode(rule, mode, crop)
        if len(input_size) != 3:
            raise ValueError(f"`input_size` must be (C, H, W), got {tuple(input_size)}.")
        if not layers:
            raise ValueError("Give at least one layer to project: {layer: [channels]}.")
        self.model = uncompiled(model)
        self.input_size = tuple(int(s) for s in input_size)
        self.rule, self.mode, self.crop, self.batch_size = rule, mode, crop, batch_size
        self.modules, self.channels = resolve_features(self.model, layers)
        self._structure = _structure(self.model)
        self.fields, self.windows, self.tails = self._check_fields(windows)

    # ------------------------------------------------------------------ plan-time checks
    def _starts_at_switch(self, name: str) -> bool:
        return self.mode == "max" and isinstance(self.modules[name], nn.MaxPool2d)

    def _check_fields(self, windows: bool) -> tuple[dict, dict, dict]:
        """Per layer: its receptive field where windows are exact (else ``None``), the field the windows use (the
        pooling's input field for layers that start at the switch), and its plain tail (:mod:`.tails`) where the
        deconvnet can skip its forward pass (else ``None``).

        One forward pass of a seeded random image traces the fields, keeps each layer's map (its input, where
        projections start at the switch), records the activations the model calls and who fed whom along the
        tails, and checks every layer's map is 4-D; then the image's windows around the first, middle and last
        unit of each map (cut at all four borders there) must give the same activations as the whole image.
        """
        tails = {
            name: find_tail(self.model, name, self._starts_at_switch(name))
            if self.rule == "deconvnet" and self.mode == "max"
            else None
            for name in self.modules
        }
        consumers = {name: self.modules[name] if self._starts_at_switch(name) else None for name in self.modules}
        linked = [m for name, t in tails.items() if t for m in (t.entry, *t.modules, consumers[name]) if m is not None]
        image = torch.randn(1, *self.input_size, generator=torch.Generator().manual_seed(0))
        image = image.to(_device(self.model), _working_dtype(self.model))
        forward = bound_forward(self.model, float32=True)
        fast = kernels.FastCPUOps(image.device)
        image = fast.prepare(image)
        starts = {name: self._starts_at_switch(name) for name in self.modules}
        activations = ActivationSurvey()
        try:
            with _projection_state(self.model), torch.no_grad(), fast, activations:
                with tracing(self.model, image) as tracer, recording_links(linked) as links:

                    def capture(name: str, output: Tensor, layer_input: Tensor) -> tuple:
                        map_ = layer_input if starts[name] else output
                        if not isinstance(map_, Tensor) or map_.dim() != 4:
                            raise ValueError(f"Layer {name!r} takes {type(map_).__name__}, not a 4-D feature map.")
                        check_channels(name, self.channels[name], map_.shape[1])
                        return tracer.field_of(output), map_.detach().clone()  # later in-place ops must not reach it

                    whole = run_until(forward, image, self.modules, capture)
                traced = {name: field for name, (field, _) in whole.items()}
                used = {
                    name: input_field(field, self.modules[name]) if field is not None and starts[name] else field
                    for name, field in traced.items()
                }
                exact = {
                    name: field is not None and self._window_matches(forward, fast, image, name, field, whole[name][1])
                    for name, field in used.items()
                }
        except ValueError as error:
            raise ValueError(f"{error} (input size {self.input_size})") from error
        self._report_activations(activations.rectifiers, activations.smooth)
        inexact = [name for name in traced if not exact[name]]
        if inexact:
            warnings.warn(
                f"Projecting {', '.join(map(repr, inexact))} on whole images and cropping to the projections' "
                "support: the receptive field traced through the model's modules is not exact there (a "
                "functional or unknown resampling on the path). Results stay exact; only slower.",
                stacklevel=3,
            )
        fields = {name: traced[name] if exact[name] else None for name in traced}
        chained = {
            name: t if t is not None and t.ran_as_chain(links, consumers[name]) else None for name, t in tails.items()
        }
        return fields, {name: used[name] if exact[name] and windows else None for name in traced}, chained

    def _window_matches(self, forward, fast, image: Tensor, name: str, field: ReceptiveField, whole: Tensor) -> bool:
        height, width = whole.shape[-2:]
        units = torch.tensor([[0, 0], [height // 2, width // 2], [height - 1, width - 1]])
        module = {name: self.modules[name]}
        boxes = field.windows(units, image.shape[-2:]).tolist()
        for unit, (top, left, bottom, right) in zip(units, boxes, strict=True):
            window = fast.prepare(image[:, :, top:bottom, left:right])
            try:
                (got,) = run_until(forward, window, module, _output_or_input, self._starts_at_switch(name)).values()
            except ValueError:
                return False  # e.g. a window too small for the model
            r, c = (unit - torch.tensor([top, left]) // torch.tensor(field.stride)).tolist()
            want = whole[0, :, unit[0], unit[1]]
            if not (0 <= r < got.shape[-2] and 0 <= c < got.shape[-1]):
                return False
            if (got[0, :, r, c] - want).abs().max() > 1e-4 * want.abs().max().clamp_min(1e-6):
                return False
        return True

    def _report_activations(self, rectifiers: set[str], smooth: set[str]) -> None:
        self.activations = sorted(rectifiers | smooth)
        if smooth and self.rule != "gradient":
            warnings.warn(
                f"The model calls {', '.join(sorted(smooth))} on the way to the tracked layers. The {self.rule} rule "
                "is defined for ReLU-like activations (ReLU, LeakyReLU, PReLU, ReLU6); the signal passes the "
                "others with their ordinary gradient.",
                stacklevel=4,
            )
        others = sorted(rectifiers - {"ReLU"})
        if others and self.rule != "gradient":
            log.info("%s: projected with the %s rule's analogue (see lightning_deconv.rules).", others, self.rule)

    def fits(self, model: nn.Module, input_size: Sequence[int]) -> bool:
        """Whether this plan still fits ``model`` and images of ``input_size`` (same modules and shapes)."""
        return (
            uncompiled(model) is self.model
            and _structure(self.model) == self._structure
            and tuple(input_size) == self.input_size
        )

    def describe(self) -> str:
        """One line per layer: the field, whether it is projected on windows, and the activations' rule."""
        lines = []
        for name, channels in self.channels.items():
            field = self.fields[name]
            where = "whole images, support crops" if self.windows[name] is None else "receptive-field windows"
            size = f"field {field.size[0]}x{field.size[1]}" if field is not None else "field unknown"
            lines.append(f"{name}: {len(channels)} features, {size}, {where}")
        rule = f"rule {self.rule} at {', '.join(self.activations) or 'no activation'}"
        return "; ".join(lines) + f"; {rule}"

    # ------------------------------------------------------------------ running the plan
    def __call__(self, images: Tensor, state: Mapping[str, Tensor] | None = None) -> dict[str, Projection]:
        """Find each tracked channel's strongest activation over ``images`` and project it: one maxima pass for
        every layer, then each layer's projections. Returns ``{layer: Projection}`` in the plan's order."""
        return self.project(images, self.maxima(images, state), state)

    def maxima(
        self, images: Tensor, state: Mapping[str, Tensor] | None = None, summaries: bool = False
    ) -> dict[str, Maxima]:
        """Each tracked channel's strongest activation over ``images`` (one forward, all layers); with
        ``summaries``, also each layer's channel peaks and Gram matrix (see :func:`find_maxima`)."""
        self._check_images(images)
        with eval_mode(self.model), torch.compiler.set_stance("force_eager"):
            return find_maxima(self.model, images, self.channels, self.batch_size, state, summaries)

    def project(
        self, images: Tensor, maxima: Mapping[str, Maxima], state: Mapping[str, Tensor] | None = None
    ) -> dict[str, Projection]:
        """Project given maxima (rows may repeat channels) of some of the plan's layers.

        ``state`` replaces some of the model's tensors by name for this call (e.g. rank 0's BatchNorm
        statistics under DDP). Row ``k`` of layer ``l`` projects ``images[maxima[l].source[k]]``'s activation at
        ``maxima[l].position[k]`` of channel ``maxima[l].channels[k]``, every other activation of the layer
        zeroed.
        """
        self._check_images(images)
        unknown = [name for name in maxima if name not in self.modules]
        if unknown:
            raise ValueError(f"Layers {unknown} are not in this plan; it has {list(self.modules)}.")
        return {name: self.finish(name, self._project_rows(images, name, found, state), found, images)
                for name, found in maxima.items()}  # fmt: skip

    def finish(self, layer: str, projected: Tensor, maxima: Maxima, images: Tensor) -> Projection:
        """The :class:`Projection` of rows already projected: boxes, crops and probe patches added."""
        projected = projected.cpu()
        field = self.fields[layer]
        size = tuple(projected.shape[-2:])
        if self.crop == "receptive_field" and field is not None:
            boxes = field.boxes(maxima.position, within=size)
        elif self.crop != "none":
            boxes = support_boxes(projected)
        else:
            boxes = torch.tensor([[0, 0, *size]]).expand(len(projected), -1)
        return Projection(
            images=projected,
            source=maxima.source,
            position=maxima.position,
            value=maxima.value,
            channels=maxima.channels,
            layer=layer,
            boxes=boxes,
            crops=crop(projected, boxes),
            patches=crop(images.detach().cpu(), boxes, sources=maxima.source),
        )

    def _check_images(self, images: Tensor) -> None:
        check_images(self.model, images)
        if tuple(images.shape[1:]) != self.input_size:
            raise ValueError(
                f"This plan was made for images of size {self.input_size}, got {tuple(images.shape[1:])}. "
                "Make a new Projector for the new size."
            )

    def _project_rows(self, images: Tensor, layer: str, maxima: Maxima, state: Mapping[str, Tensor] | None) -> Tensor:
        """``[K, C, H, W]`` projections of the rows of ``maxima``, on windows where the plan allows."""
        module = {layer: self.modules[layer]}
        device = _device(self.model)
        k = len(maxima.channels)
        height, width = images.shape[-2:]
        field = self.windows[layer] if self.mode == "max" else None
        position, at_input = maxima.position, False
        if self._starts_at_switch(layer):
            if maxima.switch is None:
                field = None  # without the switches the pooling's input cannot be seeded: whole images
            else:
                # Unpooling sends the seed to its switch and nowhere else, so the projection starts there.
                position, at_input = maxima.switch, True
        if field is not None:
            boxes = field.windows(position, (height, width))
        else:
            boxes = torch.tensor([[0, 0, height, width]]).expand(k, -1)
        with _projection_state(self.model):
            forward = bound_forward(self.model, state, float32=True)
            fast = kernels.FastCPUOps(device)  # one for all batches: it lays the filters out once
            out = torch.zeros(k, images.shape[1], height, width, device=device)
            for rows in _batches(boxes, self.batch_size or k):
                box = boxes[rows]
                x = crop(images.detach(), box, sources=maxima.source[rows]).to(device, _working_dtype(self.model))
                x = fast.prepare(x).requires_grad_(True)
                seed_at = position[rows] - box[:, :2] // torch.tensor(field.stride) if field else position[rows]
                tail = self.tails[layer]
                with fast, relu_rule(self.rule):
                    stop = module if tail is None else {tail.before: named_layers(self.model)[tail.before]}
                    (activation,) = run_until(forward, x, stop, _output_or_input, at_input and tail is None).values()
                if tail is None:
                    seed = _seed(activation, maxima.channels[rows], seed_at, self.mode)
                else:  # no forward past the stretch: the seed is the maximum's value, sent down by hand
                    end = torch.zeros(tail.shapes(activation.shape)[-1], dtype=activation.dtype, device=device)
                    end[torch.arange(len(rows)), maxima.channels[rows], seed_at[:, 0], seed_at[:, 1]] = maxima.value[
                        rows
                    ].to(end)
                    seed = tail.down(end, activation.shape)
                (grad,) = torch.autograd.grad(activation, x, grad_outputs=seed)
                for row, (top, left, bottom, right), window in zip(rows.tolist(), box.tolist(), grad, strict=True):
                    out[row, :, top:bottom, left:right] = window.detach()
        return out


def _output_or_input(name: str, activation: Tensor, layer_input: object) -> Tensor:
    return activation


def _batches(boxes: Tensor, size: int) -> list[Tensor]:
    """Row indices grouped by window shape (rows of one shape run as one batch), at most ``size`` a batch."""
    shapes = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1)
    groups = [torch.nonzero((shapes == shape).all(dim=1)).flatten() for shape in shapes.unique(dim=0)]
    return [chunk for group in groups for chunk in group.split(size)]


def _seed(activation: Tensor, channels: Tensor, position: Tensor, mode: str) -> Tensor:
    """The backward signal: one activation (or one channel's map) per row, everything else zero."""
    rows = torch.arange(len(channels), device=activation.device)
    channels = channels.to(activation.device)
    seed = torch.zeros_like(activation)
    if mode == "max":
        r, c = position[:, 0].to(activation.device), position[:, 1].to(activation.device)
        seed[rows, channels, r, c] = activation.detach()[rows, channels, r, c]
    else:
        seed[rows, channels] = activation.detach()[rows, channels]
    return seed


def deconvolve(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module | LayerChannels,
    channels: Sequence[int] | Tensor | None = None,
    mode: Mode = "max",
    rule: Rule = "deconvnet",
    batch_size: int | None = None,
    crop: Crop = "receptive_field",
) -> Projection | dict[str, Projection]:
    """Project each channel's strongest activation over ``images`` back to pixel space.

    For each channel, find its strongest activation over all images and positions, zero every other
    activation of the layer, and project it down to the input with ``rule`` (Zeiler & Fergus 2014). The
    projection is seeded with the activation's value, so projections are comparable in scale. The model runs
    in eval mode with its live weights; afterwards its parameters, ``.grad``\\ s, flags, train/eval modes,
    buffers, hooks and the global RNG are exactly as before. A thin wrapper over :class:`Projector`, so it
    takes the fast path (one maxima pass for all layers, receptive-field windows) wherever that is exact.

    Args:
        model: any ``nn.Module`` taking ``images``; its ReLUs may be modules or functional calls.
        images: ``[N, C, H, W]`` probe images, as the model expects them (normalised).
        layer: a name from ``model.named_modules()`` or the module (then give ``channels``), or a mapping
            ``{layer: channels}`` to project several layers at once (then a dict is returned).
        channels: the channels of ``layer`` to project.
        mode: ``"max"`` projects the single strongest activation (the paper); ``"map"`` projects the
            channel's whole feature map in the image holding that maximum.
        rule: ``"deconvnet"`` (Zeiler & Fergus), ``"guided"`` (Springenberg et al.) or ``"gradient"``.
        batch_size: images per forward pass (default: all at once).
        crop: how :attr:`Projection.crops` are cut (see :class:`Projector`).

    Returns:
        A :class:`Projection` (``images [K, C, H, W]``, ``source [K]``, ``position [K, 2]``, ``value [K]``,
        boxes, crops and patches) in the order of ``channels``; with a mapping, ``{layer: Projection}``.

    Raises:
        ValueError: unknown layer (nearest names listed), empty or out-of-range channels, images that are
            not 4-D or do not fit the model, a layer whose output is not 4-D, unknown mode, rule or crop.
        TypeError: ``channels`` missing for a single layer, or given with a mapping.

    Example::

        >>> import torchvision
        >>> net = torchvision.models.alexnet(weights=None)
        >>> p = deconvolve(net, torch.rand(4, 3, 96, 96), layer="features.3", channels=[0, 5, 9])
        >>> p.images.shape, p.source.shape, p.position.shape
        (torch.Size([3, 3, 96, 96]), torch.Size([3]), torch.Size([3, 2]))
        >>> both = deconvolve(net, torch.rand(4, 3, 96, 96), {"features.3": [0], "features.10": [1, 2]})
        >>> sorted(both), both["features.10"].channels.tolist()
        (['features.10', 'features.3'], [1, 2])
    """
    many = isinstance(layer, Mapping)
    if many and channels is not None:
        raise TypeError("Give either `layer` and `channels`, or one mapping {layer: channels}, not both.")
    if not many and channels is None:
        raise TypeError("Give the `channels` of `layer` to project (or one mapping {layer: channels}).")
    check_rule_and_mode(rule, mode, crop)  # before the geometry trace and the maxima pass
    check_images(model, images)
    layers = layer if many else {layer: channels}
    found = Projector(model, layers, images.shape[1:], rule, mode, crop, batch_size=batch_size)(images)
    return found if many else next(iter(found.values()))


def project(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module,
    maxima: Maxima,
    mode: Mode = "max",
    rule: Rule = "deconvnet",
    batch_size: int | None = None,
    state: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Project known maxima of one layer back to pixel space (the second half of :func:`deconvolve`).

    Row ``k`` projects ``images[maxima.source[k]]``'s activation at ``maxima.position[k]`` of channel
    ``maxima.channels[k]`` (``mode="max"``) or that channel's whole map (``mode="map"``), every other
    activation of the layer zeroed, on the fast path wherever it is exact. To project repeatedly, keep a
    :class:`Projector` instead: this makes one per call.

    Returns:
        ``[K, C, H, W]`` float32 projections.
    """
    plan = Projector(model, {layer: maxima.channels}, images.shape[1:], rule, mode, "none", batch_size=batch_size)
    (name,) = plan.modules
    return plan.project(images, {name: maxima}, state)[name].images
