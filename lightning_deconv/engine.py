r"""Projection engine: the deconvnet of Zeiler & Fergus (2014) and its sibling rules, planned once per model.

A :class:`Projector` is the plan for projecting some channels of some layers of one model at one input
size. It is made once and holds everything derived from the model, one :class:`~lightning_deconv.plan.LayerPlan`
per layer: the module, its receptive field, and the one check (on the model itself) that decides where
projecting on receptive-field windows is exact, which then decides both the windows and the crops. Every
caller goes through it: :func:`deconvolve` makes one per call, :class:`~lightning_deconv.callback.DeconvCallback`
keeps one for the whole fit. What a plan learns by running the model (:class:`~lightning_deconv.plan.Survey`) is
kept with the model while its structure stays the same, so a second call on the same model does not trace again.

Where the speed comes from: one forward finds the maxima of every layer (stopped at the deepest,
:mod:`lightning_deconv.maxima`; where the deepest ends a channel-wise chain from a convolution, that
convolution computes only the tracked channels, :mod:`lightning_deconv.narrowing`); each projection runs on
the window of its image that holds its receptive field; a max-pooling layer's maxima start at their switches,
whose field is smaller, where that pays for keeping the switches; under the deconvnet rule, plain Conv2d/ReLU
stretches at the top are gone down without their forward pass (:mod:`lightning_deconv.tails`); on CPU the
passes run with the equal, faster ops of :mod:`lightning_deconv.kernels` (:mod:`lightning_deconv.projection`).

Reference: M. D. Zeiler, R. Fergus, *Visualizing and Understanding Convolutional Networks*, ECCV 2014.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_deconv.kernels import FastCPUOps, per_pass
from lightning_deconv.layers import (
    bound_forward,
    check_images,
    model_device,
    named_layers,
    projection_state,
    uncompiled,
)
from lightning_deconv.maxima import TopK, scan
from lightning_deconv.plan import Crop, LayerPlan, Mode, Rule, plan_layers, structure
from lightning_deconv.projection import Projection, project_rows
from lightning_deconv.rules import RULES
from lightning_deconv.selection import resolve_features

__all__ = ["CROPS", "MODES", "RULES", "Projection", "Projector", "check_rule_and_mode", "deconvolve", "project"]

MODES: tuple[str, ...] = ("max", "map")
CROPS: tuple[str, ...] = ("receptive_field", "support", "none")
LayerChannels = Mapping[str | nn.Module, Sequence[int] | Tensor]


def check_rule_and_mode(rule: str, mode: str, crop_to: str = "receptive_field") -> None:
    """Fail clearly on an unknown rule, mode or crop."""
    for value, allowed, label in ((rule, RULES, "rule"), (mode, MODES, "mode"), (crop_to, CROPS, "crop")):
        if value not in allowed:
            raise ValueError(f"Unknown {label} {value!r}; choose one of {allowed}.")


class Projector:
    """The plan for projecting tracked channels of some layers of ``model`` at one input size.

    Made once from the model, the layers and their channels, the input size, the rule and the mode; then
    called on images as often as needed, always with the model's live weights (:meth:`fits` tells when the
    model's structure or the input size has changed and a new plan is due).

    At construction it resolves the layers (names as in ``model.named_modules()``; ``torch.compile``'s
    ``_orig_mod.`` is left out), traces each layer's receptive field and checks, with one forward pass of a
    seeded random image and the window forward passes it implies, that projecting on receptive-field windows
    reproduces the whole-image pass (once per model, structure and input size: see
    :func:`~lightning_deconv.plan.survey`). A layer whose field passes is projected on windows and cropped to its
    receptive field; one whose field fails (or cannot be traced, e.g. behind a functional pooling) is
    projected on whole images and cropped to the projection's support, with one warning. It also records which
    activations the model calls: ReLU, LeakyReLU, PReLU and ReLU6 get the rule (see
    :mod:`lightning_deconv.rules`); smooth ones (SiLU, GELU, ...) are passed with their plain gradient, with
    one warning naming them. The same pass records which modules fed which, so that the deconvnet skips the
    forward pass of a plain Conv2d/ReLU stretch (:mod:`lightning_deconv.tails`) only where the model runs it as
    one chain. What it derived is :attr:`layers`, one frozen :class:`~lightning_deconv.plan.LayerPlan` per layer.

    Args:
        model: any ``nn.Module`` (compiled or not) taking images of ``input_size``.
        layers: ``{layer: channels}``, layer a name from ``model.named_modules()`` or the module.
        input_size: ``(C, H, W)`` of the images the plan will be called on (keyword-only, as every option).
        rule: ``"deconvnet"`` (Zeiler & Fergus), ``"guided"`` (Springenberg et al.) or ``"gradient"``.
        mode: ``"max"`` projects the single strongest activation (the paper); ``"map"`` the channel's whole
            map in the image holding that maximum.
        crop: cut projections to the activation's ``"receptive_field"`` (where exact, else the support), to
            their ``"support"``, or not at all (``"none"``).
        windows: project on receptive-field windows where exact (``False``: always whole images).
        batch_size: at most this many images per forward pass when searching the maxima, and rows per
            projection pass (default: all at once on GPU; on CPU, passes are cut smaller where the maps they
            hold would pass :data:`~lightning_deconv.kernels.CPU_PASS_BYTES`; see :meth:`images_per_pass`).

    Raises:
        ValueError: unknown layer (nearest names listed), empty or out-of-range channels, a layer whose output
            is not 4-D, an input size the model does not accept, unknown rule, mode or crop.

    Example::

        >>> import torch, torchvision
        >>> net = torchvision.models.alexnet(weights=None)
        >>> plan = Projector(net, {"features.2": [0, 5], "features.12": [3]}, input_size=(3, 128, 128))
        >>> plan.layers["features.12"].windows is not None
        True
        >>> found = plan(torch.rand(8, 3, 128, 128))
        >>> found["features.12"].images.shape, found["features.2"].crops.shape
        (torch.Size([1, 3, 128, 128]), torch.Size([2, 3, 19, 19]))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerChannels,
        *,
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
        modules, channels = resolve_features(self.model, layers)
        self.layers: dict[str, LayerPlan]
        self.layers, self.activations, self._survey = plan_layers(
            self.model, modules, channels, self.input_size, rule=rule, mode=mode, crop=crop, windows=windows
        )
        self._narrowed = self._narrowing()
        self._switches = [name for name, layer in self.layers.items() if layer.starts_at_switch]

    def _narrowing(self) -> tuple[nn.Conv2d, Tensor] | None:
        """The convolution the maxima pass computes only some output channels of, and those channels: the tracked
        ones of the layers it feeds (:mod:`lightning_deconv.narrowing`); ``None`` where it computes them all."""
        if self._survey.narrowable is None:
            return None
        name, fed = self._survey.narrowable
        conv = named_layers(self.model)[name]
        channels = torch.cat([self.layers[layer].channels for layer in fed]).unique()
        return (conv, channels) if len(channels) < conv.out_channels else None

    def fits(self, model: nn.Module, input_size: Sequence[int]) -> bool:
        """Whether this plan still fits ``model`` and images of ``input_size`` (same modules and shapes)."""
        return (
            uncompiled(model) is self.model
            and structure(self.model) == self._survey.structure
            and tuple(input_size) == self.input_size
        )

    def describe(self) -> str:
        """One line per layer: the field, whether it is projected on windows, and the activations' rule."""
        lines = []
        for name, layer in self.layers.items():
            where = "whole images, support crops" if layer.windows is None else "receptive-field windows"
            field = layer.field
            size = f"field {field.size[0]}x{field.size[1]}" if field is not None else "field unknown"
            lines.append(f"{name}: {len(layer.channels)} features, {size}, {where}")
        rule = f"rule {self.rule} at {', '.join(self.activations) or 'no activation'}"
        return "; ".join(lines) + f"; {rule}"

    def __call__(self, images: Tensor, state: Mapping[str, Tensor] | None = None) -> dict[str, Projection]:
        """Find each tracked channel's strongest activation over ``images`` and project it: one maxima pass for
        every layer, then each layer's projections. Returns ``{layer: Projection}`` in the plan's order."""
        ops = self.ops()  # one for both halves: each filter is laid out once
        return self.project(images, self.maxima(images, state, ops=ops), state, ops=ops)

    def ops(self) -> FastCPUOps:
        """The CPU ops the passes run with (:class:`~lightning_deconv.kernels.FastCPUOps`). Give one to
        :meth:`maxima` and :meth:`project` of the same firing, so that each filter is laid out once for both; not
        across firings, whose weights differ."""
        return FastCPUOps(model_device(self.model))

    def maxima(
        self,
        images: Tensor,
        state: Mapping[str, Tensor] | None = None,
        summaries: bool = False,
        *,
        ops: FastCPUOps | None = None,
    ) -> dict[str, TopK]:
        """Each tracked channel's strongest activation over ``images`` (one forward, all layers), with the switches
        of the layers whose projections start at them (:attr:`LayerPlan.starts_at_switch
        <lightning_deconv.plan.LayerPlan>`); with ``summaries``, also each layer's channel peaks and Gram matrix
        (see :func:`~lightning_deconv.maxima.find_maxima`); ``ops`` as :meth:`ops` gives them (default: its own)."""
        self._check_images(images)
        channels = {name: layer.channels for name, layer in self.layers.items()}
        batches = images.split(self.images_per_pass(len(images)))
        fast = ops or self.ops()
        # Summaries need every channel of each layer; the rest only the tracked ones.
        with fast.narrowed(None if summaries else self._narrowed):
            return scan(
                self.model, batches, channels, 1, state=state, summaries=summaries, ops=fast, switches=self._switches
            )

    def images_per_pass(self, count: int) -> int:
        """How many of ``count`` images one forward pass of :meth:`maxima` takes: at most ``batch_size``, and on
        CPU as many as keep the maps alive at once (a module's input and output) within
        :data:`~lightning_deconv.kernels.CPU_PASS_BYTES` (larger ones are page-faulted in afresh on every pass)."""
        return per_pass(count, self._survey.pass_bytes, model_device(self.model), self.batch_size)

    def project(
        self,
        images: Tensor,
        found: Mapping[str, TopK],
        state: Mapping[str, Tensor] | None = None,
        *,
        ops: FastCPUOps | None = None,
    ) -> dict[str, Projection]:
        """Project given strongest activations (any ``k``; rows may repeat channels) of some of the plan's layers.

        ``state`` replaces some of the model's tensors by name for this call (e.g. rank 0's BatchNorm
        statistics under DDP). Row ``f * k + j`` of layer ``l`` projects ``images[found[l].source[f, j]]``'s
        activation at ``found[l].position[f, j]`` of channel ``found[l].channels[f]``, every other activation
        of the layer zeroed. ``ops`` as :meth:`ops` gives them (default: its own).
        """
        self._check_images(images)
        unknown = [name for name in found if name not in self.layers]
        if unknown:
            raise ValueError(f"Layers {unknown} are not in this plan; it has {list(self.layers)}.")
        device = model_device(self.model)
        fast = ops or self.ops()  # one for every layer: each filter is laid out once
        projections = {}
        with projection_state(self.model):
            forward = bound_forward(self.model, state, float32=True)
            for name, top in found.items():
                layer = self.layers[name]
                rows = per_pass(top.source.numel(), self._window_bytes(layer), device, self.batch_size)
                projected = project_rows(
                    self.model,
                    layer,
                    images,
                    top,
                    rule=self.rule,
                    mode=self.mode,
                    forward=forward,
                    fast=fast,
                    batch_size=rows,
                )
                projections[name] = Projection.assemble(layer, projected, top, images)
        return projections

    def _window_bytes(self, layer: LayerPlan) -> int:
        """The bytes of maps one row holds at most in ``layer``'s projection passes: the maps the forward keeps for
        the backward and the gradients the backward holds at once, the image's scaled to its window. (A pass that
        needs more than the heap freed by the maxima pass grows it, and glibc gives the growth back when it is freed:
        every call then page-faults it in afresh.)"""
        image = self._survey.kept_bytes + self._survey.grad_bytes
        if layer.windows is None:
            return image
        height, width = self.input_size[1:]
        top, left, bottom, right = layer.windows.windows(torch.zeros(1, 2), (height, width))[0].tolist()
        return image * (bottom - top) * (right - left) // (height * width)

    def _check_images(self, images: Tensor) -> None:
        check_images(self.model, images)
        if tuple(images.shape[1:]) != self.input_size:
            raise ValueError(
                f"This plan was made for images of size {self.input_size}, got {tuple(images.shape[1:])}. "
                "Make a new Projector for the new size."
            )


