r"""Projection engine: the deconvnet of Zeiler & Fergus (2014) and its sibling rules.

A deconvnet projects one activation back to pixel space by running the network backwards: at each stage
it *unpools* with the switches recorded by max-pooling, *rectifies* the signal, and *filters* with the
transposed filters of the same convolution. That is backpropagation with a single change, in the
backward pass of every ReLU :math:`y = \max(x, 0)`, where :math:`R` is the signal coming down:

.. math::

    \text{deconvnet (Zeiler \& Fergus 2014):}\quad R_x = \max(R_y, 0)

    \text{guided backprop (Springenberg et al. 2014):}\quad R_x = \max(R_y, 0)\,[x > 0]

    \text{gradient (Simonyan et al. 2013):}\quad R_x = R_y\,[x > 0]

Max-pooling's backward sends the signal to the switch (where overlapping windows share a switch, their
contributions add up) and a convolution's backward is ``conv_transpose2d`` with the same weights, so
autograd over the live model computes the paper's chain exactly, on any module graph. The ReLU rule is
swapped in with a ``TorchFunctionMode`` for the projection pass only, which catches ``nn.ReLU`` (in-place
or not) and ReLUs called functionally in ``forward`` (``F.relu``, ``torch.relu``, ``x.relu()``,
``relu_``) alike, and never touches the model.

For speed, :func:`project` runs each maximum on the window of its image that holds its receptive field,
starts a max-pooling layer's maxima at their switches, and on CPU runs the pass with the equal, faster ops
of :mod:`lightning_deconv.kernels`.

Reference: M. D. Zeiler, R. Fergus, *Visualizing and Understanding Convolutional Networks*, ECCV 2014.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_deconv import kernels
from lightning_deconv.geometry import ReceptiveField, input_field
from lightning_deconv.layers import bound_forward, eval_mode, layer_name, resolve_layers, run_until
from lightning_deconv.render import crop
from lightning_deconv.selection import Maxima, find_maxima

__all__ = ["RULES", "Projection", "deconvolve", "project"]

Rule = Literal["deconvnet", "guided", "gradient"]
Mode = Literal["max", "map"]
RULES: tuple[str, ...] = ("deconvnet", "guided", "gradient")
MODES: tuple[str, ...] = ("max", "map")


@dataclass(frozen=True)
class Projection:
    """Projections of the strongest activation of some channels of one layer.

    Attributes:
        images: ``[K, C, H, W]`` float32, the projections in the input's pixel space.
        source: ``[K]`` index into the probe images of the image holding each channel's maximum.
        position: ``[K, 2]`` (row, col) of that activation in the layer's output map.
        value: ``[K]`` the activation's value.
        channels: ``[K]`` the projected channels.
        layer: the layer's name in ``model.named_modules()``.
    """

    images: Tensor
    source: Tensor
    position: Tensor
    value: Tensor
    channels: Tensor
    layer: str


class _RectifyingReLU(torch.autograd.Function):
    """ReLU forward; the deconvnet or guided-backprop rule backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, guided: bool, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = x.clamp_(min=0)
        else:
            out = x.clamp(min=0)
        ctx.guided = guided
        if guided:
            ctx.save_for_backward(out > 0)
        return out

    @staticmethod
    def backward(ctx: Any, signal: Tensor) -> tuple[Tensor, None, None]:
        rectified = signal.clamp(min=0)
        if ctx.guided:
            (active,) = ctx.saved_tensors
            rectified = rectified * active
        return rectified, None, None


_INPLACE_RELUS = {torch.relu_, torch.Tensor.relu_}
_RELUS = {F.relu, torch.relu, torch.Tensor.relu, *_INPLACE_RELUS}


class _ReLURule(TorchFunctionMode):
    """Routes every ReLU call made while active through ``_RectifyingReLU``."""

    def __init__(self, guided: bool) -> None:
        super().__init__()
        self.guided = guided

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            inplace_arg = kwargs.get("inplace", args[1] if len(args) > 1 else False)
            inplace = func in _INPLACE_RELUS or bool(inplace_arg)
            return _RectifyingReLU.apply(args[0], self.guided, inplace)
        return func(*args, **kwargs)


