"""lightning-deconv: watch what each CNN layer learns while it trains (Zeiler & Fergus, ECCV 2014)."""

from typing import Any

from lightning_deconv.analysis.spectrum import aliasing, filter_spectrum
from lightning_deconv.engine import Projection, Projector, deconvolve, project
from lightning_deconv.geometry import ReceptiveField, receptive_field
from lightning_deconv.render import crop, evolution_grid, normalize, projection_grid, support_boxes
from lightning_deconv.selection import Maxima, choose_features, find_maxima

__all__ = [
    "PAPER_EPOCHS",
    "DeconvCallback",
    "Maxima",
    "Projection",
    "Projector",
    "ReceptiveField",
    "aliasing",
    "choose_features",
    "crop",
    "deconvolve",
    "evolution_grid",
    "filter_spectrum",
    "find_maxima",
    "normalize",
    "project",
    "projection_grid",
    "receptive_field",
    "support_boxes",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The callback imports Lightning (seconds); the engine alone should not pay for it.
    if name in ("DeconvCallback", "PAPER_EPOCHS"):
        from lightning_deconv import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'lightning_deconv' has no attribute {name!r}")
