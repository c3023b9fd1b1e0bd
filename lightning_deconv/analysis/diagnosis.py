"""The paper's Fig. 6 diagnosis during training: measure what Zeiler & Fergus saw, and say what they did about it.

Looking at AlexNet's features (Sec. 5, Fig. 6), the paper found first-layer filters with "little coverage of
the mid frequencies", many dead features, a few filters that dominate, and "aliasing artifacts caused by the
large stride 4 used in the 1st layer convolutions". The fixes: 7x7 first-layer filters at stride 2 instead of
11x11 at stride 4, and renormalising every filter whose RMS exceeds 0.1. :func:`measure_firing` puts numbers
on the symptoms at one firing of :class:`~lightning_deconv.callback.DeconvCallback`;
:class:`Diagnosis` turns those that cross a threshold into one-line warnings naming the layer, the value,
the threshold and the paper's remedy, once per condition and layer per run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from lightning_deconv.analysis.spectrum import aliasing, filter_spectrum
from lightning_deconv.geometry import receptive_fields

__all__ = ["Diagnosis", "FiringMeasures", "cumulative_stride", "measure_firing"]

BANDS = ("low", "mid", "high")


@dataclass(frozen=True)
class FiringMeasures:
    """The Fig. 6 measures of one firing.

    Attributes:
        first_conv: the name of the first convolution (the paper's layer-1 filters).
        spectrum: the mean over its filters of :func:`~lightning_deconv.analysis.spectrum.filter_spectrum`'s
            ``(low, mid, high)`` shares.
        filter_rms: the largest RMS of its filters (one output channel each, all inputs and taps).
        aliasing: per tracked layer, the mean :func:`~lightning_deconv.analysis.spectrum.aliasing` of its
            features' projections, on the lattice of ``period``.
        period: the lattice's period: the cumulative stride of the first convolution (``None``: unknown, no
            aliasing measured).
        dead: per tracked layer, the share of channels never positive on the probe (as the callback logs it).
    """

    first_conv: str
    spectrum: tuple[float, float, float]
    filter_rms: float
    aliasing: dict[str, float] = field(default_factory=dict)
    period: tuple[int, int] | None = None
    dead: dict[str, float] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """The new scalars, by tag: ``deconv/<first conv>/spectrum/low|mid|high`` and ``deconv/<layer>/aliasing``."""
        tags = {f"deconv/{self.first_conv}/spectrum/{band}": v for band, v in zip(BANDS, self.spectrum, strict=True)}
        tags.update({f"deconv/{layer}/aliasing": value for layer, value in self.aliasing.items()})
        return tags


def measure_firing(
    first_conv: str,
    weight: Tensor,
    projections: Mapping[str, Tensor],
    period: tuple[int, int] | None,
    dead: Mapping[str, float] | None = None,
) -> FiringMeasures:
    """The Fig. 6 measures of one firing, from the first convolution's weight and each layer's projections.

    Args:
        first_conv: the first convolution's name.
        weight: its weight ``[O, C, kh, kw]``.
        projections: per tracked layer, its features' projections in pixel space ``[K, C, H, W]``.
        period: the first convolution's cumulative stride ``(rows, cols)``; ``None`` skips the aliasing.
        dead: per layer, the share of dead channels (passed through to the diagnosis).

    Features without a share are left out of a layer's mean aliasing: non-finite projections (diverged
    features) and zero ones (dead features: nothing to project). A layer with none left has NaN aliasing.

    Example::

        >>> import torch
        >>> weight = torch.ones(4, 3, 7, 7)
        >>> lattice = torch.rand(1, 3, 2, 2).repeat(2, 1, 32, 32)  # repeats every 2 pixels
        >>> m = measure_firing("conv1", weight, {"pool2": lattice}, (2, 2))
        >>> {tag: round(value, 6) for tag, value in m.scalars().items()}
        {'deconv/conv1/spectrum/low': 1.0, 'deconv/conv1/spectrum/mid': 0.0, 'deconv/conv1/spectrum/high': 0.0, \
'deconv/pool2/aliasing': 1.0}
    """
    weight = weight.detach().float().cpu()
    shares = filter_spectrum(weight).nanmean(dim=0)
    rms = weight.flatten(1).pow(2).mean(dim=1).sqrt()
    found = {}
    if period is not None:
        for layer, images in projections.items():
            finite = images.detach().flatten(1).isfinite().all(dim=1)
            found[layer] = _mean(aliasing(images.detach().cpu()[finite.cpu()], period)) if finite.any() else math.nan
    return FiringMeasures(
        first_conv,
        tuple(float(s) for s in shares),
        float(rms.max()),
        found,
        period,
        {layer: float(v) for layer, v in (dead or {}).items()},
    )


def cumulative_stride(model: nn.Module, layer: str, input_size: Sequence[int]) -> tuple[int, int] | None:
    """The product of all strides up to and including ``layer``'s output, ``(rows, cols)``, for inputs of shape
    ``input_size = (C, H, W)`` (one dry forward of a blank image); ``None`` where the path is not traceable.

    Example::

        >>> net = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 4, 7, stride=2))
        >>> cumulative_stride(net, "1", (3, 64, 64))
        (4, 4)
    """
    found = receptive_fields(model, [layer], tuple(input_size))[layer]
    return None if found is None else found.stride


def _mean(values: Tensor) -> float:
    return float(values.double().nanmean())


@dataclass
class Diagnosis:
    """One-line warnings when a Fig. 6 measure crosses its threshold, once per condition and layer per run.

    The thresholds are rules of thumb, not the paper's (it looked, it did not measure), except the RMS radius:

    * ``mid_min`` 0.2: the first layer's mean mid-band share (between 1/6 and 1/3 cycles per pixel) below
      this is the paper's "little coverage of the mid frequencies". White-noise filters put about 0.3 there
      (0.33 at 7x7, 0.30 at 11x11), a grating of period between 3 and 6 pixels all; 0.2 is two thirds of noise.
      Remedy: smaller first-layer filters and stride.
    * ``aliasing_max`` 0.05: a layer's mean share of non-DC projection power on the first convolution's
      stride lattice above this (over ten times white noise's share at 64 px with period 4) is the paper's
      aliasing. Remedy: a smaller first-layer stride.
    * ``dead_max`` 0.25: more than a quarter of a layer's channels never positive on the probe ("dead").
      Remedy: a lower learning rate (and the filter renormalisation that keeps a few filters from dominating).
    * ``rms_max`` 0.1: the paper's radius; a first-layer filter whose RMS exceeds it can dominate. Remedy:
      renormalise such filters to 0.1 (:class:`~lightning_deconv.paper.clipping.FilterRMSClip`).

    Holds only its thresholds and which warnings it gave (picklable); :meth:`reset` forgets those for a new run.
    What it gave is not kept in checkpoints: a run resumed from one may say a warning again.

    Example::

        >>> m = FiringMeasures("conv1", (0.5, 0.05, 0.45), 0.3, {"pool2": 0.01}, (4, 4), {"pool2": 0.5})
        >>> diagnosis = Diagnosis()
        >>> for line in diagnosis.check(m, epoch=3):
        ...     print(line[:70])
        Fig. 6 diagnosis after epoch 3: conv1: mean mid-frequency share of the
        Fig. 6 diagnosis after epoch 3: conv1: largest filter RMS 0.3 > 0.1 (t
        Fig. 6 diagnosis after epoch 3: pool2: dead channels 0.5 > 0.25 (never
        >>> diagnosis.check(m, epoch=4)  # each condition once per run
        []
    """

    mid_min: float = 0.2
    aliasing_max: float = 0.05
    dead_max: float = 0.25
    rms_max: float = 0.1
    warned: set[tuple[str, str]] = field(default_factory=set)

    def reset(self) -> None:
        """Forget the warnings given (a new run)."""
        self.warned = set()

    def check(self, measures: FiringMeasures, epoch: int) -> list[str]:
        """The warnings this firing raises that were not given before in this run (each a single line)."""
        found = []
        conv = measures.first_conv
        low, mid, high = measures.spectrum
        if mid < self.mid_min:
            found.append(
                (
                    "spectrum",
                    conv,
                    f"mean mid-frequency share of the filters {mid:.3f} < {self.mid_min} (low {low:.3f}, high "
                    f"{high:.3f}): extremely high and low frequencies with little mid coverage "
                    "(the paper's Fig. 6a). Remedy: smaller first-layer filters and stride (ZFNet: 7x7 at stride 2 "
                    "instead of 11x11 at stride 4).",
                )
            )
        if measures.filter_rms > self.rms_max:
            found.append(
                (
                    "filter_rms",
                    conv,
                    f"largest filter RMS {measures.filter_rms:.3g} > {self.rms_max} (the paper's radius): a few "
                    "filters can dominate. Remedy: renormalise filters whose RMS exceeds 0.1 to 0.1 "
                    "(lightning_deconv.paper.clipping.FilterRMSClip(radius=0.1)).",
                )
            )
        stride = "x".join(map(str, measures.period or ()))
        for layer, value in measures.aliasing.items():
            if value > self.aliasing_max:
                found.append(
                    (
                        "aliasing",
                        layer,
                        f"aliasing {value:.3f} > {self.aliasing_max} (share of the projections' non-DC power on "
                        f"the {stride} stride lattice of {conv}): the stride's checkerboard (the paper's Fig. 6d). "
                        f"Remedy: a smaller stride in {conv} (ZFNet: 2 instead of AlexNet's 4).",
                    )
                )
        for layer, value in measures.dead.items():
            if value > self.dead_max:
                found.append(
                    (
                        "dead",
                        layer,
                        f"dead channels {value:.3g} > {self.dead_max} (never positive on the probe; the paper's "
                        "Fig. 6a-b). Remedy: a lower learning rate, and filter RMS renormalisation to 0.1.",
                    )
                )
        lines = []
        for condition, layer, text in found:
            if (condition, layer) not in self.warned:
                self.warned.add((condition, layer))
                lines.append(f"Fig. 6 diagnosis after epoch {epoch}: {layer}: {text}")
        return lines
