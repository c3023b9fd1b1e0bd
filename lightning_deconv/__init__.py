"""lightning-deconv: watch what each CNN layer learns while it trains (Zeiler & Fergus, ECCV 2014)."""

from lightning_deconv.engine import Projection, deconvolve, project
from lightning_deconv.geometry import ReceptiveField, receptive_field
from lightning_deconv.render import crop, normalize, projection_grid, support_boxes
from lightning_deconv.selection import Maxima, choose_features, find_maxima

__all__ = [
    "Maxima",
    "Projection",
    "ReceptiveField",
    "choose_features",
    "crop",
    "deconvolve",
    "find_maxima",
    "normalize",
    "project",
    "projection_grid",
    "receptive_field",
    "support_boxes",
]
__version__ = "0.1.0"
