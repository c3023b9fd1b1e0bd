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

from lightning_deconv.analysis.cone_geometry import Axis, ChainLayer, cone_rows, conv_macs, group_positions, layer_kind
from lightning_deconv.geometry import _window

__all__ = ["Cones"]


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
        largest: the most values of one image's output of a module past the chain.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        ...                     nn.Linear(64, 2))
        >>> with Cones.recording(net, torch.rand(1, 3, 8, 8)) as cones:
        ...     _ = net(cones.images)
        >>> [type(layer.module).__name__ for layer in cones.layers], cones.stop
        (['Conv2d', 'ReLU', 'MaxPool2d'], "'3' (Flatten) is not a convolution, pooling or point-wise layer")
        >>> full, cone = cones.macs_per_position(patch=2, stride=2)
        >>> full, cone  # conv 8*8*4 outputs x 27 MACs + linear 64*2; the conv's cones: 3.5x3.5 units on average
        (7040, 1451.0)
    """

    images: Tensor
    layers: list[ChainLayer] = field(default_factory=list)
    maps: list[Tensor] = field(default_factory=list)
    macs: list[tuple[int, int | None]] = field(default_factory=list)
    stop: str = "the forward pass ended"
    largest: int = 0
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
            per_image = output.numel() // len(self.images) if isinstance(output, Tensor) else 0
            if type(module) in (nn.Conv2d, nn.Linear):
                unit = conv_macs(module) if type(module) is nn.Conv2d else module.in_features
                self.macs.append((per_image * unit, None))
            if self._open:
                self._extend(name, module, inputs[0] if inputs else None, output)
            if not self._open:
                self.largest = max(self.largest, per_image)

        return hook

    def _extend(self, name: str, module: nn.Module, source: object, output: object) -> None:
        label = f"{name!r} ({type(module).__name__})"
        kind = layer_kind(module)
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
        self.layers.append(
            ChainLayer(module, window, tuple(source.shape[-2:]), tuple(output.shape[-2:]), output.shape[1])
        )
        self.maps.append(output.clone())
        self._last = output  # held, so that its id cannot be reused during the pass
        if type(module) is nn.Conv2d:
            self.macs[-1] = (self.macs[-1][0], len(self.layers) - 1)

    def axes(self, patch: int, stride: int) -> list[tuple[Axis, Axis]]:
        """Per chain layer, the rows and columns of its output each position of the square computes and changes."""
        current = []
        for axis in range(2):
            count = (self.images.shape[2 + axis] - patch) // stride + 1
            first = torch.arange(count, device=self.images.device) * stride
            current.append(Axis(first, first + patch))
        axes = []
        for layer in self.layers:
            if layer.window is not None:
                moved = []
                for axis, rows in enumerate(current):
                    moved.append(Axis(*cone_rows(rows.first, rows.end, layer, axis)))
                current = moved
            axes.append(tuple(current))
        return axes

    def switch(self, axes: list[tuple[Axis, Axis]], last: int | None = None) -> int:
        """How many chain layers run on cones: up to the first window layer whose cone covers its whole map,
        at most ``last + 1`` (when nothing past layer ``last`` is needed)."""
        end = len(self.layers) if last is None else min(len(self.layers), last + 1)
        for index in range(end):
            layer = self.layers[index]
            if layer.window is not None and all(a.size == s for a, s in zip(axes[index], layer.out_size, strict=True)):
                return index + 1
        return end

    def batch_sizes(self, axes: list[tuple[Axis, Axis]], switch: int) -> tuple[int, int]:
        """Occluded images per batch past the switch and per batch of cones: as many as keep each map of the batch
        within 4M and 8M values (16 and 32 MiB in float32). Cones are small, so their batches are many small ops;
        on shared cores each op can wait for a descheduled thread, and fewer, larger batches lose less."""
        later = max([self.largest, *(self.maps[i][0].numel() for i in range(switch - 1, len(self.layers)))])
        tile = 1
        for index, (layer, (rows, cols)) in enumerate(zip(self.layers[:switch], axes, strict=False)):
            tile = max(tile, layer.out_channels * rows.size * cols.size)
            if layer.window is not None:
                extent, stride, _ = layer.window
                source = self.images if index == 0 else self.maps[index - 1]
                span = [(n - 1) * s + e for n, s, e in zip((rows.size, cols.size), stride, extent, strict=True)]
                tile = max(tile, source.shape[1] * span[0] * span[1])
        return max(1, min(1024, 2**22 // max(1, later))), max(1, 2**23 // tile)

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
            area = (rows.end - rows.first).double().mean() * (cols.end - cols.first).double().mean()  # separable
            cone += float(area) * layer.out_channels * conv_macs(layer.module)
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

    def groups(self, axes: list[tuple[Axis, Axis]], switch: int, most: int = 4) -> list[tuple[Tensor, Tensor]]:
        """Per axis, ``(group [R], extents [G, switch])``: the rows (columns) of square positions grouped so that
        each group runs as one batch (:func:`~lightning_deconv.analysis.cone_geometry.group_positions`)."""
        return [group_positions(self.layers, axes, switch, axis, most, self.images.device) for axis in range(2)]

    def occluded(
        self,
        image: Tensor,
        row: Tensor,
        col: Tensor,
        extents: tuple[list[int], list[int]],
        patch: int,
        stride: int,
        fill: float,
        axes: list[tuple[Axis, Axis]],
        switch: int,
        tracked: tuple[int, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The output of chain layer ``switch - 1`` for the ``patch`` square of ``fill`` at map cell ``(row, col)``
        (top-left pixel ``(row * stride, col * stride)``) of image ``image`` (all ``[B]``), computed on cones
        from :meth:`prepare`'s maps, with the tile ``extents`` (rows, columns) of one group of :meth:`groups`;
        with ``tracked = (index, channels [B])`` also the summed map of ``channels`` of layer ``index``.

        Returns:
            ``(maps [B, C, H, W], feature [B] or None)``.
        """
        images = self.images
        size = (len(image), patch, patch, images.shape[1])
        occluded = torch.full(size, fill, dtype=images.dtype, device=images.device).permute(0, 3, 1, 2)
        at, feature = (row * stride, col * stride), None
        for index, layer in enumerate(self.layers[:switch]):
            if layer.window is not None:
                extent, steps, padding = layer.window
                sizes = (extents[0][index], extents[1][index])
                starts = tuple(
                    axes[index][axis].first[cell].clamp(max=layer.out_size[axis] - sizes[axis])
                    for axis, cell in enumerate((row, col))
                )
                shape = [(n - 1) * s + k for n, s, k in zip(sizes, steps, extent, strict=True)]
                tile = _tile(self._padded[index], image, starts[0] * steps[0], starts[1] * steps[1], shape)
                offset = [a + p - t * s for a, p, t, s in zip(at, padding, starts, steps, strict=True)]
                occluded = layer.run(_paste(tile, occluded, offset))
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
        maps = self.maps[index][image]
        _write(maps.permute(0, 2, 3, 1), occluded.permute(0, 2, 3, 1), at)
        return maps

    def _total(
        self, index: int, image: Tensor, occluded: Tensor, at: tuple[Tensor, Tensor], channels: Tensor
    ) -> Tensor:
        """``[B]`` the summed full map of ``channels`` of chain layer ``index``, with ``occluded`` written at ``at``."""
        batch = torch.arange(len(image), device=image.device)
        maps = self.maps[index][image, channels]  # [B, H, W]
        _write(maps[..., None], occluded[batch, channels][..., None], at)
        return maps.sum(dim=(1, 2))

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


