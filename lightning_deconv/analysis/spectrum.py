r"""What Zeiler & Fergus saw in Fig. 6, as numbers: first-layer filter spectra and stride aliasing.

The paper (Sec. 5) found AlexNet's first-layer filters "a mix of extremely high and low frequency information,
with little coverage of the mid frequencies", and its second-layer projections marked by "aliasing artifacts
caused by the large stride 4 used in the 1st layer convolutions". Two measures put numbers on these:

* :func:`filter_spectrum`: each filter's share of spectral power in a low, a mid and a high band of radial
  frequency (cycles per pixel).
* :func:`aliasing`: each image's share of its non-DC spectral power on the frequency lattice of a stride,
  where the regular pattern a strided layer prints into its transposed projection (the checkerboard) lives.

Both use the plain DFT over the given samples, without zero padding: the DFT is an orthogonal change of basis
(Parseval), so the shares split the signal's energy exactly into sinusoids, and inputs with known spectra
give exact answers (a constant filter is all low, a checkerboard all high, a periodic image all lattice).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BAND_EDGES", "aliasing", "filter_spectrum", "lattice_mask", "radial_frequency"]

BAND_EDGES: tuple[float, float] = (1 / 6, 1 / 3)
"""The default band edges, in cycles per pixel: the radial range up to the Nyquist frequency of one axis
(1/2) cut in thirds. Low: periods longer than 6 pixels; high: periods of 3 pixels or shorter."""


def radial_frequency(height: int, width: int) -> Tensor:
    """``[height, width]`` radial frequency in cycles per pixel of each DFT bin (in ``torch.fft.fft2`` order),
    each axis's frequency taken in ``[-1/2, 1/2)``.

    Example::

        >>> radial_frequency(4, 4)[2, 2].item() == 0.5 * 2**0.5  # the checkerboard's bin
        True
    """
    rows = torch.fft.fftfreq(height, dtype=torch.float64)
    cols = torch.fft.fftfreq(width, dtype=torch.float64)
    return torch.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2)


def filter_spectrum(weight: Tensor, edges: tuple[float, float] = BAND_EDGES) -> Tensor:
    r"""Each filter's share of spectral power in the low, mid and high bands: ``[O, 3]``, rows summing to 1.

    For a filter :math:`w_{o}` (``weight[o]``, ``C`` input channels of ``kh x kw`` taps) the power at bin
    :math:`k` is :math:`P_o(k) = \sum_c |\mathrm{DFT}(w_{o,c})(k)|^2` (the input channels' spectra added), and
    the bands are those of the bin's radial frequency :math:`r(k)` (:func:`radial_frequency`): low
    :math:`r < \text{edges}[0]` (DC included), mid in between, high :math:`r \ge \text{edges}[1]`.

    The DFT is taken at the filter's own size, without zero padding. Its ``kh x kw`` sinusoids are an orthogonal
    basis of the filter's taps, so by Parseval the three shares split the filter's energy exactly. Zero padding
    would only interpolate the same spectrum (it adds no information) and smear it: a constant 7x7 filter,
    padded, is a box whose Dirichlet-kernel side lobes would put part of its power in the mid and high bands.
    The price is a coarse grid (``k / kh`` cycles per pixel), so bands are counts of bins; with the default
    edges white noise puts 10 / 33 / 57 % of its power in the three bands of a 7x7 filter and
    7 / 30 / 63 % in those of an 11x11 one (the continuous plane: 9 / 26 / 65 %).

    A filter of all zeros has no spectrum: its row is NaN.

    Args:
        weight: a convolution's weight ``[O, C, kh, kw]``.
        edges: ``(low, high)`` band edges in cycles per pixel, ``0 < low <= high``.

    Example::

        >>> flat = torch.ones(2, 3, 7, 7)
        >>> filter_spectrum(flat)
        tensor([[1., 0., 0.],
                [1., 0., 0.]])
        >>> checkerboard = (-1.0) ** (torch.arange(8)[:, None] + torch.arange(8)[None, :])
        >>> filter_spectrum(checkerboard.expand(1, 3, 8, 8))
        tensor([[0., 0., 1.]])
    """
    if weight.dim() != 4:
        raise ValueError(f"filter_spectrum needs a conv weight [O, C, kh, kw], got shape {tuple(weight.shape)}.")
    low, high = (float(e) for e in edges)
    if not 0 < low <= high:
        raise ValueError(f"`edges` must be (low, high) cycles per pixel with 0 < low <= high, got {edges!r}.")
    power = _power(weight)  # [O, kh, kw]
    radius = radial_frequency(*weight.shape[-2:]).to(power.device)
    bands = torch.stack([radius < low, (radius >= low) & (radius < high), radius >= high])  # [3, kh, kw]
    per_band = (power[:, None] * bands[None]).flatten(2).sum(dim=2)  # [O, 3]
    total = power.flatten(1).sum(dim=1, keepdim=True)
    return (per_band / total).where(total > 0, torch.full_like(per_band, math.nan)).to(_float(weight))


def lattice_mask(height: int, width: int, period: int | tuple[int, int]) -> Tensor:
    """``[height, width]`` boolean mask (``torch.fft.fft2`` order) of the non-DC bins on the lattice of
    ``period``: frequencies ``(a / period_rows, b / period_cols)`` for integers ``a, b`` not both 0. Both sides
    must be multiples of their period, so that every lattice frequency is a bin.

    Example::

        >>> lattice_mask(4, 4, 2).nonzero().tolist()  # (0, 1/2), (1/2, 0), (1/2, 1/2) cycles per pixel
        [[0, 2], [2, 0], [2, 2]]
    """
    rows, cols = _pair(period)
    if height % rows or width % cols:
        raise ValueError(f"The sides {height}x{width} must be multiples of the period {rows}x{cols}.")
    on_rows = torch.arange(height) % (height // rows) == 0  # bins u with u / height a multiple of 1 / rows
    on_cols = torch.arange(width) % (width // cols) == 0
    mask = on_rows[:, None] & on_cols[None, :]
    mask[0, 0] = False
    return mask


def aliasing(images: Tensor, period: int | tuple[int, int]) -> Tensor:
    r"""Each image's share of its non-DC spectral power on the lattice of ``period``: ``[N]``, in ``[0, 1]``.

    A transposed strided convolution (the deconvnet's step back through a layer of stride ``s``) places a
    copy of the filter every ``s`` pixels, and where the copies overlap unevenly they print a pattern that
    repeats every ``s`` pixels: the checkerboard of the paper's Fig. 6(d). An image that repeats with period
    :math:`p` along both axes has all its spectrum on the frequencies :math:`(a/p, b/p)`, :math:`a, b`
    integers; smooth content has almost none there (the lowest lattice frequency is :math:`1/p` cycles per
    pixel), and white noise has the lattice's share of the bins. So, with
    :math:`P(k) = \sum_c |\mathrm{DFT}(x_c)(k)|^2` (channels' spectra added),

    .. math::

        \mathrm{aliasing}(x) = \frac{\sum_{k \in L \setminus \{0\}} P(k)}{\sum_{k \neq 0} P(k)},
        \qquad L = \{(a / p_h, b / p_w) : a, b \in \mathbb{Z}\},

    the DC term (the mean brightness) left out of both sums. It is 1 for an image that repeats with the
    period, near 0 for a smooth one, and :math:`(p_h p_w - 1) / (H W - 1)` on average for white noise
    (0.37 % for a 64 x 64 image and ``period=4``): a projection well above that carries the stride's pattern.

    The DFT is taken without zero padding (which would break the periodicity it looks for), over the top-left
    ``H - H mod p_h`` rows and ``W - W mod p_w`` columns, so that every lattice frequency is a bin. An image
    without non-DC power (a constant one) has no share: NaN.

    Args:
        images: ``[N, C, H, W]`` (e.g. projections in pixel space).
        period: the lattice's period in pixels, one int or ``(rows, cols)``: the cumulative stride of the layer
            whose pattern is looked for (for the paper's symptom, the first convolution's).

    Example::

        >>> tile = torch.rand(1, 3, 4, 4)
        >>> round(aliasing(tile.repeat(1, 1, 16, 16), period=4).item(), 6)
        1.0
    """
    if images.dim() != 4:
        raise ValueError(f"aliasing needs images [N, C, H, W], got shape {tuple(images.shape)}.")
    rows, cols = _pair(period)
    height, width = images.shape[-2] // rows * rows, images.shape[-1] // cols * cols
    if height == 0 or width == 0:
        raise ValueError(f"Images of {tuple(images.shape[-2:])} pixels are smaller than the period {rows}x{cols}.")
    power = _power(images[..., :height, :width])  # [N, H, W]
    on_lattice = power[:, lattice_mask(height, width, (rows, cols)).to(power.device)].sum(dim=1)
    non_dc = power.flatten(1).sum(dim=1) - power[:, 0, 0]
    share = (on_lattice / non_dc).where(non_dc > 0, torch.full_like(non_dc, math.nan))
    return share.clamp(0, 1).to(_float(images))


def _power(x: Tensor) -> Tensor:
    """``|DFT|^2`` over the last two axes of ``x [N, C, H, W]``, summed over ``C``, in float64. Bins below
    1e-24 of their item's total are rounding (a constant's non-DC bins come out near 1e-32) and are set to 0,
    so that exact answers are exactly 0 or 1."""
    power = torch.fft.fft2(x.detach().double()).abs().pow(2).sum(dim=1)
    total = power.flatten(1).sum(dim=1)[:, None, None]
    return power.where(power > 1e-24 * total, torch.zeros_like(power))


def _pair(period: int | tuple[int, int]) -> tuple[int, int]:
    rows, cols = (period, period) if isinstance(period, int) else (int(period[0]), int(period[1]))
    if rows < 1 or cols < 1:
        raise ValueError(f"`period` must be a positive number of pixels, got {period!r}.")
    return rows, cols


def _float(tensor: Tensor) -> torch.dtype:
    return tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype()
