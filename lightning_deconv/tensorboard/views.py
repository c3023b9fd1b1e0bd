"""What the Deconv dashboard's routes answer: JSON payloads and PNG pictures, from identifiers only.

Every argument arrives as the raw string of a query parameter. Runs and layers must be keys of the listing
(:meth:`~lightning_deconv.tensorboard.store.RunStore.monitors`, then the files' own layers), epochs, features
and ranks decimal numbers the run holds; anything else raises :class:`BadRequest` (malformed) or
:class:`NotFound` (well-formed but not in the run). Nothing is ever joined into a path.
"""

from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lightning_deconv.analysis.settling import cka_from_grams
from lightning_deconv.tensorboard.store import Firing, LayerCells, Monitor, RunStore, TopKCells

__all__ = ["IMAGE_KINDS", "STRIP_KINDS", "BadRequest", "NotFound", "Views"]

IMAGE_KINDS = ("crop", "patch", "source", "top_crop", "top_patch")
STRIP_KINDS = ("crops", "patches")
CHARTS = ("cka_previous", "cka_last", "dead", "drift", "source_changed", "aliasing")
BANDS = ("low", "mid", "high")  # the first conv's spectrum (Fig. 6), one run-level chart per band
_NUMBER = re.compile(r"\d{1,9}")


class BadRequest(ValueError):
    """A malformed request (a missing or non-numeric parameter, an unknown kind): HTTP 400."""


class NotFound(LookupError):
    """A well-formed identifier the logdir does not hold (or no longer holds, or cannot read): HTTP 404."""


def _number(value: str | None, label: str) -> int:
    if value is None or not _NUMBER.fullmatch(value):
        raise BadRequest(f"`{label}` must be a decimal number from the runs listing, got {value!r}")
    return int(value)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _with_box(image: np.ndarray, box: list[int]) -> np.ndarray:
    """The probe image with the receptive-field box (top, left, bottom, right; end exclusive) drawn in red."""
    picture = Image.fromarray(image).convert("RGB")
    top, left, bottom, right = box
    width = max(1, round(max(picture.size) / 100))
    ImageDraw.Draw(picture).rectangle((left, top, right - 1, bottom - 1), outline=(230, 30, 30), width=width)
    return np.asarray(picture)


