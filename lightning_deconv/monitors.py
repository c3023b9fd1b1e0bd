"""The paper's other figures as monitors: Fig. 2's top-k projections and Fig. 7's occlusion maps, during training.

Each is a Lightning callback that does one thing, on a :class:`~lightning_deconv.watch.Watch` (the probe, the
features, the folder) it may share with :class:`~lightning_deconv.callback.DeconvCallback`; ``DeconvCallback(top_k=9,
occlusion=4)`` is the one-line form that makes both on its own watch. Like every monitor they never change training
(eval mode, live weights, no random numbers consumed) and never stop it (a failing firing warns and training goes on).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor

from lightning_deconv._compat import callback_bases
from lightning_deconv._trainer import fire_safely, shard, validation_data
from lightning_deconv.analysis.occlusion import occlusion
from lightning_deconv.analysis.top_k import project_top_k, top_k
from lightning_deconv.analysis.top_k_files import save_top_k
from lightning_deconv.checks import check_int
from lightning_deconv.layers import layer_name
from lightning_deconv.maxima import TopK, merge_top_k
from lightning_deconv.monitoring import PAPER_EPOCHS, Schedule, Scheduled, Sink, normalise_epochs
from lightning_deconv.record import save_png
from lightning_deconv.render import occlusion_grid, top_k_grid
from lightning_deconv.watch import Watch, own_watch

__all__ = ["OcclusionMonitor", "TopKMonitor", "figure_monitors"]


class TopKMonitor(Scheduled, *callback_bases()):
    r"""The paper's Fig. 2 during training: for each tracked feature, its ``k`` strongest activations over the whole
    validation set (each in a different image), projected beside their image patches.

    Scans with :func:`~lightning_deconv.analysis.top_k.top_k` (under DDP each rank scans its own shard; rank 0
    merges), projects with the watch's plan, saves ``<log_dir>/deconv/<watch.name>/top<k>_epoch_XXX.pt`` and a PNG
    per layer atomically, and logs ``deconv/<layer>/top<k>`` with the epoch as its step.

    Args:
        watch: the probe, features and folder (shared with a :class:`~lightning_deconv.callback.DeconvCallback` to
            see the same features); default: a ``Watch()`` of its own.
        k: images per feature.
        epochs: when to scan, after these 1-based epochs (default: once, when training ends).
        batches: scan only this many batches of the validation set (default: all of it).
        strict: raise on a failing scan instead of warning and going on (for debugging).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[TopKMonitor(Watch(features_per_layer=4), k=9, batches=10)])
    """

    def __init__(
        self,
        watch: Watch | None = None,
        k: int = 9,
        *,
        epochs: Sequence[int] | None = None,
        batches: int | None = None,
        strict: bool = False,
    ) -> None:
        check_int(k, "k")
        check_int(batches, "batches", optional=True)
        self.watch = own_watch(watch)
        self.watch.keeper = self.watch.keeper or self
        self.k, self.batches, self.strict = k, batches, strict
        self.schedule = Schedule(epochs or (), at_end=epochs is None)
        self.done: list[int] = []  # epochs whose top k were saved (resumable)
        self.seconds: dict[int, float] = {}  # how long each scan took
        self._tried: set[int] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.watch.name, k=self.k)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        self.watch.setup(trainer, pl_module)
        self.begin(trainer)

    def begin(self, trainer: Any) -> None:
        """Start a fit on a set-up watch (a fresh run forgets the scans of an earlier one)."""
        if not self.watch.resumed:
            self.done = []
        self._tried, self.seconds = set(), {}

    def fire_due(self, trainer: Any, epoch: int) -> None:
        if self.schedule.due(epoch, {*self._tried, *self.done}):
            self._fire(trainer, epoch)

    def fire_at_end(self, trainer: Any, completed: int) -> None:
        if self.schedule.due_at_end(completed, {*self._tried, *self.done}):
            self._fire(trainer, completed)

    def _fire(self, trainer: Any, epoch: int) -> None:
        """Every rank scans its shard of the validation set; rank 0 merges, projects, saves and logs."""
        start = time.perf_counter()
        self._tried.add(epoch)  # every rank, so that all agree on what has fired

        def share(rank: int, world: int, state: dict[str, Tensor] | None) -> dict[str, TopK]:
            return self._scan(trainer, rank, world, state)

        def finish(parts: list[dict[str, TopK]]) -> None:
            self._record(trainer, epoch, merge_top_k(parts, k=self.k), start)

        fire_safely(trainer, self.watch.model, f"top-{self.k} scan after epoch {epoch}", share, finish, self.strict)

    def _scan(self, trainer: Any, rank: int, world: int, state: dict[str, Tensor] | None) -> dict[str, TopK]:
        """This rank's top k over items ``rank, rank + world, ...`` of the validation set, with global indices."""
        data = shard(validation_data(trainer), rank, world)
        batches = None if self.batches is None else -(-self.batches // world)
        found = top_k(
            self.watch.model,
            data,
            self.watch.features,
            k=self.k,
            batch_size=self.watch.batch_size,
            max_batches=batches,
            keep_images=True,
            image_key=self.watch.image_key,
            state=state,
        )
        return {layer: replace(t, source=t.source * world + rank) for layer, t in found.items()}

    def _record(self, trainer: Any, epoch: int, top: dict[str, TopK], start: float) -> None:
        """The PNGs, then the top-k file (the commit point), then the log."""
        projected = project_top_k(self.watch.plan, top)
        pictures = {}
        for layer, found in top.items():
            rows = (len(found.channels), found.k)
            crops, patches = projected[layer].crops.unflatten(0, rows), projected[layer].patches.unflatten(0, rows)
            pictures[f"deconv/{layer}/top{self.k}"] = top_k_grid(crops, patches)
            save_png(pictures[f"deconv/{layer}/top{self.k}"], self.watch.folder / f"{layer}_top{self.k}.png")
        save_top_k(self.watch.folder, epoch, top, projected)  # the record's commit point
        self.done.append(epoch)
        Sink(trainer).images(pictures, epoch)
        self.seconds[epoch] = time.perf_counter() - start

    def state_dict(self) -> dict[str, Any]:
        return {"top_k_done": self.done, **(self.watch.state_dict() if self.watch.keeper is self else {})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = list(state_dict.get("top_k_done", []))
        if "probe" in state_dict:
            self.watch.load_state_dict(state_dict)


class OcclusionMonitor(Scheduled, *callback_bases()):
    r"""The paper's Fig. 7 during training: occlusion maps of the first probe images, on the live weights.

    For each of the first ``images`` probe images, a grey square (a quarter of the image side, stride a sixteenth)
    slides over it and :func:`~lightning_deconv.analysis.occlusion.occlusion` maps the strongest feature map of
    ``layer``, the probability of the unoccluded top class and the most probable class. Logged as
    ``deconv/occlusion`` with the epoch as its step (rank 0).

    Args:
        watch: the probe and features (shared with a :class:`~lightning_deconv.callback.DeconvCallback` to map its
            deepest tracked layer); default: a ``Watch()`` of its own.
        images: how many probe images to map.
        epochs: when to map, after these 1-based epochs (the paper's schedule by default).
        fire_at_end: also map once when training ends, if the last epoch was not scheduled.
        layer: the layer whose strongest feature map is mapped (default: the watch's deepest tracked layer).
        strict: raise on a failing firing instead of warning and going on (for debugging).

    Example::

        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[OcclusionMonitor(Watch(probe=torch.rand(8, 3, 64, 64)), images=2)])
    """

    def __init__(
        self,
        watch: Watch | None = None,
        images: int = 4,
        *,
        epochs: Sequence[int] = PAPER_EPOCHS,
        fire_at_end: bool = True,
        layer: str | None = None,
        strict: bool = False,
    ) -> None:
        check_int(images, "images")
        self.watch = own_watch(watch)
        self.watch.keeper = self.watch.keeper or self
        self.images, self.layer, self.strict = images, layer, strict
        self.schedule = Schedule(tuple(epochs), at_end=fire_at_end)
        self.seconds: dict[int, float] = {}
        self._tried: set[int] = set()
        self._layer: str | None = None  # the layer mapped, resolved at fit start

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.watch.name, images=self.images, layer=self.layer)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        self.watch.setup(trainer, pl_module)
        self.begin(trainer)

    def begin(self, trainer: Any) -> None:
        """Start a fit on a set-up watch."""
        self._tried, self.seconds = set(), {}
        self._layer = next(reversed(self.watch.features))  # default: the deepest tracked layer
        if self.layer is not None:
            self._layer = layer_name(self.watch.model, self.layer)  # unknown names: the nearest ones listed
            if self._layer not in self.watch.seen.shapes:
                raise ValueError(
                    f"OcclusionMonitor(layer={self.layer!r}): not a layer with a 4-D output on the probe images; "
                    f"choose one of {sorted(self.watch.seen.shapes)[:8]}..."
                )

    def fire_due(self, trainer: Any, epoch: int) -> None:
        if self.schedule.due(epoch, self._tried):
            self._fire(trainer, epoch)

    def fire_at_end(self, trainer: Any, completed: int) -> None:
        if self.schedule.due_at_end(completed, self._tried):
            self._fire(trainer, completed)

    def _fire(self, trainer: Any, epoch: int) -> None:
        """Rank 0 maps its first probe images (the other ranks only take part in the collective bookkeeping)."""
        start = time.perf_counter()
        self._tried.add(epoch)

        def finish(parts: list[Any]) -> None:
            images = self.watch.probe[: self.images]
            side = min(images.shape[-2:])
            found = occlusion(
                self.watch.model,
                images.to(self.watch.device),
                self._layer,
                patch=max(1, side // 4),
                stride=max(1, side // 16),
            )
            Sink(trainer).images(
                {"deconv/occlusion": occlusion_grid(images, found.feature, found.probability, found.label)}, epoch
            )
            self.seconds[epoch] = time.perf_counter() - start

        fire_safely(trainer, self.watch.model, f"occlusion maps after epoch {epoch}", _nothing, finish, self.strict)

    def state_dict(self) -> dict[str, Any]:
        return self.watch.state_dict() if self.watch.keeper is self else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "probe" in state_dict:
            self.watch.load_state_dict(state_dict)


def _nothing(rank: int, world: int, state: Any) -> None:
    """A rank's share of a firing that rank 0 computes alone."""
    return None


def figure_monitors(
    watch: Watch,
    schedule: Schedule,
    occlusion: int,
    occlusion_epochs: Sequence[int] | None,
    top_k: int,
    top_k_epochs: Sequence[int] | None,
    top_k_batches: int | None,
    strict: bool,
) -> tuple[OcclusionMonitor | TopKMonitor, ...]:
    """The monitors ``DeconvCallback(occlusion=..., top_k=...)`` adds on its watch: occlusion maps at its own
    firings (or at ``occlusion_epochs``), the top k at the end of training (or at ``top_k_epochs``)."""
    check_int(occlusion, "occlusion", minimum=0)
    check_int(top_k, "top_k", minimum=0)
    parts: list[OcclusionMonitor | TopKMonitor] = []
    if occlusion:
        at = {"epochs": schedule.epochs, "fire_at_end": schedule.at_end}
        if occlusion_epochs is not None:
            at = {"epochs": normalise_epochs(occlusion_epochs, "occlusion_epochs"), "fire_at_end": False}
        parts.append(OcclusionMonitor(watch, occlusion, **at, strict=strict))
    if top_k:
        epochs = None if top_k_epochs is None else normalise_epochs(top_k_epochs, "top_k_epochs")
        parts.append(TopKMonitor(watch, top_k, epochs=epochs, batches=top_k_batches, strict=strict))
    return tuple(parts)