def deconvolve(
    model: nn.Module,
    images: Tensor,
    layers: LayerChannels,
    *,
    mode: Mode = "max",
    rule: Rule = "deconvnet",
    crop: Crop = "receptive_field",
    batch_size: int | None = None,
) -> dict[str, Projection]:
    """Project each listed channel's strongest activation over ``images`` back to pixel space.

    For each channel, find its strongest activation over all images and positions, zero every other
    activation of the layer, and project it down to the input with ``rule`` (Zeiler & Fergus 2014). The
    projection is seeded with the activation's value, so projections are comparable in scale. The model runs
    in eval mode with its live weights; afterwards its parameters, ``.grad``\\ s, flags, train/eval modes,
    buffers, hooks and the global RNG are exactly as before. A thin wrapper over :class:`Projector`, so it
    takes the fast path (one maxima pass for all layers, receptive-field windows) wherever that is exact.

    Args:
        model: any ``nn.Module`` taking ``images``; its ReLUs may be modules or functional calls.
        images: ``[N, C, H, W]`` probe images, as the model expects them (normalised).
        layers: ``{layer: channels}``, each layer a name from ``model.named_modules()`` or the module.
        mode: ``"max"`` projects the single strongest activation (the paper); ``"map"`` projects the
            channel's whole feature map in the image holding that maximum.
        rule: ``"deconvnet"`` (Zeiler & Fergus), ``"guided"`` (Springenberg et al.) or ``"gradient"``.
        crop: how :attr:`Projection.crops` are cut (see :class:`Projector`).
        batch_size: at most this many images per forward pass (default: all at once; see :class:`Projector`).

    Returns:
        ``{layer name: Projection}`` in the order of ``layers``, each (``images [K, C, H, W]``, ``source [K]``,
        ``position [K, 2]``, ``value [K]``, boxes, crops and patches) in the order of its channels.

    Raises:
        ValueError: unknown layer (nearest names listed), empty or out-of-range channels, images that are
            not 4-D or do not fit the model, a layer whose output is not 4-D, unknown mode, rule or crop.

    Example::

        >>> import torch, torchvision
        >>> net = torchvision.models.alexnet(weights=None)
        >>> p = deconvolve(net, torch.rand(4, 3, 96, 96), {"features.3": [0, 5, 9]})["features.3"]
        >>> p.images.shape, p.source.shape, p.position.shape
        (torch.Size([3, 3, 96, 96]), torch.Size([3]), torch.Size([3, 2]))
        >>> both = deconvolve(net, torch.rand(4, 3, 96, 96), {"features.3": [0], "features.10": [1, 2]})
        >>> sorted(both), both["features.10"].channels.tolist()
        (['features.10', 'features.3'], [1, 2])
    """
    check_rule_and_mode(rule, mode, crop)  # before the geometry trace and the maxima pass
    check_images(model, images)
    if not isinstance(layers, Mapping):
        raise TypeError(f"Give the layers as a mapping {{layer: channels}}, got {type(layers).__name__}.")
    plan = Projector(model, layers, input_size=images.shape[1:], rule=rule, mode=mode, crop=crop, batch_size=batch_size)
    return plan(images)