class Views:
    """The dashboard's answers over one :class:`RunStore`; PNGs are kept (least recently used first out)
    per file version.

    Example::

        >>> import tempfile
        >>> Views(RunStore(tempfile.mkdtemp())).runs()
        {'runs': []}
    """

    def __init__(self, store: RunStore, png_cache: int = 4096) -> None:
        self.store = store
        self._pngs: OrderedDict[tuple, bytes] = OrderedDict()
        self._png_cache = png_cache
        self._lock = threading.Lock()

    # -- lookups: identifiers to objects, or BadRequest/NotFound --------------------------------------

    def _monitor(self, run: str | None) -> Monitor:
        if run is None:
            raise BadRequest("`run` is required: a run id from the runs listing")
        monitor = self.store.monitors().get(run)
        if monitor is None:
            raise NotFound(f"no run {run!r}: take one from /runs")
        return monitor

    def _firings(self, monitor: Monitor) -> dict[int, tuple[Path, Firing]]:
        loaded = {epoch: (path, self.store.firing(path)) for epoch, path in monitor.firings.items()}
        return {epoch: (path, firing) for epoch, (path, firing) in loaded.items() if firing is not None}

    def _firing(self, monitor: Monitor, epoch: str | None) -> tuple[Path, Firing]:
        number = _number(epoch, "epoch")
        path = monitor.firings.get(number)
        firing = None if path is None else self.store.firing(path)
        if firing is None:
            raise NotFound(f"run {monitor.run!r} holds no readable firing after epoch {number}")
        return path, firing

    @staticmethod
    def _layer(firing: Firing, layer: str | None) -> LayerCells:
        if layer is None:
            raise BadRequest("`layer` is required: a layer name from the runs listing")
        cells = firing.layers.get(layer)
        if cells is None:
            raise NotFound(f"the firing after epoch {firing.epoch} tracked no layer {layer!r}")
        return cells

    @staticmethod
    def _row(channels: list[int], feature: str | None) -> int:
        number = _number(feature, "feature")
        if number not in channels:
            raise NotFound(f"feature {number} is not tracked in this layer")
        return channels.index(number)

    def _version(self, path: Path) -> str:
        stamp = self.store.version(path)
        return "" if stamp is None else f"{stamp[0]}-{stamp[1]}"

    # -- JSON ------------------------------------------------------------------------------------------

    def runs(self) -> dict[str, Any]:
        """Every run with its layers, their features and the epochs fired (readable firings only)."""
        runs = []
        for run, monitor in self.store.monitors().items():
            firings = self._firings(monitor)
            layers: dict[str, dict[str, list[int]]] = {}
            for epoch, (_, firing) in firings.items():
                for name, cells in firing.layers.items():
                    entry = layers.setdefault(name, {"features": [], "epochs": []})
                    entry["features"] += [c for c in cells.channels if c not in entry["features"]]
                    entry["epochs"].append(epoch)
            latest = firings[max(firings)][1] if firings else None
            top_k = [e for e, path in monitor.top_k.items() if self.store.top_k(path) is not None]
            listed = {*monitor.firings.values(), *monitor.top_k.values()}
            runs.append(
                {
                    "run": run,
                    "name": latest.name if latest else None,
                    "version": latest.version if latest else None,
                    "mode": latest.mode if latest else None,
                    "rule": latest.rule if latest else None,
                    "epochs": sorted(firings),
                    "top_k_epochs": top_k,
                    "layers": layers,
                    "skipped": sorted(p.name for p in self.store.skipped_files() if p in listed),
                }
            )
        return {"runs": runs}

    def matrix(self, run: str | None, layer: str | None) -> dict[str, Any]:
        """One layer of one run: per firing its features' numbers and marks, and the per-layer charts."""
        monitor = self._monitor(run)
        if layer is None:
            raise BadRequest("`layer` is required: a layer name from the runs listing")
        firings = {e: (p, f) for e, (p, f) in self._firings(monitor).items() if layer in f.layers}
        if not firings:
            raise NotFound(f"run {run!r} tracked no layer {layer!r}")
        columns, features = [], []
        for epoch, (path, firing) in firings.items():
            cells = firing.layers[layer]
            features += [c for c in cells.channels if c not in features]
            columns.append(
                {
                    "epoch": epoch,
                    "version": self._version(path),
                    "size": list(cells.crops.shape[1:3]),
                    "features": cells.channels,
                    "value": cells.value,
                    "source": cells.source,
                    "mark": cells.marks,
                }
            )
        charts = _charts(firings, layer)
        return {"run": monitor.run, "layer": layer, "features": features, "columns": columns, "charts": charts}

    def feature(self, run: str | None, layer: str | None, feature: str | None) -> dict[str, Any]:
        """One feature's story: per firing its value, source, box and mark; and the latest top k, if any."""
        matrix = self.matrix(run, layer)
        number = _number(feature, "feature")
        if number not in matrix["features"]:
            raise NotFound(f"feature {number} is not tracked in layer {layer!r}")
        monitor = self._monitor(run)
        history = []
        for epoch, (path, firing) in self._firings(monitor).items():
            cells = firing.layers.get(layer)
            if cells is None or number not in cells.channels:
                continue
            row = cells.channels.index(number)
            history.append(
                {
                    "epoch": epoch,
                    "version": self._version(path),
                    "row": row,
                    "value": cells.value[row],
                    "source": cells.source[row],
                    "position": cells.position[row],
                    "box": cells.boxes[row],
                    "mark": cells.marks[row],
                    "size": list(cells.crops.shape[1:3]),
                    "has_source_image": cells.source[row] in firing.probe,
                }
            )
        top = None
        for epoch, path in reversed(monitor.top_k.items()):
            loaded = self.store.top_k(path)
            if loaded and layer in loaded and number in loaded[layer].channels:
                cells = loaded[layer]
                row = cells.channels.index(number)
                top = {
                    "epoch": epoch,
                    "version": self._version(path),
                    "k": len(cells.value[row]),
                    "value": cells.value[row],
                    "source": cells.source[row],
                }
                break
        return {"run": monitor.run, "layer": layer, "feature": number, "history": history, "top_k": top}

    # -- PNG -------------------------------------------------------------------------------------------

    def strip(self, run: str | None, layer: str | None, epoch: str | None, kind: str | None) -> bytes:
        """One firing's column of the matrix as one PNG: every feature's crop (or patch), top to bottom."""
        if kind not in STRIP_KINDS:
            raise BadRequest(f"`kind` must be one of {STRIP_KINDS}, got {kind!r}")
        path, firing = self._firing(self._monitor(run), epoch)
        cells = self._layer(firing, layer)
        key = (path, self._version(path), layer, kind)
        return self._cached(key, lambda: _png(np.concatenate(getattr(cells, kind))))

    def image(
        self,
        run: str | None,
        layer: str | None,
        epoch: str | None,
        feature: str | None,
        kind: str | None,
        rank: str | None = None,
    ) -> bytes:
        """One picture of a feature as PNG: its crop, patch or source probe image (box drawn) at a firing, or
        the crop or patch of its ``rank``-th strongest validation image in the top-k file of ``epoch``."""
        if kind not in IMAGE_KINDS:
            raise BadRequest(f"`kind` must be one of {IMAGE_KINDS}, got {kind!r}")
        monitor = self._monitor(run)
        if kind.startswith("top_"):
            return self._top_image(monitor, layer, epoch, feature, kind, rank)
        path, firing = self._firing(monitor, epoch)
        cells = self._layer(firing, layer)
        row = self._row(cells.channels, feature)
        key = (path, self._version(path), layer, kind, row)
        if kind == "source":
            source = firing.probe.get(cells.source[row])
            if source is None:
                raise NotFound("this firing file holds no probe images (files of version 2 and later do)")
            return self._cached(key, lambda: _png(_with_box(source, cells.boxes[row])))
        return self._cached(key, lambda: _png({"crop": cells.crops, "patch": cells.patches}[kind][row]))

    def _top_image(
        self, monitor: Monitor, layer: str | None, epoch: str | None, feature: str | None, kind: str, rank: str | None
    ) -> bytes:
        number = _number(epoch, "epoch")
        path = monitor.top_k.get(number)
        loaded = None if path is None else self.store.top_k(path)
        if loaded is None:
            raise NotFound(f"run {monitor.run!r} holds no readable top-k file after epoch {number}")
        if layer is None:
            raise BadRequest("`layer` is required: a layer name from the runs listing")
        cells: TopKCells | None = loaded.get(layer)
        if cells is None:
            raise NotFound(f"the top-k file after epoch {number} holds no layer {layer!r}")
        row = self._row(cells.channels, feature)
        j = _number(rank, "rank")
        if j >= cells.crops.shape[1]:
            raise NotFound(f"rank {j} is beyond the top {cells.crops.shape[1]}")
        pictures = cells.crops if kind == "top_crop" else cells.patches
        return self._cached((path, self._version(path), layer, kind, row, j), lambda: _png(pictures[row, j]))

    def _cached(self, key: tuple, make) -> bytes:
        with self._lock:
            if key in self._pngs:
                self._pngs.move_to_end(key)
                return self._pngs[key]
        png = make()
        with self._lock:
            self._pngs[key] = png
            while len(self._pngs) > self._png_cache:
                self._pngs.popitem(last=False)
        return png


def _charts(firings: dict[int, tuple[Path, Firing]], layer: str) -> dict[str, list[list]]:
    """Per chart, ``[[epoch, value], ...]``: the callback's measures of ``layer``, the CKA of every firing to the
    last one (from the saved Gram matrices) and the first conv's spectral band shares (Fig. 6)."""
    charts: dict[str, list[list]] = {name: [] for name in (*CHARTS, *(f"spectrum_{b}" for b in BANDS))}
    last = firings[max(firings)][1].layers[layer].gram
    for epoch, (_, firing) in firings.items():
        for name in CHARTS:
            value = firing.measures.get(f"deconv/{layer}/{name}")
            if value is not None:
                charts[name].append([epoch, value])
        for band in BANDS:  # the run's first conv, whatever its name
            value = next((v for k, v in firing.measures.items() if k.endswith(f"/spectrum/{band}")), None)
            if value is not None:
                charts[f"spectrum_{band}"].append([epoch, value])
        gram = firing.layers[layer].gram
        if gram is not None and last is not None and gram.shape == last.shape:
            cka = cka_from_grams(gram, last)
            charts["cka_last"].append([epoch, cka if cka == cka else None])
    return charts
