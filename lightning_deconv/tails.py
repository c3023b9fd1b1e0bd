"""Skipping the forward pass where the deconvnet does not need it.

Under the deconvnet rule the backward pass of a ReLU rectifies the signal itself and the backward pass of a
convolution is its transposed filter: neither looks at the forward values. So a plain stretch of ``Conv2d`` and
``ReLU`` modules that ends at the projected map (ZFNet's conv3 ... relu5, VGG's convolutions after its last
pooling) needs no forward pass. A projection can run the model only as far as the module just before the
stretch (the last one whose backward needs values: a pooling's switches, a normalisation's inputs) and send
the seed down the stretch by hand, transposed filter by transposed filter: the paper's own recipe.
:class:`~lightning_deconv.engine.Projector` uses the shortcut only where its own forward pass showed that the
model runs the stretch as one chain (each module fed exactly the previous one's output).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_deconv.layers import named_layers

__all__ = ["Tail", "find_tail", "recording_links"]


def _plain(module: nn.Module) -> bool:
    """A module whose backward pass, under the deconvnet rule, does not depend on its forward values."""
    if type(module) is nn.ReLU:
        return True
    return (
        type(module) is nn.Conv2d
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.groups == 1
    )


@dataclass(frozen=True)
class Tail:
    """A plain stretch of ``Conv2d``/``ReLU`` modules ending at a projected map.

    Attributes:
        before: the name of the module whose output the stretch takes (the forward stops there).
        entry: that module.
        modules: the stretch, in forward order.
    """

    before: str
    entry: nn.Module
    modules: tuple[nn.Module, ...]

    def ran_as_chain(self, links: dict[nn.Module, tuple[Any, Any]], consumer: nn.Module | None = None) -> bool:
        """Whether a forward pass recorded by :func:`recording_links` ran the stretch as one chain: each module
        fed exactly the previous one's output (the entry's, first), and ``consumer`` (if given) the last's."""
        chain = [self.entry, *self.modules, *([consumer] if consumer is not None else [])]
        if any(module not in links for module in chain):
            return False
        return all(links[after][0] is links[first][1] for first, after in pairwise(chain))

    def shapes(self, entry: torch.Size) -> list[torch.Size]:
        """The map's shape before each module of the stretch, then after the last (``entry``: before the first)."""
        shapes = [torch.Size(entry)]
        for module in self.modules:
            n, _, h, w = shapes[-1]
            if isinstance(module, nn.Conv2d):
                size = [
                    (side + 2 * p - d * (k - 1) - 1) // s + 1
                    for side, p, d, k, s in zip(
                        (h, w), module.padding, module.dilation, module.kernel_size, module.stride, strict=True
                    )
                ]
                shapes.append(torch.Size([n, module.out_channels, *size]))
            else:
                shapes.append(shapes[-1])
        return shapes

    def down(
        self,
        value: Tensor,
        channels: Tensor,
        position: Tensor,
        entry: torch.Size,
        filters: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """The deconvnet's backward pass of the stretch, one unit per row: row ``i`` seeded with ``value[i]`` at
        channel ``channels[i]``, ``position[i]`` (row, col) of the stretch's end, sent down to its entry
        (``[K, C, H, W]`` of shape ``entry``). ``filters`` gives each convolution's weight as the pass lays it out
        (e.g. :meth:`~lightning_deconv.kernels.FastCPUOps.filters`, which copies it once per pass).

        Each row runs on its unit's support only: one pixel at the end, widened by each transposed filter (run
        without padding, so nothing is cut) and then kept inside that map's borders, which is what the padded
        transposed filter of the whole map computes there; the whole map outside the support stays zero.
        """
        shapes = self.shapes(entry)
        device, rows = value.device, torch.arange(len(value), device=value.device)
        layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format  # oneDNN's
        # The supports first (they depend on the positions only), so that nothing but a mask and a rectification
        # runs between the transposed filters below: small ops between convolutions run several times slower.
        steps: list[tuple[nn.Conv2d, Tensor, Tensor] | None] = []  # per module, bottom up; None for a ReLU
        start = position.to(device).long()  # each row's support: its top-left corner in the current map
        size = (1, 1)  # the support's size
        for module, shape in zip(reversed(self.modules), reversed(shapes[:-1]), strict=True):
            if isinstance(module, nn.ReLU):
                steps.append(None)
                continue
            weight = filters(module.weight) if filters else module.weight.detach().contiguous(memory_format=layout)
            geometry = zip(size, module.stride, module.dilation, module.kernel_size, strict=True)
            size = tuple((side - 1) * s + d * (k - 1) + 1 for side, s, d, k in geometry)
            start = start * torch.tensor(module.stride, device=device) - torch.tensor(module.padding, device=device)
            steps.append((module, weight.to(value.dtype), ~_inside(start, size, shape[-2:])))
        signal = torch.zeros(len(value), shapes[-1][1], 1, 1, dtype=value.dtype, device=device)
        signal[rows, channels.to(device), 0, 0] = value
        for step in steps:
            if step is None:
                signal = signal.clamp(min=0)  # rectify the signal itself
                continue
            module, weight, outside = step
            signal = F.conv_transpose2d(
                signal.contiguous(memory_format=layout), weight, None, module.stride, 0, 0, 1, module.dilation
            )
            signal = signal.masked_fill(outside, 0)
        # Paste each row's support at its place, on a canvas wide enough that every support fits whole (what
        # lies outside the map is zero already), laid out as ``layout``: [K, H, W, C] is channels-last.
        (height, width), (h, w) = entry[-2:], signal.shape[-2:]
        n, c = entry[:2]
        canvas = torch.zeros(n, height + 2 * h, width + 2 * w, c, dtype=value.dtype, device=device)
        ys = (start[:, 0, None] + h + torch.arange(h, device=device))[:, :, None]
        xs = (start[:, 1, None] + w + torch.arange(w, device=device))[:, None, :]
        canvas[rows[:, None, None], ys, xs] = signal.permute(0, 2, 3, 1)
        entered = canvas[:, h : h + height, w : w + width].permute(0, 3, 1, 2)
        return entered.contiguous(memory_format=layout)


def _inside(start: Tensor, size: Sequence[int], bounds: Sequence[int]) -> Tensor:
    """``[K, 1, h, w]``: which pixels of each row's ``size`` support, at ``start`` ``[K, 2]``, lie inside a map
    of ``bounds`` (height, width)."""
    masks = []
    for axis in range(2):
        at = start[:, axis, None] + torch.arange(size[axis], device=start.device)
        masks.append((at >= 0) & (at < bounds[axis]))
    return masks[0][:, None, :, None] & masks[1][:, None, None, :]


def find_tail(model: nn.Module, layer: str, at_input: bool) -> Tail | None:
    """The plain stretch that ends at ``layer``'s output (or, ``at_input``, just before ``layer``), inside the
    ``nn.Sequential`` holding ``layer``; ``None`` where there is none (or nothing runs before it there)."""
    parent_name, _, child = layer.rpartition(".")
    parent = named_layers(model).get(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential) or child not in parent._modules:
        return None
    names = list(parent._modules)
    end = names.index(child) + (0 if at_input else 1)
    start = end
    while start > 0 and _plain(parent._modules[names[start - 1]]):
        start -= 1
    if start == end or start == 0 or not any(isinstance(parent._modules[n], nn.Conv2d) for n in names[start:end]):
        return None
    before = names[start - 1]
    return Tail(
        f"{parent_name}.{before}" if parent_name else before,
        parent._modules[before],
        tuple(parent._modules[n] for n in names[start:end]),
    )


@contextlib.contextmanager
def recording_links(modules: Iterable[nn.Module]) -> Iterator[dict[nn.Module, tuple[Any, Any]]]:
    """While active, each module's first ``(input, output)`` of the forward pass (the tensors themselves, so
    that who fed whom can be told by identity)."""
    links: dict[nn.Module, tuple[Any, Any]] = {}

    def record(module: nn.Module, inputs: tuple, output: Any) -> None:
        if module not in links and inputs:
            links[module] = (inputs[0], output)

    handles = [module.register_forward_hook(record) for module in set(modules)]
    try:
        yield links
    finally:
        for handle in handles:
            handle.remove()
