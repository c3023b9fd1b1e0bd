"""The record a run keeps on disk: where each monitor writes, files written whole or not at all, read back safely.

Layout: every monitor instance owns one folder, ``<log_dir>/deconv/<name>/``, so that two instances never
write over each other. It holds one file per firing, ``epoch_XXX.pt``, the top-k files ``topK_epoch_XXX.pt``
and the latest PNG grids. Runs of versions before 0.2 wrote the same files straight into ``<log_dir>/deconv/``;
they are read as one monitor folder.

Every file is written to a temporary file in the same folder and renamed into place (``os.replace``), so a
process killed while writing leaves the previous file or none, never half of one. Files are read with
``torch.load(weights_only=True)``: a foreign or hostile file is refused, never run, and the readers skip it
with one warning naming it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

__all__ = [
    "FIRING_FORMAT",
    "SET_ASIDE",
    "RecordError",
    "adopt_firings",
    "atomic_copy",
    "atomic_save",
    "atomic_write",
    "find_firings",
    "firing_path",
    "is_whole",
    "load_record",
    "load_tensors",
    "monitor_folders",
    "read_firings",
    "remove_temporaries",
    "save_png",
    "saved_field",
    "set_aside",
]

FIRING_FORMAT = "lightning-deconv firing"
SET_ASIDE = ".earlier-"  # a monitor folder set aside by a later run: <name>.earlier-<k>, read only when named
_TEMPORARY = ".tmp"


class RecordError(ValueError):
    """A file or folder of a run's record that cannot be used: says which, what is wrong and what to do."""

    def __init__(self, path: str | Path, problem: str, fix: str) -> None:
        super().__init__(f"{path}: {problem}. {fix}")
        self.path, self.problem, self.fix = Path(path), problem, fix


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    A reader sees the old file or the whole new one; a crash leaves at most a hidden ``.*.tmp`` file, which
    :func:`remove_temporaries` clears.

    Example::

        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> atomic_write(folder / "a.txt", lambda f: f.write(b"whole")).read_bytes()
        b'whole'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMPORARY)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path``, atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda file: torch.save(obj, file))


def save_png(image: Tensor, path: str | Path) -> Path:
    """A ``[C, H, W]`` picture in ``[0, 1]`` as a PNG at ``path``, atomically (:func:`atomic_write`)."""
    from torchvision.utils import save_image

    return atomic_write(path, lambda file: save_image(image, file, format="png"))


def atomic_copy(source: str | Path, path: str | Path) -> Path:
    """Copy ``source`` to ``path``, atomically (:func:`atomic_write`)."""
    with open(source, "rb") as origin:
        return atomic_write(path, lambda file: shutil.copyfileobj(origin, file))


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder``; returns them."""
    folder = Path(folder)
    left = sorted(folder.glob(f".*{_TEMPORARY}")) if folder.is_dir() else []
    for path in left:
        path.unlink(missing_ok=True)
    return left


def is_whole(path: str | Path) -> bool:
    """Whether ``path`` is a whole ``torch.save`` archive (a zip; a cut one lacks its closing directory)."""
    return Path(path).is_file() and zipfile.is_zipfile(path)


def set_aside(folder: str | Path) -> Path | None:
    """Rename a monitor folder that already holds firings to ``<folder>.earlier-<k>`` (so that no grid or figure
    mixes another run's firings with a new one's); return the new name, or ``None`` if there was nothing to move."""
    folder = Path(folder)
    if not any(folder.glob("epoch_*.pt")):
        return None
    k = 1
    while (aside := folder.with_name(f"{folder.name}{SET_ASIDE}{k}")).exists():
        k += 1
    return folder.rename(aside)


def firing_path(folder: str | Path, epoch: int) -> Path:
    """Where the firing after ``epoch`` goes: ``<folder>/epoch_<epoch, 3 digits>.pt``."""
    return Path(folder) / f"epoch_{epoch:03d}.pt"


def adopt_firings(folder: str | Path, epochs: Iterable[int], files: dict[int, str]) -> tuple[dict[int, str], list[int]]:
    """Make ``folder`` hold the firing file of each of ``epochs``: keep a whole one already there, else copy the one
    ``files`` says an earlier fit wrote (a resume into a new logger version). Returns where each file is now, and
    the epochs whose file is missing or unreadable everywhere."""
    where, lost = {}, []
    for epoch in sorted(set(epochs)):
        here = firing_path(folder, epoch)
        earlier = Path(files.get(epoch, here))
        if not is_whole(here) and earlier != here and is_whole(earlier):
            atomic_copy(earlier, here)
        if is_whole(here):
            where[epoch] = str(here)
        else:
            lost.append(epoch)
    return where, lost


def load_tensors(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure a one-line :class:`RecordError`.

    Raises:
        RecordError: the file is missing, truncated, corrupt or holds objects other than tensors (never run).
    """
    path = Path(path)
    fix = "Delete or move it, or point at another run"
    if path.is_file() and not is_whole(path):
        raise RecordError(path, "is truncated or corrupt (not a whole torch.save archive)", fix)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RecordError(path, "no such file", "Check the path") from None
    except IsADirectoryError:
        raise RecordError(path, "is a folder, not a file", "Point at a file of the run") from None
    except pickle.UnpicklingError:
        raise RecordError(path, "holds objects other than tensors, so it was not loaded", fix) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise RecordError(path, f"is truncated or corrupt ({type(error).__name__})", fix) from None
    return raw


