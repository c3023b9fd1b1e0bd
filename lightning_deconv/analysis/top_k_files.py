"""The top-k files: a firing's top k and their projections' crops, written atomically, read back safely.

:func:`save_top_k` writes what :mod:`lightning_deconv.paper.figure2` and the dashboard draw without the
model; :func:`load_top_k` reads it back, files of version 1 (the image's index under ``"index"``) included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_deconv.maxima import TopK
from lightning_deconv.projection import Projection
from lightning_deconv.record import RecordError, atomic_save, load_record, saved_field

__all__ = ["FORMAT", "SavedTopK", "load_top_k", "save_top_k", "top_k_path"]

FORMAT = "lightning-deconv top-k"


@dataclass(frozen=True)
class SavedTopK:
    """The top k of one firing as :func:`save_top_k` wrote it (the images themselves are not saved).

    Attributes:
        epoch: the epoch after which it was taken.
        top: ``{layer: TopK}`` without images.
        crops: ``{layer: [F, k, C, h, w]}`` the projections cut to their boxes.
        patches: ``{layer: [F, k, C, h, w]}`` the same boxes of the images.
        boxes: ``{layer: [F, k, 4]}`` (top, left, bottom, right) in the images, end exclusive.
    """

    epoch: int
    top: dict[str, TopK]
    crops: dict[str, Tensor]
    patches: dict[str, Tensor]
    boxes: dict[str, Tensor]


def top_k_path(folder: str | Path, epoch: int, k: int) -> Path:
    """Where a firing's top k go: ``<folder>/top<k>_epoch_<epoch, 3 digits>.pt``."""
    return Path(folder) / f"top{k}_epoch_{epoch:03d}.pt"


def save_top_k(folder: str | Path, epoch: int, top: Mapping[str, TopK], projections: Mapping[str, Projection]) -> Path:
    """Save the top k of a firing and their projections' crops, so that Figure 2 is drawn without the model.

    The file (:func:`top_k_path`, ``k`` the largest of the layers') is written atomically (a temporary file
    renamed into place); it is a ``torch.save`` dict, readable with
    ``torch.load(path, weights_only=True)``::

        {"format": "lightning-deconv top-k", "version": 2, "epoch": int, "k": int,
         "layers": {layer: {"channels": [F], "value": [F, k], "source": [F, k], "position": [F, k, 2],
                            "map_size": (H, W), "switch": [F, k, 2] or None,
                            "crops": [F, k, C, h, w], "patches": [F, k, C, h, w], "boxes": [F, k, 4]}}}

    Args:
        folder: where to write (the callback uses its monitor folder, ``<log_dir>/deconv/<name>``).
        epoch: the epoch after which the top k were taken.
        top: ``{layer: TopK}`` from :func:`top_k` (or :func:`merge_top_k`).
        projections: ``{layer: Projection}`` from :func:`project_top_k` on ``top``.

    Version 1 files named ``source`` ``"index"``; :func:`load_top_k` reads both.

    Returns:
        The path written.

    Raises:
        ValueError: projections that are not those of ``top`` (other layers, channels or row count).
    """
    layers = {}
    for name, t in top.items():
        p = projections.get(name)
        if p is None or not torch.equal(p.channels.cpu(), t.channels.repeat_interleave(t.k)):
            raise ValueError(f"The projections of {name!r} are not those of its top k: use project_top_k(top).")
        saved = {name: getattr(t, name) for name in _SAVED}
        by_feature = {kind: getattr(p, kind).cpu().unflatten(0, (len(t.channels), t.k)) for kind in _CUTS}
        layers[name] = {**saved, **by_feature}
    k = max(t.k for t in top.values())
    record = {"format": FORMAT, "version": 2, "epoch": epoch, "k": k, "layers": layers}
    return atomic_save(record, top_k_path(folder, epoch, k))


_CUTS = ("crops", "patches", "boxes")
_SAVED = ("channels", "value", "source", "position", "map_size", "switch")


def load_top_k(path: str | Path) -> SavedTopK:
    """Read a file written by :func:`save_top_k` (of this version or of version 1).

    Raises:
        RecordError (a ValueError): the file is unreadable or not one of :func:`save_top_k`'s.
    """
    raw = load_record(path, FORMAT)
    if raw.get("format") != FORMAT:
        raise RecordError(path, "is not a top-k file written by save_top_k", "Point at a topK_epoch_XXX.pt file")
    layers = raw["layers"]
    top = {name: TopK(**{field: saved_field(saved, field) for field in _SAVED}) for name, saved in layers.items()}
    cuts = {kind: {name: saved[kind] for name, saved in layers.items()} for kind in _CUTS}
    return SavedTopK(raw["epoch"], top, **cuts)
