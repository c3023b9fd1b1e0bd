"""Receptive fields: which input pixels one activation of a layer can see.

A projection is zero outside its activation's receptive field, so the paper shows each one cropped to it
(Zeiler & Fergus 2014, Fig. 2 and 4). The geometry of a layer, per axis, is three numbers: the field's
``size``, the ``stride`` between neighbouring units (the product of all strides below) and the ``offset``
of unit 0's field (negative where padding reaches past the image border). Unit ``i`` sees input pixels
``offset + i * stride`` up to ``offset + i * stride + size - 1``.

``receptive_field`` derives it from one dry forward pass, composing the kernel, stride, padding and
dilation of every convolution and pooling module on the path to the layer. Where branches meet (a
residual addition) the widest branch wins, which is the true field of the sum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_deconv.layers import eval_mode, layer_name, resolve_layers, run_until

__all__ = ["ReceptiveField", "exact_on_windows", "input_field", "receptive_field", "receptive_fields", "tracing"]

_WINDOWED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class ReceptiveField:
    """A layer's receptive-field geometry: ``size``, ``stride`` and ``offset`` as ``(rows, cols)`` pairs."""

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]

    def boxes(self, positions: Tensor, within: tuple[int, int] | None = None) -> Tensor:
        """Boxes ``(top, left, bottom, right)``, end exclusive, of the units at ``positions [K, 2]``.

        By default boxes are the fields themselves, reaching past the image where padding does. With
        ``within=(H, W)`` they are kept inside the image instead: at most ``H x W``, moved inwards at the
        borders, so each still holds all of its field that lies in the image (and all boxes keep one size).
        """
        corners, sizes = [], []
        for axis in range(2):
            size = self.size[axis] if within is None else min(self.size[axis], int(within[axis]))
            start = self.offset[axis] + positions[:, axis].long() * self.stride[axis]
            if within is not None:
                start = start.clamp(0, int(within[axis]) - size)
            corners.append(start)
            sizes.append(size)
        top, left = corners
        return torch.stack([top, left, top + sizes[0], left + sizes[1]], dim=1)

    def windows(self, positions: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Boxes ``[K, 4]`` of input windows, all of one size, from which the units at ``positions`` are computed
        exactly.

        A unit depends only on the input inside its receptive field, so running the layers on a window that
        holds the field gives the same activation and the same projection, if the window keeps two things:
        the stride alignment (it starts at a multiple of ``stride``, so every intermediate unit lands on the
        full map's grid) and the true image borders (it is cut at them, never padded past them, since
        padding the input is not the same as padding the maps inside the network). A larger window that keeps
        both is exact as well, so every window gets the size of one away from the borders (the field and its
        misalignment, kept inside the image; at the far border a little more, so that it ends on the border
        and starts on the stride grid), moved inwards at the borders: all rows of a layer run as one batch.
        Unit ``(r, c)`` is unit ``(r, c) - (top, left) // stride`` of its window.
        """
        sides = []
        for axis in range(2):
            jump, extent = self.stride[axis], int(image_size[axis])
            nominal = self.size[axis] + self.offset[axis] % jump  # a window away from the borders
            size = extent if nominal >= extent else extent - (extent - nominal) // jump * jump
            first = self.offset[axis] + positions[:, axis].long() * jump  # first pixel of each field
            start = (torch.div(first, jump, rounding_mode="floor") * jump).clamp(0, extent - size)
            sides.append((start, start + size))
        (top, bottom), (left, right) = sides
        return torch.stack([top, left, bottom, right], dim=1)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _window(module: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Per axis: the extent of ``module``'s window (dilation included), its stride and its padding."""
    kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    dilation = _pair(getattr(module, "dilation", 1))
    extent = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True))
    return extent, stride, _pair(module.padding)


def _compose(field: ReceptiveField, module: nn.Module) -> ReceptiveField:
    """The field after ``module`` (a conv or pooling window) applied on top of ``field``."""
    extent, stride, padding = _window(module)
    size, jump, offset = [], [], []
    for axis in range(2):
        size.append(field.size[axis] + (extent[axis] - 1) * field.stride[axis])
        offset.append(field.offset[axis] - padding[axis] * field.stride[axis])
        jump.append(field.stride[axis] * stride[axis])
    return ReceptiveField(tuple(size), tuple(jump), tuple(offset))