def load_record(path: str | Path, format: str | None = None) -> dict[str, Any]:
    """Read one file of a run's record (tensors only: ``weights_only=True``), or fail with a :class:`RecordError`.

    Args:
        path: the file.
        format: the ``"format"`` the file must declare (files of versions before 0.2 declare none and pass).

    Raises:
        RecordError: the file is missing, truncated, corrupt, holds objects other than tensors, or is another
            kind of file.
    """
    raw = load_tensors(path)
    fix = "Delete or move it, or point at another run"
    if not isinstance(raw, dict) or "epoch" not in raw or "layers" not in raw:
        raise RecordError(path, "is not a lightning-deconv file", fix)
    if format is not None and raw.get("format", format) != format:
        raise RecordError(path, f"is a {raw.get('format')!r} file, not a {format!r} file", fix)
    return raw


def monitor_folders(root: str | Path, pattern: str = "epoch_*.pt") -> list[Path]:
    """The monitor folders under ``root`` that hold files matching ``pattern``, oldest first.

    A monitor folder is ``<log_dir>/deconv/<name>`` (or, for runs before 0.2, ``<log_dir>/deconv``). ``root``
    may be one, a run's log dir, or any folder above (several versions or runs).
    """
    root = Path(root)
    if not root.is_dir():
        raise RecordError(root, "no such folder", "Point at the log dir of a run trained with DeconvCallback")
    found = {p.parent for p in root.rglob(pattern) if _is_monitor_folder(p.parent)}
    if any(root.glob(pattern)):
        found.add(root)
    return sorted(found, key=lambda folder: (_newest(folder, pattern), str(folder)))


def _is_monitor_folder(folder: Path) -> bool:
    return folder.name == "deconv" or folder.parent.name == "deconv"


def _newest(folder: Path, pattern: str) -> float:
    return max((p.stat().st_mtime for p in folder.glob(pattern)), default=0.0)


def find_firings(run_dir: str | Path, name: str | None = None, pattern: str = "epoch_*.pt") -> list[Path]:
    """The files matching ``pattern`` of one monitor of a run, sorted by name.

    ``run_dir`` may be a monitor folder, a run's log dir, or a folder above several versions: the newest
    monitor folder is taken. A log dir with several monitors needs ``name``.

    Raises:
        RecordError: no such files under ``run_dir``, no monitor called ``name``, or several monitors to
            choose from.
    """
    folders = monitor_folders(run_dir, pattern)
    if name is not None:
        folders = [f for f in folders if f.name == name]
    else:
        folders = [f for f in folders if SET_ASIDE not in f.name]
    if not folders:
        what = f"no monitor called {name!r}" if name is not None else f"no DeconvCallback files ({pattern})"
        raise RecordError(run_dir, what, "Point at the log dir of a run trained with DeconvCallback")
    newest = folders[-1]
    siblings = [f.name for f in folders if f.parent == newest.parent and f != newest]
    if siblings and name is None:
        names = ", ".join(sorted([newest.name, *siblings]))
        raise RecordError(newest.parent, f"holds several monitors ({names})", "Choose one with --name NAME")
    return sorted(newest.glob(pattern))


_EARLIER_NAMES = {"images": "projections", "source": "index"}


def saved_field(layer: Mapping[str, Any], field: str) -> Any:
    """A field of one saved layer of a firing or top-k file, also from files of earlier versions, which named
    a firing's ``"images"`` ``"projections"`` (version 2) and a top-k file's ``"source"`` ``"index"`` (version 1).

    Example::

        >>> saved_field({"projections": 1}, "images"), saved_field({"images": 2}, "images")
        (1, 2)
    """
    if field in layer or field not in _EARLIER_NAMES:
        return layer[field]
    return layer[_EARLIER_NAMES[field]]


def read_firings(paths: Iterable[str | Path], format: str | None = FIRING_FORMAT) -> list[dict[str, Any]]:
    """Load each file; skip (with one warning naming it) those that are unreadable or of another kind.

    Raises:
        RecordError: not one of ``paths`` could be read.
    """
    paths = list(paths)
    loaded = []
    for path in paths:
        try:
            loaded.append(load_record(path, format))
        except RecordError as error:
            warnings.warn(f"lightning-deconv: skipped {error}", stacklevel=2)
    if paths and not loaded:
        folder = Path(paths[0]).parent
        raise RecordError(folder, "none of its files could be read", "Point at another run")
    return loaded


def check_layers(wanted: Sequence[str], available: Sequence[str], where: str | Path) -> None:
    """Fail clearly if any of ``wanted`` was not tracked in the run at ``where``."""
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise RecordError(where, f"tracked no layer {unknown}", f"Choose among {list(available)}")
