"""The measures a firing adds to its projections: settling, dead channels, drift, the first layer's filters, Fig. 6.

:class:`Measures` is the piece of :class:`~lightning_deconv.callback.DeconvCallback` that turns one firing (its
projections and the maxima pass's channel peaks and Gram matrices) into scalars, and keeps what the next firing
compares against: each layer's last Gram matrix. The definitions live in :mod:`lightning_deconv.analysis.settling`,
:mod:`~lightning_deconv.analysis.spectrum` and :mod:`~lightning_deconv.analysis.diagnosis`; this only applies them to
a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_deconv._compat import rank_zero_warn
from lightning_deconv.analysis.diagnosis import Diagnosis, FiringMeasures, cumulative_stride, measure_firing
from lightning_deconv.analysis.settling import cka_from_grams, dead_share, drift
from lightning_deconv.layers import named_layers
from lightning_deconv.monitoring import Sink
from lightning_deconv.render import filter_grid
from lightning_deconv.stages import Trace

__all__ = ["CHARTS", "Measures"]

CHARTS: dict[str, str] = {  # TensorBoard's custom-scalars layout: chart title -> tag (a line per layer)
    "layer settling: linear CKA to the previous firing": "cka_previous",
    "dead features: share of channels never positive on the probe": "dead",
    "feature drift: mean 1 - cosine of projections since the previous firing": "drift",
    "share of features whose strongest probe image changed": "source_changed",
    "first-layer filters: mean share of spectral power, low / mid / high band": "spectrum/.*",
    "aliasing: share of the projections' power on the first conv's stride lattice": "aliasing",
}


class Measures:
    """Per firing: each layer's settling (linear CKA to the previous firing), dead channels and features' drift; the
    first convolution's filters (a picture and an RMS histogram) and the Fig. 6 spectrum and aliasing, with the
    :class:`~lightning_deconv.analysis.diagnosis.Diagnosis` warnings (``diagnose=True``).

    Keeps, between firings, only each layer's last Gram matrix (``grams``, resumable).
    """

    def __init__(self, diagnose: bool = True) -> None:
        self.diagnosis = Diagnosis() if diagnose else None
        self.grams: dict[str, Tensor] = {}  # each layer's Gram matrix at its last recorded firing
        self.first_conv: str | None = None
        self._period: tuple[int, int] | None = None  # the first conv's cumulative stride: the aliasing lattice
        self._model: nn.Module | None = None

    def setup(self, model: nn.Module, seen: Trace, input_size: tuple[int, ...], sink: Sink | None) -> None:
        """Find the first convolution and its stride lattice; forget the warnings given; write the chart layout."""
        self._model = model
        modules = named_layers(model)
        self.first_conv = next((name for name in seen.order if isinstance(modules.get(name), nn.Conv2d)), None)
        if self.first_conv is not None:
            self._period = cumulative_stride(model, self.first_conv, input_size)
        if self.diagnosis is not None:
            self.diagnosis.reset()
        if sink is not None:
            sink.layout(CHARTS)

    def layer(
        self, layer: str, found: Any, column: Mapping[str, Any], previous: Mapping[str, Any] | None
    ) -> dict[str, float]:
        """One layer's measures at this firing: ``dead``, and against the ``previous`` column ``cka_previous``,
        ``drift`` and ``source_changed`` (``found``: the maxima pass's record, with ``peaks`` and ``gram``)."""
        measures: dict[str, float] = {}
        if found.peaks is not None:
            measures["dead"] = dead_share(found.peaks)
        if previous is not None:
            if found.gram is not None and layer in self.grams:
                measures["cka_previous"] = cka_from_grams(found.gram, self.grams[layer])
            if previous["crops"].shape == column["crops"].shape:
                change, moved = drift(previous["crops"], column["crops"], previous["source"], column["source"])
                measures["drift"], measures["source_changed"] = change, moved
        return measures

    def figure6(self, images: Mapping[str, Tensor], scalars: dict[str, float]) -> tuple[FiringMeasures, dict] | None:
        """Add the Fig. 6 measures of this firing's projections ``images`` to ``scalars``; return them (for the
        diagnosis) and the first-layer filters to save, or ``None`` (no first conv; or a measure failed: warned)."""
        if self.first_conv is None:
            return None
        try:
            weight = self._filters()
            dead = {layer: scalars[f"deconv/{layer}/dead"] for layer in images if f"deconv/{layer}/dead" in scalars}
            found = measure_firing(self.first_conv, weight, images, self._period, dead)
        except Exception as error:  # a measure that fails must never cost the firing
            rank_zero_warn(f"lightning-deconv could not measure the Fig. 6 spectrum and aliasing: {error}")
            return None
        scalars.update(found.scalars())
        return found, {"name": self.first_conv, "weight": weight}

    def commit(self, grams: Mapping[str, Tensor | None], fig6: FiringMeasures | None, epoch: int) -> None:
        """A firing was recorded: keep its Gram matrices for the next, and give its diagnosis warnings."""
        self.grams.update({layer: gram for layer, gram in grams.items() if gram is not None})
        if fig6 is not None and self.diagnosis is not None:  # warned only for a firing that was recorded
            for line in self.diagnosis.check(fig6, epoch):
                rank_zero_warn(f"DeconvCallback: {line}")

    def log_filters(self, sink: Sink, epoch: int) -> None:
        """The first layer's filters as a picture (the paper's Fig. 6) and their RMS as a histogram."""
        if self.first_conv is None:
            return
        weight = self._filters()
        if weight.shape[1] in (1, 3):
            sink.images({f"deconv/{self.first_conv}/filters": filter_grid(weight)}, epoch)
        sink.histogram(f"deconv/{self.first_conv}/filter_rms", weight.flatten(1).pow(2).mean(dim=1).sqrt(), epoch)

    def _filters(self) -> Tensor:
        return named_layers(self._model)[self.first_conv].weight.detach().float().cpu()
