"""The run files under a TensorBoard logdir, found by name and read once per version, read-only.

A *run* of the Deconv dashboard is one monitor folder (``<log_dir>/deconv/<name>/``, or ``<log_dir>/deconv/``
for runs of versions before 0.2), identified by its path relative to the logdir, e.g.
``"mnist/version_0/deconv/probe"``. Identifiers are only ever looked up in the table :meth:`RunStore.monitors`
builds by listing the logdir; they are never joined into a path, and a file (or folder) whose real path
lies outside the logdir (a symlink pointing out) is left out of that table.

Each file is loaded (``torch.load(weights_only=True)`` through :func:`lightning_deconv.record.load_record`)
once per version, its modification time and size: what the dashboard shows of it, small uint8 pictures and
plain numbers, is kept, the full projections are dropped. A file that cannot be read (being written,
truncated, foreign, hostile) is skipped with one warning naming it, and read again once it changes.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from lightning_deconv.analysis.settling import feature_marks
from lightning_deconv.record import FIRING_FORMAT, RecordError, load_record, monitor_folders, saved_field
from lightning_deconv.render import normalize

__all__ = ["Firing", "LayerCells", "Monitor", "RunStore", "TopKCells"]

logger = logging.getLogger(__name__)

TOP_K_FORMAT = (
    "lightning-deconv top-k"  # as lightning_deconv.analysis.top_k_files writes (not imported: it pulls in the engine)
)
_FIRING = re.compile(r"epoch_(\d{1,9})\.pt")
_TOP_K = re.compile(r"top(\d{1,6})_epoch_(\d{1,9})\.pt")
T = TypeVar("T")


@dataclass(frozen=True)
class LayerCells:
    """What the dashboard shows of one layer at one firing: per tracked feature (row ``f``), numbers and pictures.

    Attributes:
        channels: the features (channel numbers), in the callback's order.
        value, source, position, boxes: the strongest activation's value, probe image, (row, col) in the
            layer's map, and receptive-field box (top, left, bottom, right) in the probe image's pixels.
        marks: ``"dead"``, ``"NaN"`` or ``None``, as the evolution grids mark features.
        crops, patches: ``[F, h, w, 3]`` uint8: the projections cut to their boxes (each contrast-normalised,
            grey at zero) and the same boxes of the probe images (min-max normalised).
        gram: the layer's ``[N, N]`` Gram matrix on the probe, or ``None``.
    """

    channels: list[int]
    value: list[float | None]
    source: list[int]
    position: list[list[int]]
    boxes: list[list[int]]
    marks: list[str | None]
    crops: np.ndarray
    patches: np.ndarray
    gram: Tensor | None


@dataclass(frozen=True)
class Firing:
    """One firing file: its epoch, settings, measures, layers and the probe images its features came from
    (``probe``: probe index -> ``[H, W, 3]`` uint8; empty for files of versions before 2)."""

    epoch: int
    version: int
    name: str | None
    mode: str | None
    rule: str | None
    measures: dict[str, float | None]
    layers: dict[str, LayerCells]
    probe: dict[int, np.ndarray]


@dataclass(frozen=True)
class TopKCells:
    """One layer of a top-k file: per feature its ``k`` strongest images over the validation set.

    ``value``/``source`` (the image's index in the validation set) are ``[F][k]`` lists; ``crops``/``patches``
    are ``[F, k, h, w, 3]`` uint8."""

    channels: list[int]
    value: list[list[float | None]]
    source: list[list[int]]
    crops: np.ndarray
    patches: np.ndarray


@dataclass
class Monitor:
    """One run of the dashboard: a monitor folder and its files by epoch (only files inside the logdir)."""

    run: str
    folder: Path
    firings: dict[int, Path] = field(default_factory=dict)
    top_k: dict[int, Path] = field(default_factory=dict)


def _finite(x: float) -> float | None:
    """JSON has no NaN: non-finite numbers become ``None`` (``null``)."""
    return x if math.isfinite(x) else None


def _pictures(images: Tensor, method: str) -> np.ndarray:
    """``[K, C, h, w]`` values to ``[K, h, w, 3]`` uint8, each image normalised on its own (as the grids)."""
    images = torch.nan_to_num(images.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != 3:
        images = images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    if len(images):
        images = normalize(images, method)
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _pixels(pixels: Tensor) -> np.ndarray:
    """Probe images stored as uint8 ``[S, C, H, W]`` to ``[S, H, W, 3]``."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4:
        raise ValueError(f"probe_images.pixels must be uint8 [S, C, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return pixels[:, :3].permute(0, 2, 3, 1).contiguous().numpy()


def _longs(tensor: Tensor) -> list:
    return torch.as_tensor(tensor).long().tolist()


def _layer_cells(saved: Mapping[str, Any]) -> LayerCells:
    value = torch.as_tensor(saved["value"]).double()
    projections = torch.as_tensor(saved_field(saved, "images"))
    crops, patches = torch.as_tensor(saved["crops"]), torch.as_tensor(saved["patches"])
    channels = _longs(saved["channels"])
    if not (len(channels) == len(value) == len(projections) == len(crops) == len(patches)):
        raise ValueError("the layer's fields hold different numbers of features")
    gram = saved.get("gram")
    return LayerCells(
        channels=channels,
        value=[_finite(v) for v in value.tolist()],
        source=_longs(saved["source"]),
        position=_longs(saved["position"]),
        boxes=_longs(saved["boxes"]),
        marks=feature_marks(value, projections),
        crops=_pictures(crops, "symmetric"),
        patches=_pictures(patches, "minmax"),
        gram=gram.double() if isinstance(gram, Tensor) else None,
    )


def read_firing(path: Path) -> Firing:
    """Read a firing file into what the dashboard shows. Raises ``RecordError`` or any error a malformed file
    causes (the caller skips the file)."""
    raw = load_record(path, FIRING_FORMAT)
    probe: dict[int, np.ndarray] = {}
    if isinstance(raw.get("probe_images"), Mapping):
        index = _longs(raw["probe_images"]["index"])
        pixels = _pixels(raw["probe_images"]["pixels"])
        probe = {i: pixels[row] for row, i in enumerate(index)}
    measures = raw.get("measures") or {}
    return Firing(
        epoch=int(raw["epoch"]),
        version=int(raw.get("version", 1)),
        name=raw.get("name") if isinstance(raw.get("name"), str) else None,
        mode=raw.get("mode") if isinstance(raw.get("mode"), str) else None,
        rule=raw.get("rule") if isinstance(raw.get("rule"), str) else None,
        measures={str(k): _finite(float(v)) for k, v in measures.items()},
        layers={str(name): _layer_cells(saved) for name, saved in raw["layers"].items()},
        probe=probe,
    )


def read_top_k(path: Path) -> dict[str, TopKCells]:
    """Read a top-k file (:func:`lightning_deconv.analysis.top_k_files.save_top_k`) into what the dashboard shows."""
    raw = load_record(path, TOP_K_FORMAT)
    if raw.get("format") != TOP_K_FORMAT:
        raise RecordError(path, "is not a top-k file", "Delete or move it")
    layers = {}
    for name, saved in raw["layers"].items():
        crops, patches = torch.as_tensor(saved["crops"]), torch.as_tensor(saved["patches"])
        f, k = crops.shape[:2]
        layers[str(name)] = TopKCells(
            channels=_longs(saved["channels"]),
            value=[[_finite(v) for v in row] for row in torch.as_tensor(saved["value"]).double().tolist()],
            source=_longs(saved_field(saved, "source")),
            crops=_pictures(crops.flatten(0, 1), "symmetric").reshape(f, k, *crops.shape[-2:], 3),
            patches=_pictures(patches.flatten(0, 1), "minmax").reshape(f, k, *patches.shape[-2:], 3),
        )
    return layers


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks resolved, lies in ``root`` (already resolved)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a broken or looping link
        return False


class RunStore:
    """The Deconv runs under ``logdir``, each file loaded once per (modification time, size).

    Args:
        logdir: TensorBoard's logdir.
        rescan_seconds: how long a listing of the logdir is reused before files are listed again.
        threads: if given, the process's torch intra-op threads are set to this before the first file is read.
            The plugin gives 1: TensorBoard's process only does small tensor work, where a pool of threads
            competing for a busy machine's cores made reading a firing ten times slower (measured: 1.9 s
            instead of 0.18 s for 5 layers x 64 features on 2 loaded cores).

    Example::

        >>> import tempfile
        >>> RunStore(tempfile.mkdtemp()).monitors()
        {}
    """

    def __init__(self, logdir: str | Path, rescan_seconds: float = 2.0, threads: int | None = None) -> None:
        self.logdir = Path(logdir)
        self.rescan_seconds = rescan_seconds
        self.threads = threads
        self._lock = threading.Lock()
        self._scanned: tuple[float, dict[str, Monitor]] | None = None
        self._cache: dict[Path, tuple[tuple[int, int], Any]] = {}
        self._loading: dict[Path, threading.Lock] = {}
        self.skipped: dict[Path, str] = {}  # unreadable files (at their current version) and why; under _lock

    def monitors(self) -> dict[str, Monitor]:
        """``{run id: Monitor}`` for every monitor folder under the logdir (listed again after
        ``rescan_seconds``)."""
        with self._lock:
            if self._scanned is not None and time.monotonic() - self._scanned[0] < self.rescan_seconds:
                return self._scanned[1]
        found = self._scan()
        listed = {p for m in found.values() for p in (*m.firings.values(), *m.top_k.values())}
        with self._lock:
            self._scanned = (time.monotonic(), found)
            for gone in set(self._cache) - listed:  # files deleted or moved away: forget them
                del self._cache[gone]
                self.skipped.pop(gone, None)
        return found

    def _scan(self) -> dict[str, Monitor]:
        try:
            root = self.logdir.resolve(strict=True)
            folders = monitor_folders(root)
        except (OSError, RecordError):
            return {}
        found = {}
        for folder in folders:
            if not _inside(folder, root):
                continue
            run = folder.relative_to(root).as_posix()
            monitor = Monitor(run, folder)
            try:
                paths = list(folder.iterdir())
            except OSError:  # removed meanwhile
                continue
            for path in paths:
                if not (match := _FIRING.fullmatch(path.name) or _TOP_K.fullmatch(path.name)):
                    continue  # temporaries (.epoch_001.pt.x.tmp), PNGs, anything else
                if not (_inside(path, root) and path.is_file()):
                    logger.warning("lightning-deconv: skipped %s: it points outside the logdir", path)
                    continue
                if match.re is _FIRING:
                    monitor.firings[int(match[1])] = path
                elif int(match[2]) not in monitor.top_k or int(match[1]) > _k(monitor.top_k[int(match[2])]):
                    monitor.top_k[int(match[2])] = path
            if monitor.firings:
                monitor.firings = dict(sorted(monitor.firings.items()))
                monitor.top_k = dict(sorted(monitor.top_k.items()))
                found[run] = monitor
        return dict(sorted(found.items()))

    def firing(self, path: Path) -> Firing | None:
        """The firing file at ``path`` (from :meth:`monitors`), or ``None`` if it cannot be read now."""
        return self._load(path, read_firing)

    def top_k(self, path: Path) -> dict[str, TopKCells] | None:
        """The top-k file at ``path`` (from :meth:`monitors`), or ``None`` if it cannot be read now."""
        return self._load(path, read_top_k)

    def skipped_files(self) -> list[Path]:
        """The files that could not be read at their current version."""
        with self._lock:
            return list(self.skipped)

    def version(self, path: Path) -> tuple[int, int] | None:
        """The (modification time in ns, size) of ``path`` when it was last loaded, or ``None``."""
        with self._lock:
            cached = self._cache.get(path)
        return None if cached is None else cached[0]

    def _load(self, path: Path, read: Callable[[Path], T]) -> T | None:
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with self._lock:
            lock = self._loading.setdefault(path, threading.Lock())
        with lock:  # one reader per file: concurrent requests wait for it rather than load it again
            try:
                stat = path.stat()
            except OSError:
                return None
            version = (stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get(path)
            if cached is not None and cached[0] == version:
                return cached[1]
            try:
                loaded = read(path)
                with self._lock:
                    self.skipped.pop(path, None)
            except Exception as error:  # anything a foreign, hostile or half-written file raises: skip it
                loaded = None
                why = str(error) if isinstance(error, RecordError) else f"{path}: {type(error).__name__}: {error}"
                with self._lock:
                    self.skipped[path] = why
                logger.warning("lightning-deconv: skipped %s", why)
            with self._lock:
                self._cache[path] = (version, loaded)
            return loaded


def _k(path: Path) -> int:
    return int(_TOP_K.fullmatch(path.name)[1])
