"""Rendering: projections and probe patches as pictures.

The paper shows each projection contrast-normalised, grey where the signal is zero, and cropped to the
receptive field of its activation, beside the matching patch of the probe image (Zeiler & Fergus 2014,
Fig. 2). Everything here works on ``[K, C, H, W]`` batches and returns values in ``[0, 1]`` ready for
``torchvision.utils.make_grid`` or ``save_image``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

__all__ = [
    "crop",
    "evolution_grid",
    "filter_grid",
    "normalize",
    "occlusion_grid",
    "pad_to",
    "projection_grid",
    "support_boxes",
    "top_k_grid",
]

Normalization = Literal["symmetric", "minmax"]


def normalize(images: Tensor, method: Normalization = "symmetric", eps: float = 1e-12) -> Tensor:
    """Per-image contrast normalisation to ``[0, 1]``.

    ``"symmetric"`` (the paper's figures): zero maps to mid-grey 0.5 and the largest magnitude to 0 or 1,
    so the sign of the signal stays readable. ``"minmax"``: each image's minimum to 0, maximum to 1.

    Example::

        >>> normalize(torch.tensor([[[[-1.0, 0.0, 2.0]]]])).flatten().tolist()
        [0.25, 0.5, 1.0]
    """
    if method not in ("symmetric", "minmax"):
        raise ValueError(f"Unknown normalisation {method!r}; choose 'symmetric' or 'minmax'.")
    flat = images.flatten(1)
    if method == "symmetric":
        scale = flat.abs().amax(dim=1).clamp_min(eps)
        return (images / (2 * scale.view(-1, 1, 1, 1)) + 0.5).clamp(0, 1)
    low, high = flat.amin(dim=1).view(-1, 1, 1, 1), flat.amax(dim=1).view(-1, 1, 1, 1)
    return ((images - low) / (high - low).clamp_min(eps)).clamp(0, 1)


def support_boxes(images: Tensor, rel_threshold: float = 1e-3) -> Tensor:
    """``[K, 4]`` boxes around the pixels where each projection is non-negligible.

    All boxes have the same (largest) size, centred on each support, so the crops tile into a grid.
    A pixel counts when its magnitude exceeds ``rel_threshold`` times the projection's largest.
    """
    magnitude = images.abs().amax(dim=1)  # [K, H, W]
    peak = magnitude.flatten(1).amax(dim=1).clamp_min(1e-30).view(-1, 1, 1)
    active = magnitude > rel_threshold * peak
    rows, cols = active.any(dim=2), active.any(dim=1)
    h, w = images.shape[-2:]
    spans = []
    for r, c in zip(rows, cols, strict=True):
        ri, ci = r.nonzero().flatten(), c.nonzero().flatten()
        if len(ri) == 0:
            spans.append((0, 0, h, w))
        else:
            spans.append((int(ri[0]), int(ci[0]), int(ri[-1]) + 1, int(ci[-1]) + 1))
    boxes = torch.tensor(spans)
    height = int((boxes[:, 2] - boxes[:, 0]).max())
    width = int((boxes[:, 3] - boxes[:, 1]).max())
    top = (boxes[:, 0] + boxes[:, 2] - height) // 2
    left = (boxes[:, 1] + boxes[:, 3] - width) // 2
    return torch.stack([top, left, top + height, left + width], dim=1)


def crop(images: Tensor, boxes: Tensor, fill: float = 0.0, sources: Tensor | None = None) -> Tensor:
    """Cut box ``k`` out of image ``k`` (or of image ``sources[k]``); all boxes must share one size. Parts
    outside the image get ``fill``.

    Example::

        >>> crop(torch.ones(1, 1, 4, 4), torch.tensor([[-1, -1, 2, 2]]))[0, 0].tolist()
        [[0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    """
    sizes = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1)
    if len(boxes) and not (sizes == sizes[0]).all():
        raise ValueError("All crop boxes must have the same size so that the crops tile into one batch.")
    h, w = images.shape[-2:]
    height, width = (int(s) for s in sizes[0]) if len(boxes) else (0, 0)
    # Pad once by the most any box reaches outside, then every box is a plain slice.
    margin = max(0, int(-boxes[:, :2].min()), int(boxes[:, 2].max()) - h, int(boxes[:, 3].max()) - w)
    padded = F.pad(images, (margin,) * 4, value=fill) if margin else images
    rows = range(len(boxes)) if sources is None else sources.tolist()
    out = [
        padded[k, :, top + margin : top + margin + height, left + margin : left + margin + width]
        for k, (top, left) in zip(rows, boxes[:, :2].tolist(), strict=True)
    ]
    return torch.stack(out) if out else images.new_zeros(0, images.shape[1], height, width)


def projection_grid(
    projections: Tensor,
    patches: Tensor | None = None,
    method: Normalization = "symmetric",
    nrow: int = 8,
    padding: int = 2,
) -> Tensor:
    """Tile projections (each normalised) into one ``[3, H, W]`` picture with ``make_grid``.

    With ``patches`` (the matching probe-image crops, same shape), each projection is shown with its
    patch to the right, as in the paper's Figure 2.
    """
    cells = normalize(projections, method)
    if patches is not None:
        cells = torch.cat([cells, normalize(patches, "minmax")], dim=3)
    return make_grid(cells, nrow=nrow, padding=padding, pad_value=1.0)


def filter_grid(weight: Tensor, nrow: int | None = None, min_cell: int = 21) -> Tensor:
    """First-layer filters ``[K, 1 or 3, h, w]`` as one ``[3, H, W]`` picture, each filter contrast-normalised on
    its own (as the paper's Fig. 6) and enlarged to at least ``min_cell`` pixels."""
    cells = normalize(weight.detach().float().cpu(), "minmax")
    if (scale := -(-min_cell // max(cells.shape[-2:]))) > 1:
        cells = F.interpolate(cells, scale_factor=scale, mode="nearest")
    return make_grid(cells, nrow=nrow or max(1, int(len(cells) ** 0.5 + 0.999)), padding=1, pad_value=1.0)


# matplotlib's viridis at 17 even steps (linearly interpolated: within 0.021 of its 256 colours, tested) and its
# tab20 palette, so that the library draws the occlusion maps without needing matplotlib.
_VIRIDIS = (
    (0.2670, 0.0049, 0.3294), (0.2823, 0.0950, 0.4173), (0.2788, 0.1755, 0.4834), (0.2590, 0.2515, 0.5247),
    (0.2297, 0.3224, 0.5457), (0.1994, 0.3876, 0.5546), (0.1727, 0.4488, 0.5579), (0.1490, 0.5081, 0.5573),
    (0.1276, 0.5669, 0.5506), (0.1206, 0.6258, 0.5335), (0.1579, 0.6838, 0.5017), (0.2461, 0.7389, 0.4520),
    (0.3692, 0.7889, 0.3829), (0.5160, 0.8312, 0.2943), (0.6785, 0.8637, 0.1895), (0.8456, 0.8873, 0.0997),
    (0.9932, 0.9062, 0.1439),
)  # fmt: skip
_TAB20 = (
    (0.1216, 0.4667, 0.7059), (0.6824, 0.7804, 0.9098), (1.0000, 0.4980, 0.0549), (1.0000, 0.7333, 0.4706),
    (0.1725, 0.6275, 0.1725), (0.5961, 0.8745, 0.5412), (0.8392, 0.1529, 0.1569), (1.0000, 0.5961, 0.5882),
    (0.5804, 0.4039, 0.7412), (0.7725, 0.6902, 0.8353), (0.5490, 0.3373, 0.2941), (0.7686, 0.6118, 0.5804),
    (0.8902, 0.4667, 0.7608), (0.9686, 0.7137, 0.8235), (0.4980, 0.4980, 0.4980), (0.7804, 0.7804, 0.7804),
    (0.7373, 0.7412, 0.1333), (0.8588, 0.8588, 0.5529), (0.0902, 0.7451, 0.8118), (0.6196, 0.8549, 0.8980),
)  # fmt: skip


def _viridis(maps: Tensor, low: float | None = None, high: float | None = None) -> Tensor:
    """``[N, h, w]`` values to ``[N, 3, h, w]`` viridis colours, scaled per map (or from ``low..high``)."""
    maps = maps.detach().double().cpu()
    if low is None:
        flat = maps.flatten(1)
        lo, hi = flat.amin(dim=1).view(-1, 1, 1), flat.amax(dim=1).view(-1, 1, 1)
        maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
    else:
        maps = (maps - low) / max(high - low, 1e-12)
    table = torch.tensor(_VIRIDIS, dtype=torch.float64)
    place = maps.clamp(0, 1) * (len(table) - 1)
    below = place.floor().long().clamp(max=len(table) - 2)
    weight = (place - below).unsqueeze(-1)
    colours = table[below] * (1 - weight) + table[below + 1] * weight
    return colours.permute(0, 3, 1, 2).float()


def _classes(labels: Tensor) -> Tensor:
    """``[N, h, w]`` class indices to ``[N, 3, h, w]`` colours of the tab20 palette (index modulo 20)."""
    table = torch.tensor(_TAB20)
    return table[labels.detach().long().cpu().remainder(20)].permute(0, 3, 1, 2)


def occlusion_grid(images: Tensor, feature: Tensor | None, probability: Tensor | None, label: Tensor | None) -> Tensor:
    """The paper's Fig. 7 panels as one picture: a row per image with the image, then (where given) the
    layer's summed feature map, the probability of the target class and the most probable class, each as a
    function of the grey square's position, enlarged to the image's size."""
    size = tuple(images.shape[-2:])
    cells = [normalize(images.float().cpu(), "minmax").expand(-1, 3, -1, -1)]
    if feature is not None:
        cells.append(_viridis(feature))
    if probability is not None:
        cells.append(_viridis(probability, 0.0, 1.0))
    if label is not None:
        cells.append(_classes(label))
    cells = [cells[0]] + [F.interpolate(c, size=size, mode="nearest") for c in cells[1:]]
    return make_grid(torch.stack(cells, dim=1).flatten(0, 1), nrow=len(cells), padding=2, pad_value=1.0)


_HEADER, _SIDE = 18, 44  # label strip sizes in pixels


def _label_strip(labels: Sequence[str], cell: int, pad: int, height: int, vertical: bool = False) -> Tensor:
    """A white strip with one dark label per cell (a header row, or a column when ``vertical``)."""
    length = len(labels) * (cell + pad) + pad
    strip = Image.new("RGB", (height, length) if vertical else (length, height), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=max(9, min(14, height - 4)))
    for i, label in enumerate(labels):
        middle = pad + i * (cell + pad) + cell / 2
        xy = (height / 2, middle) if vertical else (middle, height / 2)
        draw.text(xy, label, fill=(40, 40, 40), font=font, anchor="mm")
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255


def _resize(cells: Tensor, cell_size: int | None, min_cell: int) -> Tensor:
    """``cells`` at ``cell_size`` rows (aspect kept; nearest up, area down), else enlarged (nearest, by a whole
    factor) to at least ``min_cell`` pixels so that small receptive fields stay visible."""
    if cell_size is not None:
        side = (cell_size, cell_size * cells.shape[-1] // cells.shape[-2])
        return F.interpolate(cells, size=side, mode="nearest" if cell_size >= cells.shape[-2] else "area")
    if (scale := -(-min_cell // max(cells.shape[-2:]))) > 1:
        return F.interpolate(cells, scale_factor=scale, mode="nearest")
    return cells


def _marked_cell(word: str, height: int, width: int) -> Tensor:
    """A pale red ``[3, height, width]`` cell with ``word`` in its middle."""
    cell = Image.new("RGB", (width, height), (245, 215, 215))
    font = ImageFont.load_default(size=max(8, min(12, width // max(1, len(word)))))
    ImageDraw.Draw(cell).text((width / 2, height / 2), word, fill=(120, 20, 20), font=font, anchor="mm")
    return torch.from_numpy(np.asarray(cell).copy()).permute(2, 0, 1).float() / 255


PAD_COLOUR = (0.80, 0.86, 0.94)  # pale blue: where a smaller crop was padded, distinct from any normalised value


def pad_to(cells: Tensor, height: int, width: int) -> Tensor:
    """``[K, C, h, w]`` cells centred in ``height x width`` cells, the margin filled with :data:`PAD_COLOUR`
    (grey for one-channel cells), so that crops of different sizes share one grid without being resized.

    Example::

        >>> pad_to(torch.zeros(1, 3, 1, 1), 3, 3)[0, :, 1, 1].tolist(), pad_to(torch.zeros(1, 3, 1, 1), 3, 3).shape
        ([0.0, 0.0, 0.0], torch.Size([1, 3, 3, 3]))
    """
    h, w = cells.shape[-2:]
    if (h, w) == (height, width):
        return cells
    if h > height or w > width:
        raise ValueError(f"Cannot pad {h}x{w} cells into {height}x{width}.")
    colour = torch.tensor(PAD_COLOUR if cells.shape[1] == 3 else (sum(PAD_COLOUR) / 3,) * cells.shape[1])
    out = colour.to(cells).view(1, -1, 1, 1).expand(len(cells), -1, height, width).clone()
    top, left = (height - h) // 2, (width - w) // 2
    out[..., top : top + h, left : left + w] = cells
    return out


def evolution_grid(
    columns: Sequence[Tensor],
    column_labels: Sequence[str],
    row_labels: Sequence[str] | None = None,
    patches: Sequence[Tensor] | None = None,
    method: Normalization = "symmetric",
    min_cell: int = 48,
    padding: int = 2,
    cell_size: int | None = None,
    marks: Sequence[Sequence[str | None]] | None = None,
) -> Tensor:
    """Feature evolution as one labelled ``[3, H, W]`` picture: rows = features, columns = snapshots.

    ``columns[e]`` holds the ``[K, C, h, w]`` cells of snapshot ``e`` (e.g. cropped projections after
    epoch ``column_labels[e]``), each normalised on its own as in the paper's Figure 4. Small cells are
    enlarged (nearest neighbour) to at least ``min_cell`` pixels so that the labels stay readable. With
    ``patches`` (one ``[K, C, h, w]`` per column), each cell shows its probe-image patch to the right.
    Columns may hold crops of different sizes (support crops change between firings): every cell is laid out
    at the largest size, smaller crops centred and padded with :data:`PAD_COLOUR`, their pixels untouched.
    ``cell_size`` resizes every (square) cell to exactly that many pixels, so grids of layers with different
    receptive fields line up side by side. ``marks[e][k]``, where not ``None``, replaces cell ``(k, e)`` by a
    tinted cell showing that word (e.g. ``"dead"`` for a feature with no positive activation on the probe).
    """
    if len(columns) != len(column_labels) or not columns:
        raise ValueError("Give one label per column and at least one column.")
    height = max(c.shape[-2] for c in columns)
    width = max(c.shape[-1] for c in columns)
    shown = [pad_to(normalize(c.float(), method), height, width) for c in columns]
    if patches is not None:
        shown = [
            torch.cat([s, pad_to(normalize(p.float(), "minmax"), height, width)], dim=3)
            for s, p in zip(shown, patches, strict=True)
        ]
    cells = torch.stack(shown, dim=1)  # [K, E, C, h, w]
    e = cells.shape[1]
    cells = cells.flatten(0, 1)
    if cells.shape[1] == 1:
        cells = cells.expand(-1, 3, -1, -1)
    cells = _resize(cells, cell_size, min_cell)
    cell_h, cell_w = cells.shape[-2:]
    if marks is not None:
        cells = cells.clone()  # it may be an expanded (read-only) view
        for column, column_marks in enumerate(marks):
            for row, mark in enumerate(column_marks):
                if mark:
                    cells[row * e + column] = _marked_cell(mark, cell_h, cell_w)
    grid = make_grid(cells, nrow=e, padding=padding, pad_value=1.0)
    header = _label_strip(column_labels, cell_w, padding, _HEADER)
    grid = torch.cat([header, grid], dim=1)
    if row_labels is not None:
        side = _label_strip(row_labels, cell_h, padding, _SIDE, vertical=True)
        side = torch.cat([torch.ones(3, _HEADER, _SIDE), side], dim=1)
        grid = torch.cat([side, grid], dim=2)
    return grid


def top_k_grid(
    crops: Tensor,
    patches: Tensor | None = None,
    method: Normalization = "symmetric",
    min_cell: int = 32,
    padding: int = 1,
    gap: int = 6,
    cell_size: int | None = None,
) -> Tensor:
    """One layer of the paper's Figure 2 as a ``[3, H, W]`` picture: per feature, its top ``k`` projections as
    a square block (3 x 3 for ``k = 9``, strongest first, row by row) beside the same block of their image
    patches; features stacked top to bottom, ``gap`` white pixels apart.

    Args:
        crops: ``[F, k, C, h, w]`` projections cut to their receptive fields; each normalised on its own.
        patches: ``[F, k, C, h, w]`` the same boxes of the images (min-max normalised), or ``None``.
        min_cell: small cells are enlarged (nearest neighbour) to at least this many pixels.
        cell_size: resize every cell to exactly this many pixels (so that layers line up).

    Example::

        >>> top_k_grid(torch.randn(2, 9, 3, 7, 7), torch.rand(2, 9, 3, 7, 7), min_cell=7).shape
        torch.Size([3, 68, 68])
    """
    k = crops.shape[1]
    side = math.ceil(math.sqrt(k))
    shown = [normalize(crops.flatten(0, 1).float(), method)]
    if patches is not None:
        shown.append(normalize(patches.flatten(0, 1).float(), "minmax"))
    blocks = []  # per kind (projections, patches): per feature, its square block
    for cells in shown:
        cells = _resize(cells.expand(-1, 3, -1, -1) if cells.shape[1] == 1 else cells, cell_size, min_cell)
        blocks.append([make_grid(c, nrow=side, padding=padding, pad_value=1.0) for c in cells.split(k)])
    white = torch.ones(3, blocks[0][0].shape[1], gap)
    features = [
        torch.cat([x for block in kinds for x in (white, block)][1:], dim=2) for kinds in zip(*blocks, strict=True)
    ]
    return make_grid(torch.stack(features), nrow=1, padding=gap, pad_value=1.0)