def input_field(field: ReceptiveField, module: nn.Module) -> ReceptiveField:
    """The field of the input of ``module`` (a conv or pooling window), given ``field``, that of its output.

    Example::

        >>> pool5 = ReceptiveField(size=(171, 171), stride=(32, 32), offset=(-59, -59))
        >>> input_field(pool5, nn.MaxPool2d(3, stride=2))
        ReceptiveField(size=(139, 139), stride=(16, 16), offset=(-59, -59))
    """
    extent, stride, padding = _window(module)
    size, jump, offset = [], [], []
    for axis in range(2):
        jump.append(field.stride[axis] // stride[axis])
        size.append(field.size[axis] - (extent[axis] - 1) * jump[axis])
        offset.append(field.offset[axis] + padding[axis] * jump[axis])
    return ReceptiveField(tuple(size), tuple(jump), tuple(offset))


class _Tracer:
    """Forward hooks that carry a ReceptiveField along with every 4-D tensor of the forward pass."""

    def __init__(self, image: Tensor) -> None:
        self.fields: dict[int, tuple[Tensor, ReceptiveField]] = {
            id(image): (image, ReceptiveField((1, 1), (1, 1), (0, 0)))
        }

    def field_of(self, tensor: Tensor) -> ReceptiveField | None:
        if id(tensor) in self.fields:
            return self.fields[id(tensor)][1]
        # Made by a functional op (e.g. a residual sum): take the widest field of the same map size.
        same = [f for t, f in self.fields.values() if t.shape[-2:] == tensor.shape[-2:]]
        return max(same, key=lambda f: f.size, default=None)

    def hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not isinstance(output, Tensor) or output.dim() != 4 or not inputs:
            return
        source = inputs[0]
        if not isinstance(source, Tensor) or source.dim() != 4:
            return
        field = self.field_of(source)
        if field is None:
            return
        if isinstance(module, _WINDOWED):
            field = _compose(field, module)
        elif output.shape[-2:] != source.shape[-2:]:
            return  # an unknown resampling: leave the output without a field
        # Keep the tensor alive so its id() cannot be reused by another tensor during the pass.
        if id(output) not in self.fields or isinstance(module, _WINDOWED):
            self.fields[id(output)] = (output, field)


@torch.no_grad()
def receptive_fields(
    model: nn.Module, layers: Iterable[str | nn.Module], input_size: tuple[int, int, int]
) -> dict[str, ReceptiveField | None]:
    """The receptive-field geometry of each layer's output, from one forward pass of a blank image.

    A layer whose input passes through a resampling that is not an ``nn.Conv2d``/``MaxPool2d``/``AvgPool2d``
    module gets ``None``. A resampling that keeps the map size (e.g. a functional stride-1 pooling) cannot be
    seen here at all: :class:`~lightning_deconv.engine.Projector` checks each field before it relies on it.
    """
    targets = resolve_layers(model, layers)
    reference = next(model.parameters(), torch.empty(0))
    image = torch.zeros(1, *input_size, device=reference.device, dtype=reference.dtype)
    with tracing(model, image) as tracer, eval_mode(model):
        return run_until(model, image, targets, lambda _, out, __: tracer.field_of(out))


@contextlib.contextmanager
def tracing(model: nn.Module, image: Tensor) -> Iterator[_Tracer]:
    """While active, every forward pass of ``model`` on ``image`` carries receptive fields along: for any 4-D
    tensor it made, ``tracer.field_of(tensor)`` is that map's field (``None`` where unknown)."""
    tracer = _Tracer(image)
    handles = [m.register_forward_hook(tracer.hook) for m in model.modules() if not list(m.children())]
    try:
        yield tracer
    finally:
        for handle in handles:
            handle.remove()


def exact_on_windows(
    forward: Callable[[Tensor], Any],
    image: Tensor,
    layer: tuple[str, nn.Module],
    field: ReceptiveField,
    whole: Tensor,
    at_input: bool = False,
    prepare: Callable[[Tensor], Tensor] = lambda x: x,
) -> bool:
    """Whether ``field`` is exact for ``layer``: the windows of ``image`` (``[1, C, H, W]``) around the first,
    middle and last unit of its map ``whole`` (``[1, C, h, w]``, the layer's input where ``at_input``), cut at
    all four borders there, give the same activations as the whole image did.

    ``forward`` runs the model (e.g. :func:`~lightning_deconv.layers.bound_forward`'s), ``prepare`` lays each
    window out as the model's kernels want it. A field traced through modules alone misses functional
    resamplings; this check on the model itself does not.
    """
    height, width = whole.shape[-2:]
    units = torch.tensor([[0, 0], [height // 2, width // 2], [height - 1, width - 1]])
    boxes = field.windows(units, image.shape[-2:])
    windows = torch.cat([image[:, :, top:bottom, left:right] for top, left, bottom, right in boxes.tolist()])
    try:  # the windows have one size: one pass
        (got,) = run_until(forward, prepare(windows), dict([layer]), lambda _, out, __: out, at_input).values()
    except ValueError:
        return False  # e.g. a window too small for the model
    for i, (unit, at) in enumerate(zip(units, boxes[:, :2], strict=True)):
        r, c = (unit - at // torch.tensor(field.stride)).tolist()
        want = whole[0, :, unit[0], unit[1]]
        if not (0 <= r < got.shape[-2] and 0 <= c < got.shape[-1]):
            return False
        if (got[i, :, r, c] - want).abs().max() > 1e-4 * want.abs().max().clamp_min(1e-6):
            return False
    return True


def receptive_field(model: nn.Module, layer: str | nn.Module, input_size: tuple[int, int, int]) -> ReceptiveField:
    """The receptive-field geometry of ``layer``'s output for inputs of shape ``input_size = (C, H, W)``.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=1), nn.MaxPool2d(3, 2, padding=1))
        >>> receptive_field(net, "1", (3, 64, 64))
        ReceptiveField(size=(11, 11), stride=(4, 4), offset=(-3, -3))

    Raises:
        ValueError: the path to ``layer`` goes through a resampling this tracer does not know (crop to the
            projection's support instead).
    """
    name = layer_name(model, layer)
    field = receptive_fields(model, [name], input_size)[name]
    if field is None:
        raise ValueError(
            f"Cannot derive the receptive field of {name!r}: its input passes through a resampling that is "
            "not an nn.Conv2d/MaxPool2d/AvgPool2d module. Crop to the projection's support instead."
        )
    return field
