"""A finished run, loaded for the paper's figures: the trained ZFNet, the callback's probe images and the
class names, from the run's checkpoint (no Lightning import needed), and the choice of probe images to show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_deconv.layers import eval_mode
from lightning_deconv.paper.models import ZFNet
from lightning_deconv.record import RecordError, load_tensors

__all__ = ["Run", "check_indices", "class_name", "load_run", "pick_images"]


@dataclass(frozen=True)
class Run:
    """What the figures need from a finished run.

    Attributes:
        model: the trained ZFNet, in eval mode, on the CPU.
        probe: ``[N, C, H, W]`` the callback's probe images (normalised, as the model sees them).
        classes: class names by index, where the run's data module tells them; else ``None``.
        checkpoint: the checkpoint they were loaded from.
    """

    model: ZFNet
    probe: Tensor
    classes: list[str] | None
    checkpoint: Path


def _find_checkpoint(run_dir: Path) -> Path:
    if run_dir.is_file():
        return run_dir
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        return last
    found = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RecordError(
            run_dir,
            "holds no checkpoint",
            "Point at the log dir of a run trained with a ModelCheckpoint (save_last=True), e.g. "
            "runs/demo/version_0, or at a .ckpt file",
        )
    return found[-1]


def _class_names(datamodule: dict[str, Any]) -> list[str] | None:
    """Class names from the data module's saved arguments (Exemplar photos or ImageFolder folders)."""
    if "photos" in datamodule:
        if datamodule["photos"] is not None:
            return list(datamodule["photos"])
        from lightning_deconv.paper.data import PHOTOS  # imports Lightning: only for runs that need it

        return list(PHOTOS)
    train = Path(str(datamodule.get("root", ""))) / "train"
    if "root" in datamodule and train.is_dir():
        from torchvision.datasets.folder import find_classes

        return find_classes(str(train))[0]
    return None


def load_run(run_dir: str | Path) -> Run:
    """The ZFNet, probe images and class names of a run, from its checkpoint (no Lightning import needed).

    Args:
        run_dir: the run's log dir (``<run>/checkpoints/last.ckpt``, else its newest ``*.ckpt``), or a
            checkpoint file.

    Raises:
        RecordError: no checkpoint found, an unreadable one, or one that holds no ImageClassifier
            hyper-parameters or no DeconvCallback probe.
    """
    path = _find_checkpoint(Path(run_dir))
    checkpoint = load_tensors(path)
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if "num_classes" not in hparams:
        raise RecordError(
            path, "holds no ImageClassifier hyper-parameters (num_classes, width, input_size)", "Point at a run of it"
        )
    model = ZFNet(**{k: hparams[k] for k in ("num_classes", "width", "input_size", "dropout") if k in hparams})
    prefix = "model."  # ImageClassifier keeps its ZFNet as `self.model`
    model.load_state_dict({k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    states = [v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith("DeconvCallback")]
    if not states or states[0].get("probe") is None:
        raise RecordError(path, "holds no DeconvCallback probe images", "Train the run with a DeconvCallback")
    classes = _class_names(checkpoint.get("datamodule_hyper_parameters", {}))
    return Run(model.eval(), states[0]["probe"].float(), classes, path)


def class_name(classes: Sequence[str] | None, index: int) -> str:
    """``classes[index]``, or ``"class <index>"`` without names."""
    return classes[index] if classes is not None and 0 <= index < len(classes) else f"class {index}"


def pick_images(model: torch.nn.Module, probe: Tensor, count: int) -> list[int]:
    """``count`` probe indices, the first image of each distinct predicted class first (a varied set)."""
    with torch.no_grad(), eval_mode(model):
        predicted = model(probe).argmax(dim=1).tolist()
    first: list[int] = []
    for index, label in enumerate(predicted):
        if label not in (predicted[i] for i in first):
            first.append(index)
    rest = [i for i in range(len(probe)) if i not in first]
    return sorted((first + rest)[:count])


def check_indices(chosen: Sequence[int], size: int) -> None:
    """Fail clearly unless ``chosen`` are indices into a probe of ``size`` images."""
    bad = [i for i in chosen if not 0 <= i < size]
    if not chosen or bad:
        raise ValueError(f"Probe indices must be in 0..{size - 1}; got {list(chosen)}.")