def project(
    model: nn.Module,
    images: Tensor,
    found: Mapping[str | nn.Module, TopK],
    *,
    mode: Mode = "max",
    rule: Rule = "deconvnet",
    crop: Crop = "receptive_field",
    batch_size: int | None = None,
    state: Mapping[str, Tensor] | None = None,
) -> dict[str, Projection]:
    """Project known strongest activations (the second half of :func:`deconvolve`).

    Row ``f * k + j`` of layer ``l`` projects ``images[found[l].source[f, j]]``'s activation at
    ``found[l].position[f, j]`` of channel ``found[l].channels[f]`` (``mode="max"``) or that channel's whole
    map (``mode="map"``), every other activation of the layer zeroed, on the fast path wherever it is exact.
    To project repeatedly, keep a :class:`Projector` instead: this makes one per call.

    Args:
        model: the model ``found`` was searched in.
        images: ``[N, C, H, W]`` the images ``found[l].source`` indexes.
        found: ``{layer: TopK}``, e.g. from :func:`~lightning_deconv.maxima.find_maxima`.
        mode, rule, crop, batch_size: as for :func:`deconvolve`.
        state: tensors used instead of the model's own, by name.

    Returns:
        ``{layer name: Projection}`` with ``F * k`` rows per layer.

    Example::

        >>> import torch
        >>> from lightning_deconv import find_maxima
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
        >>> images = torch.rand(4, 3, 16, 16)
        >>> found = find_maxima(net, images, {"2": [0, 5]})
        >>> project(net, images, found)["2"].images.shape
        torch.Size([2, 3, 16, 16])
    """
    layers = {layer: top.channels for layer, top in found.items()}
    plan = Projector(model, layers, input_size=images.shape[1:], rule=rule, mode=mode, crop=crop, batch_size=batch_size)
    return plan.project(images, dict(zip(plan.layers, found.values(), strict=True)), state)