def _tile(cached: Tensor, image: Tensor, top: Tensor, left: Tensor, shape: list[int]) -> Tensor:
    """``[B, h, w, C]``: the ``shape`` boxes of ``cached [N, H, W, C]`` at ``(top, left)`` of ``image`` (each
    ``[B]``)."""
    windows = cached.unfold(1, shape[0], 1).unfold(2, shape[1], 1)  # [N, H - h + 1, W - w + 1, C, h, w], a view
    return windows.permute(0, 1, 2, 4, 5, 3)[image, top, left]


def _paste(tile: Tensor, occluded: Tensor, offset: list[Tensor]) -> Tensor:
    """``tile [B, h, w, C]`` with ``occluded [B, C, ph, pw]`` written over it at ``offset`` (each ``[B]``), as a
    channels-last ``[B, C, h, w]``. Parts of ``occluded`` outside the tile (never read there) are dropped."""
    source = occluded.permute(0, 2, 3, 1)
    before = [int((-shift).clamp(min=0).max()) for shift in offset]
    sizes = zip(offset, source.shape[1:3], tile.shape[1:3], strict=True)
    after = [int((shift + n - t).clamp(min=0).max()) for shift, n, t in sizes]
    if any(before) or any(after):  # write into a larger canvas, then cut the tile out of it
        height, width = tile.shape[1:3]
        canvas = tile.new_empty((len(tile), height + before[0] + after[0], width + before[1] + after[1], tile.shape[3]))
        tile = canvas[:, before[0] : before[0] + height, before[1] : before[1] + width].copy_(tile)
        _write(canvas, source, (offset[0] + before[0], offset[1] + before[1]))
    else:
        _write(tile, source, offset)
    return tile.permute(0, 3, 1, 2)


def _write(maps: Tensor, occluded: Tensor, at: tuple[Tensor, Tensor]) -> None:
    """Write ``occluded [B, h, w, C]`` into ``maps [B, H, W, C]`` with its top-left corner at ``at`` (each ``[B]``)."""
    windows = maps.unfold(1, occluded.shape[1], 1).unfold(2, occluded.shape[2], 1)  # [B, ., ., C, h, w], a view
    batch = torch.arange(len(maps), device=maps.device)
    windows[batch, at[0], at[1]] = occluded.permute(0, 3, 1, 2)
