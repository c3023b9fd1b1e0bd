"""Fig. 4's record: per layer, a column per firing (in memory, for the evolution grid) and a file per firing (on disk).

:class:`Evolution` is the part of :class:`~lightning_deconv.callback.DeconvCallback` that keeps what a run has
recorded, whole or not at all: a firing's file is written first, then its grids (a failure removes the file again),
and only then do its columns join the history. Memory and checkpoints keep only what the grid and the next firing's
measures need: each column's crops, marks and sources (and patches with ``show_patches``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_deconv._compat import rank_zero_warn
from lightning_deconv.analysis.settling import feature_marks
from lightning_deconv.engine import Projection
from lightning_deconv.record import FIRING_FORMAT, adopt_firings, atomic_save, firing_path, save_png
from lightning_deconv.render import evolution_grid, normalize
from lightning_deconv.watch import Watch

__all__ = ["Evolution"]


class Evolution:
    """The columns of each tracked layer's evolution grid, by epoch, and where each firing's file is."""

    def __init__(self, show_patches: bool = False) -> None:
        self.show_patches = show_patches
        self.history: dict[str, dict[int, dict[str, Any]]] = {}  # layer -> epoch -> column
        self.files: dict[int, str] = {}  # epoch -> its firing file

    @property
    def epochs(self) -> set[int]:
        """The epochs recorded in any layer."""
        return {epoch for columns in self.history.values() for epoch in columns}

    def start(self, layers: list[str]) -> None:
        """A fresh run: no columns, no files."""
        self.history, self.files = {layer: {} for layer in layers}, {}

    def check(self, trainer: Any, folder: Path) -> None:
        """Make the record whole before training: bring a resumed run's firing files into ``folder``, and forget a
        restored column whose file is lost (the end-of-training firing is then made again)."""
        lost: list[int] = []
        if trainer.is_global_zero:
            self.files, lost = adopt_firings(folder, self.epochs, self.files)
            if lost:
                rank_zero_warn(
                    f"DeconvCallback: the firing files of epochs {lost} are missing or unreadable (looked in "
                    f"{folder}); their columns are dropped from the grids so that every column has its file. "
                    "The end-of-training firing, if it is one of them, is made again."
                )
        if trainer.world_size > 1:
            lost = trainer.strategy.broadcast(lost, src=0)  # every rank must agree on what has fired
        for epoch in lost:
            for columns in self.history.values():
                columns.pop(epoch, None)
            self.files.pop(epoch, None)

    def column(self, layer: str, epoch: int, result: Projection) -> dict[str, Any]:
        """This firing's column of ``layer``'s grid, dead and NaN features marked (NaN ones warned)."""
        marks = feature_marks(result.value, result.images)
        if "NaN" in marks:
            rank_zero_warn(
                f"DeconvCallback: after epoch {epoch}, {marks.count('NaN')} features of {layer!r} have NaN/Inf "
                "activations or projections (diverged weights?); they are marked in the grid."
            )
        return {
            "crops": torch.nan_to_num(result.crops, nan=0.0, posinf=0.0, neginf=0.0).cpu(),
            "patches": result.patches.cpu() if self.show_patches else None,
            "marks": marks,
            "source": result.source.cpu(),
        }

    def previous(self, layer: str, epoch: int) -> dict[str, Any] | None:
        """``layer``'s column of the latest firing before ``epoch``, if any."""
        earlier = [e for e in self.history[layer] if e < epoch]
        return self.history[layer][max(earlier)] if earlier else None

    def grid(self, layer: str, features: list[int], extra: Mapping[int, dict[str, Any]] | None = None) -> Tensor:
        """``layer``'s evolution grid, ``[3, H, W]``: rows = ``features``, columns = epochs (with ``extra``)."""
        columns = {**self.history[layer], **(extra or {})}
        epochs = sorted(columns)
        return evolution_grid(
            [columns[e]["crops"] for e in epochs],
            [f"ep {e}" for e in epochs],
            [f"#{c}" for c in features],
            patches=[columns[e]["patches"] for e in epochs] if self.show_patches else None,
            marks=[columns[e]["marks"] for e in epochs],
        )

    def write(
        self, epoch: int, columns: dict[str, dict], file: dict[str, Any], grids: dict[str, Tensor], folder: Path
    ) -> None:
        """Write the firing's file, then its grids (a failure removes the file again); then commit its columns."""
        path = atomic_save(file, firing_path(folder, epoch))
        try:
            for layer, grid in grids.items():
                save_png(grid, folder / f"{layer}_evolution.png")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        for layer, column in columns.items():  # committed: nothing after this can lose the firing
            self.history[layer][epoch] = column
        self.files[epoch] = str(path)


def resume_warning(
    mine: Mapping[str, Any] | None, other: Mapping[str, Any] | None, options: Mapping[str, Any], watch: Watch
) -> str | None:
    """What to say when a checkpoint's DeconvCallback state had other settings: ``mine`` (same ``state_key``)
    whose logging ``options`` differ keeps its history; an ``other`` (what is computed differs) does not."""
    if mine is not None:
        changed = _differences(mine.get("options", {}), options)
        if not changed:
            return None
        return (
            f"DeconvCallback: the checkpoint's DeconvCallback had other settings ({changed}); they do not change "
            "what is computed, so its history is kept."
        )
    before = other.get("settings")
    if before is None:
        changed = "it was written by lightning-deconv before 0.2, which kept no settings"
    else:
        changed = _differences(before, watch.settings) or f"its name differs (now {watch.name!r})"
    return (
        f"DeconvCallback: the checkpoint's DeconvCallback had other settings ({changed}). Its history is not "
        f"used: this run's grids start afresh in deconv/{watch.name} (the earlier files stay where they are). "
        "Resume with the same settings to keep the history."
    )


def _differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """``"name old -> new; ..."`` for the settings that differ."""
    return "; ".join(f"{k} {before.get(k)!r} -> {v!r}" for k, v in now.items() if k in before and before[k] != v)


def firing_file(
    watch: Watch, epoch: int, layers: Mapping[str, Projection], grams: Mapping[str, Tensor | None], scalars: dict
) -> dict[str, Any]:
    """What a firing file holds: plain tensors and builtins, loadable with ``weights_only=True``."""
    saved = {layer: {**_as_dict(result), "gram": grams[layer]} for layer, result in layers.items()}
    sources = torch.unique(torch.cat([result.source.cpu() for result in layers.values()]))
    return {
        "format": FIRING_FORMAT,
        "version": 3,
        "epoch": epoch,
        "name": watch.name,
        "settings": watch.settings,
        "mode": watch.mode,
        "rule": watch.rule,
        "layers": saved,
        "measures": scalars,
        "probe_images": {"index": sources, "pixels": _display_pixels(watch.probe[sources])},
    }


def _as_dict(result: Projection) -> dict[str, Tensor]:
    """What a firing file keeps of one layer (plain tensors, loadable with ``weights_only=True``)."""
    return {
        "channels": result.channels,
        "images": result.images,
        "crops": result.crops,
        "patches": result.patches,
        "source": result.source,
        "position": result.position,
        "value": result.value,
        "boxes": result.boxes,
    }


def _display_pixels(images: Tensor) -> Tensor:
    """Probe images as ``uint8`` pixels for display (each min-max scaled): a firing file keeps its features'
    source images this way, a quarter of the float size."""
    return (normalize(images.detach().float().cpu(), "minmax") * 255).round().to(torch.uint8)