def _relu_rule(rule: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if rule == "gradient" else _ReLURule(guided=rule == "guided")


@contextlib.contextmanager
def _projection_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on (even under ``no_grad``/``inference_mode``) and no autocast, then restore."""
    device_type = next(model.parameters(), torch.empty(0)).device.type
    with (
        eval_mode(model),
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(device_type, enabled=False),
    ):
        yield


def _check_rule_and_mode(rule: str, mode: str) -> None:
    if rule not in RULES:
        raise ValueError(f"Unknown rule {rule!r}; choose one of {RULES}.")
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {MODES}.")


def _working_dtype(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32


def project(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module,
    maxima: Maxima,
    mode: Mode = "max",
    rule: Rule = "deconvnet",
    batch_size: int | None = None,
    state: Mapping[str, Tensor] | None = None,
    field: ReceptiveField | None = None,
) -> Tensor:
    """Project known maxima of one layer back to pixel space (the second half of :func:`deconvolve`).

    Row ``k`` of the batch is ``images[maxima.source[k]]``; its seed is the activation at
    ``maxima.position[k]`` of channel ``maxima.channels[k]`` (``mode="max"``) or that channel's whole map
    (``mode="map"``), every other activation of the layer zeroed. One forward (stopped at ``layer``) and one
    backward per batch of ``batch_size`` rows (default: all ``K``). ``state`` replaces some of the model's
    tensors by name for this call (see :func:`~lightning_deconv.layers.bound_forward`).

    With the layer's ``field`` (``mode="max"`` only), each row runs on the window of its image that holds
    the activation's receptive field (:meth:`ReceptiveField.windows`) instead of the whole image: the same
    result, for a fraction of the work; rows whose windows have one shape (all but those cut by a border)
    still run as one batch. For a max-pooling layer whose ``maxima`` carry their switches (as
    :func:`find_maxima` records them), rows start at the switch in the pooling's input, whose window is
    smaller. Only pass a field that is exact for this model (module-based convolution and pooling);
    :func:`receptive_field` derives it.

    Returns:
        ``[K, C, H, W]`` float32 projections.
    """
    _check_rule_and_mode(rule, mode)
    modules = resolve_layers(model, [layer])
    device = next(model.parameters(), images).device
    k = len(maxima.channels)
    height, width = images.shape[-2:]
    windowed = field is not None and mode == "max"
    position, at_input = maxima.position, False
    if windowed and maxima.switch is not None:
        # Unpooling sends the seed to its switch and nowhere else, so the projection can start there, at the
        # pooling's input, whose smaller field makes a smaller window.
        (pool,) = modules.values()
        field, position, at_input = input_field(field, pool), maxima.switch, True
    boxes = (
        field.windows(position, (height, width)) if windowed else torch.tensor([[0, 0, height, width]]).expand(k, -1)
    )
    with _projection_state(model):
        forward = bound_forward(model, state, float32=True)
        fast = kernels.FastCPUOps(device)  # one for all batches: it lays the filters out once
        out = torch.zeros(k, images.shape[1], height, width, device=device)  # a normal tensor, even here
        for rows in _batches(boxes, batch_size or k):
            box = boxes[rows]
            x = crop(images.detach(), box, sources=maxima.source[rows]).to(device, _working_dtype(model))
            x = fast.prepare(x).requires_grad_(True)
            seed_at = position[rows] - box[:, :2] // torch.tensor(field.stride) if windowed else position[rows]
            with fast, _relu_rule(rule):
                (activation,) = run_until(forward, x, modules, lambda _, act, __: act, at_input).values()
            seed = _seed(activation, maxima.channels[rows], seed_at, mode)
            (grad,) = torch.autograd.grad(activation, x, grad_outputs=seed)
            for row, (top, left, bottom, right), window in zip(rows.tolist(), box.tolist(), grad, strict=True):
                out[row, :, top:bottom, left:right] = window.detach()
    return out


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
    layer: str | nn.Module,
    channels: Sequence[int] | Tensor,
    mode: Mode = "max",
    rule: Rule = "deconvnet",
    batch_size: int | None = None,
) -> Projection:
    """Project each channel's strongest activation over ``images`` back to pixel space.

    For each channel of ``layer``, find its strongest activation over all images and positions, zero every
    other activation of the layer, and project it down to the input with ``rule`` (Zeiler & Fergus 2014).
    The projection is seeded with the activation's value, so projections are comparable in scale. The
    model is run in eval mode with its live weights; afterwards its parameters, ``.grad``\\ s, flags,
    train/eval modes, buffers, hooks and the global RNG are exactly as before.

    Args:
        model: any ``nn.Module`` taking ``images``; its ReLUs may be modules or functional calls.
        images: ``[N, C, H, W]`` probe images, as the model expects them (normalised).
        layer: a name from ``model.named_modules()``, or the module; its output must be 4-D.
        channels: the channels of ``layer`` to project.
        mode: ``"max"`` projects the single strongest activation (the paper); ``"map"`` projects the
            channel's whole feature map in the image holding that maximum.
        rule: ``"deconvnet"`` (Zeiler & Fergus), ``"guided"`` (Springenberg et al.) or ``"gradient"``.
        batch_size: images per forward pass (default: all at once).

    Returns:
        A :class:`Projection` with ``images [K, C, H, W]``, ``source [K]``, ``position [K, 2]`` and
        ``value [K]``, in the order of ``channels``.

    Raises:
        ValueError: unknown layer (nearest names listed), empty or out-of-range channels, images that are
            not 4-D or do not fit the model, a layer whose output is not 4-D, unknown mode or rule.

    Example::

        >>> import torchvision
        >>> net = torchvision.models.alexnet(weights=None)
        >>> p = deconvolve(net, torch.rand(4, 3, 96, 96), layer="features.3", channels=[0, 5, 9])
        >>> p.images.shape, p.source.shape, p.position.shape
        (torch.Size([3, 3, 96, 96]), torch.Size([3]), torch.Size([3, 2]))
    """
    _check_rule_and_mode(rule, mode)  # before the maxima pass, which is the expensive half
    name = layer_name(model, layer)
    with _projection_state(model):
        (maxima,) = find_maxima(model, images, {name: channels}, batch_size).values()
    projected = project(model, images, name, maxima, mode, rule, batch_size)
    return Projection(projected, maxima.source, maxima.position, maxima.value, maxima.channels, name)
