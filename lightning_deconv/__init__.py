"""lightning-deconv: watch what each CNN layer learns while it trains (Zeiler & Fergus, ECCV 2014)."""

from typing import Any

from lightning_deconv.analysis.diagnosis import Diagnosis
from lightning_deconv.analysis.invariance import Invariance, invariance
from lightning_deconv.analysis.occlusion import Occlusion, occlusion
from lightning_deconv.analysis.settling import linear_cka
from lightning_deconv.analysis.spectrum import aliasing, filter_spectrum
from lightning_deconv.analysis.top_k import project_top_k, top_k
from lightning_deconv.analysis.top_k_files import load_top_k, save_top_k
from lightning_deconv.engine import Projection, Projector, deconvolve, project
from lightning_deconv.geometry import ReceptiveField, receptive_field
from lightning_deconv.maxima import TopK, find_maxima, merge_top_k
from lightning_deconv.record import RecordError, find_firings, read_firings
from lightning_deconv.render import crop, evolution_grid, normalize, projection_grid, support_boxes
from lightning_deconv.selection import choose_features

__all__ = [
    "PAPER_EPOCHS",
    "DeconvCallback",
    "Diagnosis",
    "Invariance",
    "Occlusion",
    "OcclusionMonitor",
    "Projection",
    "Projector",
    "ReceptiveField",
    "RecordError",
    "TopK",
    "TopKMonitor",
    "Watch",
    "aliasing",
    "choose_features",
    "crop",
    "deconvolve",
    "evolution_grid",
    "filter_spectrum",
    "find_firings",
    "find_maxima",
    "invariance",
    "linear_cka",
    "load_top_k",
    "merge_top_k",
    "normalize",
    "occlusion",
    "project",
    "project_top_k",
    "projection_grid",
    "read_firings",
    "receptive_field",
    "save_top_k",
    "support_boxes",
    "top_k",
]
__version__ = "0.1.0"


# The monitors import Lightning (seconds); the engine alone should not pay for it.
_MONITORS = {
    "DeconvCallback": "lightning_deconv.callback",
    "PAPER_EPOCHS": "lightning_deconv.monitoring",
    "TopKMonitor": "lightning_deconv.monitors",
    "OcclusionMonitor": "lightning_deconv.monitors",
    "Watch": "lightning_deconv.watch",
}


def __getattr__(name: str) -> Any:
    if name in _MONITORS:
        import importlib

        return getattr(importlib.import_module(_MONITORS[name]), name)
    raise AttributeError(f"module 'lightning_deconv' has no attribute {name!r}")
