"""The geometry of occlusion cones: the layers a cone passes through, the rows each square position changes, and
how positions are grouped into batches (used by :class:`~lightning_deconv.analysis.cones.Cones`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


_WASTE = 1.15  # groups of positions (Cones.groups) may cost this much more than exact cones


@dataclass(frozen=True)
class ChainLayer:
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


def unit_cost(layer: ChainLayer) -> int:
    """A rough cost of one output value per channel: its multiply-accumulates (a convolution) or its window."""
    if isinstance(layer.module, nn.Conv2d):
        return conv_macs(layer.module)
    return 1 if layer.window is None else layer.window[0][0] * layer.window[0][1]


def conv_macs(module: nn.Conv2d) -> int:
    """Multiply-accumulates per output value of a convolution."""
    return module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]


def layer_kind(module: nn.Module) -> str | None:
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


def cone_rows(first: Tensor, end: Tensor, layer: ChainLayer, axis: int) -> tuple[Tensor, Tensor]:
    """The output rows ``[first, end)`` that change when input rows ``[first, end)`` change (per position)."""
    extent, stride, padding = (value[axis] for value in layer.window)
    low = torch.div(first + padding - extent, stride, rounding_mode="floor") + 1
    high = -torch.div(-(end + padding), stride, rounding_mode="floor")
    return low.clamp(min=0), high.clamp(max=layer.out_size[axis])


@dataclass(frozen=True)
class Axis:
    """Along one axis of one layer's output, the rows ``[first, end)`` each position of the square changes."""

    first: Tensor
    end: Tensor

    @property
    def size(self) -> int:
        """The largest cone's extent."""
        return int((self.end - self.first).max())


def group_positions(
    layers: list[ChainLayer], axes: list[tuple[Axis, Axis]], switch: int, axis: int, most: int, device: torch.device
) -> tuple[Tensor, list[list[int]]]:
    """Along ``axis``, ``(group [R], extents [G, switch])``: a group for each row (column) of square positions and
    the tile extents its members share in each layer below ``switch``, as few groups as waste little.

    A group's extent is its members' largest cone, so squares of one group run as one batch; one group
    for all wastes work where the cones differ (at the borders, or where the square's stride is not a
    multiple of a layer's); each group more is one more run of every layer, dozens of small ops. The rows
    sorted by their cones' cost are cut into at most ``most`` runs, the fewest that cost within
    ``_WASTE`` (15%) of exact cones. On ZFNet at 224 px that is 2 groups per axis for squares of 48 and 16
    pixels; 5% gave 3 and 4, which ran 1.1 to 1.8x slower on two cores shared with other jobs (each op can
    wait there for a descheduled thread).
    """
    other = 1 - axis
    extents = torch.stack([(a[axis].end - a[axis].first) for a in axes[:switch]], dim=1).cpu()
    weights = torch.tensor(
        [
            float((a[other].end - a[other].first).double().mean()) * layer.out_channels * unit_cost(layer)
            for layer, a in zip(layers[:switch], axes, strict=False)
        ],
        dtype=torch.float64,
    )
    order = (extents.double() @ weights).argsort()
    ranked = extents[order]

    def cost(i: int, j: int, ranked: Tensor = ranked, weights: Tensor = weights) -> float:  # rows i..j-1
        return (j - i) * float(ranked[i:j].amax(dim=0).double() @ weights)

    rows = len(ranked)
    exact = float((ranked.double() @ weights).sum())
    best: dict[tuple[int, int], tuple[float, list[int]]] = {(0, 0): (0.0, [])}  # (groups, rows) -> cuts
    choice = None
    for groups in range(1, min(most, rows) + 1):
        for j in range(1, rows + 1):
            options = [
                (best[groups - 1, i][0] + cost(i, j), [*best[groups - 1, i][1], j])
                for i in range(j)
                if (groups - 1, i) in best
            ]
            if options:
                best[groups, j] = min(options, key=lambda option: option[0])
        choice = best[groups, rows][1]
        if best[groups, rows][0] <= _WASTE * exact:
            break
    group = torch.empty(rows, dtype=torch.long)
    sizes = []
    for number, (i, j) in enumerate(zip([0, *choice[:-1]], choice, strict=True)):
        group[order[i:j]] = number
        sizes.append(ranked[i:j].amax(dim=0))
    return group.to(device), torch.stack(sizes).tolist()
