"""Exact incremental inference for occlusion: each occluded pass computed only inside the patch's cone.

A grey square changes only part of each layer's maps: the units whose window (through every convolution and
pooling below) reaches the square. Krypton (Nakandala, Kumar & Papakonstantinou, SIGMOD 2019) recomputes, for
each position of the square, just that region, its *cone*, layer by layer from the maps of the unoccluded
pass, and reuses the rest. The result is the same as the full occluded pass (to float rounding).

Per axis, if the input rows ``[a, b)`` of a window layer (kernel extent ``e``, stride ``s``, padding ``p``)
changed, its output rows ``o`` with ``o * s - p < b`` and ``o * s - p + e > a`` change:
``floor((a + p - e) / s) + 1 <= o < ceil((b + p) / s)``, clipped to the map. To compute them, a tile of the
padded input is cut out (the changed rows and the halo of unchanged ones the windows need), the occluded
values are written over the cached ones, and the layer runs on the tile without padding. Point-wise layers
(activations, BatchNorm in eval mode, dropout, local response normalisation) act on the changed region
alone. All positions share one tile size per layer (the largest cone, moved inwards at the borders), so
each layer runs once on a batch of positions.

:class:`Cones` records the model's chain of layers during the unoccluded pass: the leaf modules that run one
after another, each on the previous one's output, from the image on, while they are windows
(``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.AvgPool2d``) or point-wise. The cones run up to the first layer whose
cone covers the whole map (or the end of the chain: a functional op, an unknown layer, a flatten). From
there the model's own forward runs on the full maps, its modules below that point answering with them.
Before relying on that, it checks once that this forward, fed a blank image, gives the unoccluded output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_deconv.geometry import _window

__all__ = ["Cones"]

_POINTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.LocalResponseNorm,
)


@dataclass(frozen=True)
class _Layer:
    """One module of the chain: a window (``extent, stride, padding`` per axis) or point-wise (``window=None``)."""

    module: nn.Module
    window: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    out_channels: int

    def run(self, tile: Tensor) -> Tensor:
        """The layer on a tile of its input, already padded (a window) or as it is (point-wise)."""
        module = self.module
        if self.window is None:
            return module(tile)
        if isinstance(module, nn.Conv2d):
            return F.conv2d(tile, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
        if isinstance(module, nn.MaxPool2d):
            return F.max_pool2d(tile, module.kernel_size, module.stride, 0, module.dilation)
        return F.avg_pool2d(tile, module.kernel_size, module.stride, 0, False, True, module.divisor_override)

    @property
    def pad_value(self) -> float:
        return float("-inf") if isinstance(self.module, nn.MaxPool2d) else 0.0


def _conv_macs(module: nn.Conv2d) -> int:
    """Multiply-accumulates per output value of a convolution."""
    return module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]


def _kind(module: nn.Module) -> str | None:
    """``"window"``, ``"pointwise"`` or ``None`` (not traceable) for a leaf module in eval mode."""
    kind = type(module)
    if kind is nn.Conv2d:
        plain = module.padding_mode == "zeros" and not isinstance(module.padding, str)
        return "window" if plain else None
    if kind in (nn.MaxPool2d, nn.AvgPool2d):
        if module.ceil_mode or getattr(module, "return_indices", False):
            return None
        if kind is nn.AvgPool2d and not module.count_include_pad and module.padding != 0:
            return None
        return "window"
    if kind is nn.BatchNorm2d:
        return "pointwise" if module.running_mean is not None and not module.training else None
    if kind in _POINTWISE or kind is nn.PReLU:
        return "pointwise"
    return None


def cone_rows(first: Tensor, end: Tensor, layer: _Layer, axis: int) -> tuple[Tensor, Tensor]:
    """The output rows ``[first, end)`` that change when input rows ``[first, end)`` change (per position)."""
    extent, stride, padding = (value[axis] for value in layer.window)
    low = torch.div(first + padding - extent, stride, rounding_mode="floor") + 1
    high = -torch.div(-(end + padding), stride, rounding_mode="floor")
    return low.clamp(min=0), high.clamp(max=layer.out_size[axis])


@dataclass
class _Axis:
    """Per layer along one axis: the rows each position computes (``start``, one ``size`` for all), and the
    rows that really change (``first``, ``end``): the cone, which the tile size covers."""

    start: Tensor
    size: int
    first: Tensor
    end: Tensor


@dataclass
class Cones:
    """The chain of layers of a model where occlusion cones can be traced, with the unoccluded pass's maps.

    Made by :meth:`recording` around the unoccluded forward pass; :meth:`plan` then fixes, for one square
    and stride, the cone of every layer and the layer after which the ordinary forward takes over.

    Attributes:
        layers: the chain's modules in the order they ran.
        maps: each chain module's output on the unoccluded images (copied when it ran).
        images: the unoccluded images (the chain's input).
        macs: multiply-accumulates per image of each ``nn.Conv2d`` and ``nn.Linear`` call in the forward pass,
            in order, with the chain index of the call (``None`` outside the chain).
        stop: why the chain ended (for the warning when it is empty).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        ...                     nn.Linear(64, 2))
        >>> with Cones.recording(net, torch.rand(1, 3, 8, 8)) as cones:
        ...     _ = net(cones.images)
        >>> [type(layer.module).__name__ for layer in cones.layers], cones.stop
        (['Conv2d', 'ReLU', 'MaxPool2d'], "'3' (Flatten) is not a convolution, pooling or point-wise layer")
        >>> full, cone = cones.macs_per_position(patch=2, stride=2)
        >>> full, cone  # conv: 8*8*4 outputs x 27 MACs, linear 64*2; cones of the conv: 4x4 units, fewer at borders
        (7040, 1556.0)
    """

    images: Tensor
    layers: list[_Layer] = field(default_factory=list)
    maps: list[Tensor] = field(default_factory=list)
    macs: list[tuple[int, int | None]] = field(default_factory=list)
    stop: str = "the forward pass ended"
    _open: bool = True
    _seen: set[int] = field(default_factory=set)
    _last: object = None

    def __post_init__(self) -> None:
        self._last = self.images

    @classmethod
    @contextlib.contextmanager
    def recording(cls, model: nn.Module, images: Tensor) -> Iterator[Cones]:
        """While active, forward passes of ``model`` on ``images`` record its chain (use one pass)."""
        cones = cls(images)
        names = {id(module): name for name, module in model.named_modules()}
        leaves = [m for m in model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(cones._hook(names.get(id(m), "?"))) for m in leaves]
        try:
            yield cones
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if isinstance(output, Tensor) and type(module) in (nn.Conv2d, nn.Linear):
                per_image = output.numel() // len(self.images)
                unit = _conv_macs(module) if type(module) is nn.Conv2d else module.in_features
                self.macs.append((per_image * unit, None))
            if self._open:
                self._extend(name, module, inputs[0] if inputs else None, output)

        return hook

    def _extend(self, name: str, module: nn.Module, source: object, output: object) -> None:
        label = f"{name!r} ({type(module).__name__})"
        kind = _kind(module)
        reason = None
        if source is not self._last:
            reason = f"{label} does not take the previous layer's output (a functional op before it?)"
        elif id(module) in self._seen:
            reason = f"{label} runs twice"
        elif kind is None or not isinstance(output, Tensor) or output.dim() != 4:
            reason = f"{label} is not a convolution, pooling or point-wise layer"
        elif kind == "pointwise" and output.shape != source.shape:
            reason = f"{label} changes the map's shape"
        if reason is not None:
            self._open, self.stop, self._last = False, reason, None
            return
        self._seen.add(id(module))
        window = _window(module) if kind == "window" else None
        self.layers.append(_Layer(module, window, tuple(source.shape[-2:]), tuple(output.shape[-2:]), output.shape[1]))
        self.maps.append(output.clone())
        self._last = output  # held, so that its id cannot be reused during the pass
        if type(module) is nn.Conv2d:
            self.macs[-1] = (self.macs[-1][0], len(self.layers) - 1)

    def axes(self, patch: int, stride: int) -> list[tuple[_Axis, _Axis]]:
        """Per chain layer, the rows and columns of its output each position of the square computes and changes."""
        current = []
        for axis in range(2):
            count = (self.images.shape[2 + axis] - patch) // stride + 1
            first = torch.arange(count, device=self.images.device) * stride
            current.append(_Axis(first, patch, first, first + patch))
        axes = []
        for layer in self.layers:
            if layer.window is not None:
                moved = []
                for axis, rows in enumerate(current):
                    first, end = cone_rows(rows.first, rows.end, layer, axis)
                    size = int((end - first).max())
                    moved.append(_Axis(first.clamp(max=layer.out_size[axis] - size), size, first, end))
                current = moved
            axes.append(tuple(current))
        return axes

    def switch(self, axes: list[tuple[_Axis, _Axis]], last: int | None = None) -> int:
        """How many chain layers run on cones: up to the first window layer whose cone covers its whole map,
        at most ``last + 1`` (when nothing past layer ``last`` is needed)."""
        end = len(self.layers) if last is None else min(len(self.layers), last + 1)
        for index in range(end):
            layer = self.layers[index]
            if layer.window is not None and all(a.size == s for a, s in zip(axes[index], layer.out_size, strict=True)):
                return index + 1
        return end

    def macs_per_position(self, patch: int, stride: int) -> tuple[int, float]:
        """Multiply-accumulates of ``nn.Conv2d`` and ``nn.Linear`` layers per occluded image: of a full pass, and
        on average over the positions with the exact cones (a convolution past the switch counts in full)."""
        axes = self.axes(patch, stride)
        switch = self.switch(axes)
        full = sum(macs for macs, _ in self.macs)
        cone = 0.0
        for macs, index in self.macs:
            if index is None or index >= switch:
                cone += macs
                continue
            layer, (rows, cols) = self.layers[index], axes[index]
            area = (rows.end - rows.first).double().mean() * (cols.end - cols.first).double().mean()
            cone += float(area) * layer.out_channels * _conv_macs(layer.module)
        return full, cone

    def prepare(self, switch: int) -> None:
        """Pad, once, the unoccluded input of each window layer below ``switch`` (channels last, ``[N, H, W, C]``)."""
        self._padded = {}
        for index, layer in enumerate(self.layers[:switch]):
            if layer.window is not None:
                source = self.images if index == 0 else self.maps[index - 1]
                (rows, cols) = layer.window[2]
                padded = F.pad(source, (cols, cols, rows, rows), value=layer.pad_value)
                self._padded[index] = padded.permute(0, 2, 3, 1).contiguous()

    def occluded(
        self,
        image: Tensor,
        row: Tensor,
        col: Tensor,
        patch: int,
        stride: int,
        fill: float,
        axes: list[tuple[_Axis, _Axis]],
        switch: int,
        tracked: tuple[int, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The output of chain layer ``switch - 1`` for the ``patch`` square of ``fill`` at map cell ``(row, col)``
        (top-left pixel ``(row * stride, col * stride)``) of image ``image``
        (all ``[B]``), computed on cones from :meth:`prepare`'s maps; with ``tracked = (index, channels [B])``
        also the summed map of ``channels`` of layer ``index`` (below ``switch``).

        Returns:
            ``(maps [B, C, H, W], feature [B] or None)``.
        """
        images = self.images
        size = (len(image), images.shape[1], patch, patch)
        occluded = torch.full(size, fill, dtype=images.dtype, device=images.device)
        occluded = occluded.contiguous(memory_format=torch.channels_last)
        at, feature = (row * stride, col * stride), None
        for index, layer in enumerate(self.layers[:switch]):
            if layer.window is not None:
                extent, stride, padding = layer.window
                out_rows, out_cols = axes[index]
                starts = (out_rows.start[row], out_cols.start[col])
                span = [(n - 1) * s + e for n, s, e in zip((out_rows.size, out_cols.size), stride, extent, strict=True)]
                lines = [
                    start[:, None] * step + torch.arange(length, device=start.device)
                    for start, step, length in zip(starts, stride, span, strict=True)
                ]
                shifted = (at[0] + padding[0], at[1] + padding[1])
                occluded = layer.run(overlay(self._padded[index], image, lines[0], lines[1], occluded, shifted))
                at = starts
            else:
                occluded = layer.run(occluded)
            if tracked is not None and index == tracked[0]:
                feature = self._total(index, image, occluded, at, tracked[1])
        if occluded.shape[-2:] == self.maps[switch - 1].shape[-2:]:
            return occluded, feature
        return self._whole(switch - 1, image, occluded, at), feature

    def _whole(self, index: int, image: Tensor, occluded: Tensor, at: tuple[Tensor, Tensor]) -> Tensor:
        """The full output maps of chain layer ``index``: the unoccluded ones with ``occluded`` written at ``at``."""
        cached = self.maps[index]
        lines = [torch.arange(n, device=cached.device).expand(len(image), n) for n in cached.shape[-2:]]
        return overlay(cached.permute(0, 2, 3, 1), image, lines[0], lines[1], occluded, at)

    def _total(
        self, index: int, image: Tensor, occluded: Tensor, at: tuple[Tensor, Tensor], channels: Tensor
    ) -> Tensor:
        """``[B]`` the summed full map of ``channels`` of chain layer ``index``, with ``occluded`` written at ``at``."""
        batch = torch.arange(len(image), device=image.device)
        cached = self.maps[index][image, channels][..., None]  # [B, H, W, 1]
        lines = [torch.arange(n, device=cached.device).expand(len(image), n) for n in cached.shape[1:3]]
        maps = overlay(cached, batch, lines[0], lines[1], occluded[batch, channels][:, None], at)
        return maps.sum(dim=(1, 2, 3))

    @contextlib.contextmanager
    def answering(self, switch: int, maps: list[Tensor]) -> Iterator[None]:
        """While active, the chain's first ``switch`` modules skip their work and return ``maps[0]``."""
        modules = [layer.module for layer in self.layers[:switch]]
        own = [module.__dict__.get("forward") for module in modules]
        for module in modules:
            module.forward = lambda *args, **kwargs: maps[0]
        try:
            yield
        finally:
            for module, forward in zip(modules, own, strict=True):
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward


def overlay(
    cached: Tensor, image: Tensor, rows: Tensor, cols: Tensor, patch: Tensor, at: tuple[Tensor, Tensor]
) -> Tensor:
    """Tiles ``[B, C, h, w]`` (channels-last) of the occluded maps: rows ``rows [B, h]`` and columns
    ``cols [B, w]`` of ``cached [N, H, W, C]`` (channels last) for image ``image [B]``, with the values of
    ``patch [B, C, ph, pw]``, whose top-left corner is at ``at`` in the same coordinates, written over them."""
    base = cached[image[:, None, None], rows[:, :, None], cols[:, None, :]]
    local_rows, local_cols = rows - at[0][:, None], cols - at[1][:, None]
    height, width = patch.shape[-2:]
    inside = ((local_rows >= 0) & (local_rows < height))[:, :, None] & ((local_cols >= 0) & (local_cols < width))[
        :, None
    ]
    batch = torch.arange(len(patch), device=patch.device)[:, None, None]
    new = patch.permute(0, 2, 3, 1)[
        batch, local_rows.clamp(0, height - 1)[:, :, None], local_cols.clamp(0, width - 1)[:, None]
    ]
    return torch.where(inside[..., None], new, base).permute(0, 3, 1, 2)
