r"""Projecting activations down to pixel space, and the :class:`Projection` that holds the result.

A deconvnet projects one activation back to pixel space by running the network backwards: at each stage it
*unpools* with the switches recorded by max-pooling, *rectifies* the signal, and *filters* with the
transposed filters of the same convolution. That is backpropagation with one change, at the ReLUs
(:mod:`lightning_deconv.rules`): max-pooling's backward sends the signal to the switch and a convolution's
backward is ``conv_transpose2d`` with the same weights, so autograd over the live model computes the
paper's chain exactly, on any module graph.

:func:`project_rows` runs one layer's rows as its :class:`~lightning_deconv.plan.LayerPlan` says: each row on
the window of its image that holds its receptive field, a max-pooling layer's rows from their switches,
plain Conv2d/ReLU stretches at the top gone down without their forward pass (:mod:`lightning_deconv.tails`),
on CPU with the equal, faster ops of :mod:`lightning_deconv.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_deconv import kernels
from lightning_deconv.layers import model_device, run_until, working_dtype
from lightning_deconv.maxima import TopK
from lightning_deconv.plan import LayerPlan, Mode, Rule
from lightning_deconv.render import crop, support_boxes
from lightning_deconv.rules import relu_rule

__all__ = ["Projection", "project_rows"]


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

    @classmethod
    def assemble(cls, plan: LayerPlan, projected: Tensor, found: TopK, images: Tensor) -> Projection:
        """The projection of the rows of ``found`` (row ``f * k + j``: channel ``f`` in its ``j``-th image),
        from ``projected`` ``[F * k, C, H, W]`` and the ``images`` ``found.source`` indexes: the boxes, crops and
        patches as ``plan`` says.

        Example::

            >>> from lightning_deconv import Projector
            >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            >>> images = torch.rand(2, 3, 8, 8)
            >>> plan = Projector(net, {"1": [0, 1]}, input_size=(3, 8, 8))
            >>> found = plan.maxima(images)["1"]
            >>> p = Projection.assemble(plan.layers["1"], torch.rand(2, 3, 8, 8), found, images)
            >>> p.crops.shape, p.boxes.tolist()[0][2] - p.boxes.tolist()[0][0]
            (torch.Size([2, 3, 3, 3]), 3)
        """
        projected = projected.cpu()
        source, position = found.source.flatten(), found.position.flatten(0, 1)
        size = tuple(projected.shape[-2:])
        if plan.crop == "receptive_field" and plan.field is not None:
            boxes = plan.field.boxes(position, within=size)
        elif plan.crop != "none":
            boxes = support_boxes(projected)
        else:
            boxes = torch.tensor([[0, 0, *size]]).expand(len(projected), -1)
        return cls(
            images=projected,
            source=source,
            position=position,
            value=found.value.flatten(),
            channels=found.channels.repeat_interleave(found.k),
            layer=plan.name,
            boxes=boxes,
            crops=crop(projected, boxes),
            patches=crop(images.detach().cpu(), boxes, sources=source),
        )


def project_rows(
    model: nn.Module,
    plan: LayerPlan,
    images: Tensor,
    found: TopK,
    *,
    rule: Rule,
    mode: Mode,
    forward: Callable[[Tensor], Any],
    fast: kernels.FastCPUOps,
    batch_size: int | None = None,
) -> Tensor:
    """``[F * k, C, H, W]`` projections of the rows of ``found`` (row ``f * k + j``: channel
    ``found.channels[f]`` in image ``images[found.source[f, j]]``), every other activation of the layer zeroed,
    on windows where ``plan`` allows.

    Runs under :func:`~lightning_deconv.layers.projection_state` (the caller's, once for all its layers), with
    ``forward`` the model's (:func:`~lightning_deconv.layers.bound_forward`) and ``fast`` the caller's CPU ops,
    which lay each filter out once for all layers.
    """
    module = {plan.name: plan.module}
    device = model_device(model)
    channels = found.channels.repeat_interleave(found.k)
    source, value = found.source.flatten(), found.value.flatten()
    k = len(channels)
    height, width = images.shape[-2:]
    field = plan.windows if mode == "max" else None
    position, at_input = found.position.flatten(0, 1), False
    if plan.starts_at_switch:
        if found.switch is None:
            field = None  # without the switches the pooling's input cannot be seeded: whole images
        else:
            # Unpooling sends the seed to its switch and nowhere else, so the projection starts there.
            position, at_input = found.switch.flatten(0, 1), True
    if field is not None:
        boxes = field.windows(position, (height, width))
    else:
        boxes = torch.tensor([[0, 0, height, width]]).expand(k, -1)
    tail = plan.tail
    stop = module if tail is None else {tail.before: tail.entry}
    seed_at = position - boxes[:, :2] // torch.tensor(field.stride) if field else position
    out = torch.zeros(k, images.shape[1], height, width, device=device)
    for group, rows, first in _batches(boxes, batch_size or k):
        box = boxes[rows]
        x = crop(images.detach(), box, sources=source[rows]).to(device, working_dtype(model))
        x = fast.prepare(x).requires_grad_(True)
        with fast, relu_rule(rule):
            (activation,) = run_until(forward, x, stop, _activation, at_input and tail is None).values()
        if tail is None:
            seed = _seed(activation, channels[rows], seed_at[rows], mode)
        else:  # no forward past the stretch: the seed is the maximum's value, sent down by hand once per shape
            if first:
                entry = torch.Size([len(group), *activation.shape[1:]])
                down = tail.down(value[group].to(activation), channels[group], seed_at[group], entry, fast.filters)
                seeds = iter(down.split(len(rows)))  # the group's batches, in order
            seed = next(seeds)
        (grad,) = torch.autograd.grad(activation, x, grad_outputs=seed)
        for row, (top, left, bottom, right), window in zip(rows.tolist(), box.tolist(), grad, strict=True):
            out[row, :, top:bottom, left:right] = window.detach()
    return out


def _activation(name: str, activation: Tensor, layer_input: object) -> Tensor:
    return activation


def _batches(boxes: Tensor, size: int) -> list[tuple[Tensor, Tensor, bool]]:
    """Row indices grouped by window shape, each group cut into batches of at most ``size`` rows (rows of one
    shape run as one batch): ``(group, batch, whether it is the group's first)``, the batches of a group in order."""
    shapes = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1)
    groups = [torch.nonzero((shapes == shape).all(dim=1)).flatten() for shape in shapes.unique(dim=0)]
    return [(group, chunk, i == 0) for group in groups for i, chunk in enumerate(group.split(size))]


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
