"""DeconvCallback: feature evolution during training, logged to TensorBoard (Zeiler & Fergus 2014, Fig. 4).

At chosen epochs the callback takes a fixed probe set, finds each tracked feature's strongest activation
over it, projects that activation back to pixel space with the deconvnet and logs, per layer, an *evolution
grid*: rows are features, columns the epochs fired so far. What it watches (probe, features, plan, folder) is a
:class:`~lightning_deconv.watch.Watch`; the measures of each firing are :class:`~lightning_deconv.measures.Measures`;
the paper's Fig. 2 and Fig. 7 are the monitors of :mod:`lightning_deconv.monitors`, which ``top_k=`` and
``occlusion=`` add on the same watch. This module keeps the evolution itself: when to fire, the work shared across
DDP ranks, and a record that is whole or not at all.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_deconv._compat import callback_bases, rank_zero_warn
from lightning_deconv._trainer import fire_safely, say
from lightning_deconv.engine import Projection
from lightning_deconv.evolution import Evolution, firing_file, resume_warning
from lightning_deconv.measures import Measures
from lightning_deconv.monitoring import PAPER_EPOCHS, Schedule, Scheduled, Sink, normalise_epochs
from lightning_deconv.monitors import TopKMonitor, figure_monitors
from lightning_deconv.render import projection_grid
from lightning_deconv.watch import Watch, own_watch

__all__ = ["PAPER_EPOCHS", "DeconvCallback"]


class DeconvCallback(Scheduled, *callback_bases()):
    r"""Project each tracked feature's strongest activation back to pixels at chosen epochs, and log it.

    Works with ``lightning.pytorch.Trainer`` and ``pytorch_lightning.Trainer``. Monitoring never changes
    training: projections run in eval mode on the live weights, consume no random numbers, leave no
    gradients and move no BatchNorm statistics. It never stops training either: a firing that fails (or
    meets NaN/Inf activations) warns with the cause and training goes on; ``strict=True`` raises instead.

    Args:
        probe, probe_size, image_key, layers, features_per_layer, features: what to watch (see
            :class:`~lightning_deconv.watch.Watch`): by default the probe is drawn from your data, ``layers="auto"``
            takes one layer per resolution stage, and 8 seeded random features are tracked in each.
        epochs: when to fire, after these 1-based training epochs (the paper: 1, 2, 5, 10, 20, 30, 40, 64).
            Unsorted or repeated epochs are sorted and de-duplicated; epochs past ``max_epochs`` are fine.
        fire_at_end: also fire once when training ends, if the last epoch was not scheduled, so that short
            runs end with a final column.
        mode, rule, crop: how to project (see :class:`~lightning_deconv.watch.Watch`): the paper's single strongest
            activation, the deconvnet rule, cropped to its receptive field.
        show_patches: show the matching probe-image patch beside each projection.
        seed, batch_size: seeds the probe draw and the feature choice; at most this many probe images per
            forward pass (see :class:`~lightning_deconv.watch.Watch`).
        watch: a :class:`~lightning_deconv.watch.Watch` to use instead of the arguments above (probe to
            ``crop``, ``seed``, ``batch_size`` and ``name``), e.g. to share it with a
            :class:`~lightning_deconv.monitors.TopKMonitor` given separately.
        measures: also measure, from the same forward pass, each layer's settling (linear CKA to the previous
            firing), its dead channels and its features' drift, and log the first layer's filters (see
            :mod:`lightning_deconv.analysis.settling`).
        occlusion: log the paper's Fig. 7 maps (:func:`~lightning_deconv.analysis.occlusion.occlusion`) of this
            many probe images: the deepest tracked layer's strongest feature map, the probability of the
            unoccluded top class and the most probable class, as a grey square (a quarter of the image side,
            stride a sixteenth) slides over each image: an
            :class:`~lightning_deconv.monitors.OcclusionMonitor` on this callback's watch. 0: off.
        occlusion_epochs: when to log those maps (default: at every firing).
        top_k: the paper's Fig. 2: for each tracked feature, its ``top_k`` strongest activations over the whole
            validation set (each in a different image), projected beside their image patches
            (:func:`~lightning_deconv.analysis.top_k.top_k`): a :class:`~lightning_deconv.monitors.TopKMonitor` on this
            callback's watch. 0: off. Under DDP each rank scans its own shard.
        top_k_epochs: when to scan (default: once, at the end of training).
        top_k_batches: scan only this many batches of the validation set (default: all of it).
        strict: raise on a failing firing instead of warning and going on (for debugging).
        name: the folder this instance writes to, ``<log_dir>/deconv/<name>/`` (default: a digest of the settings
            that change what is computed; see :class:`~lightning_deconv.watch.Watch`).
        diagnose: with ``measures``, warn (once per condition and layer per run, never stopping) when a Fig. 6
            measure crosses its threshold, naming the layer, the value and the paper's remedy (see
            :class:`~lightning_deconv.analysis.diagnosis.Diagnosis`).

    Raises:
        TypeError, ValueError: at construction for invalid arguments; at fit start (before any training step)
            for unknown layers (nearest names listed), a probe that does not fit the model (checked with one
            dry forward), holds NaN/Inf or is not images, or more features than a layer has channels.

    Logs, on rank 0, everything with the epoch as its step: per layer ``deconv/<layer>/evolution`` (the
    evolution grid so far) and ``deconv/<layer>/epoch`` (this firing's features); with ``measures``, the scalars
    ``deconv/<layer>/cka_previous``, ``/dead``, ``/drift`` and ``/source_changed``, the first layer's
    ``deconv/<conv>/filters`` picture and ``/filter_rms`` histogram, the Fig. 6 measures
    ``deconv/<conv>/spectrum/low``, ``/mid``, ``/high`` and ``deconv/<layer>/aliasing``
    (:mod:`lightning_deconv.analysis.diagnosis`), and a custom-scalars layout (one chart per measure, a line per
    layer); and ``deconv/seconds``. TensorBoard keeps only 10 images per tag unless started with
    ``--samples_per_plugin images=100``. Each firing's projections, crops, sources, positions, values, Gram
    matrices and first-layer filters are saved, atomically, to ``<log_dir>/deconv/<name>/epoch_XXX.pt`` and
    each layer's grid to a PNG beside it. A firing is recorded whole (file, grid, scalars, the column in memory
    and in checkpoints) or not at all; memory and checkpoints keep only what the next firing needs (the grid's
    crops, each layer's last Gram matrix).

    Example::

        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> probe = torch.rand(16, 3, 64, 64)
        >>> trainer = Trainer(callbacks=[DeconvCallback(probe=probe, features_per_layer=4, epochs=(1, 2, 5))])
        >>> everything = DeconvCallback(probe=probe, top_k=9, occlusion=2)  # Figs. 4, 2 and 7 on one watch
        >>> [type(part).__name__ for part in everything.parts]
        ['OcclusionMonitor', 'TopKMonitor']
    """

    def __init__(
        self,
        probe: Tensor | Dataset | DataLoader | None = None,
        probe_size: int = 32,
        image_key: str | None = None,
        layers: str | Sequence[str] = "auto",
        features_per_layer: int = 8,
        features: Mapping[str, Sequence[int]] | None = None,
        epochs: Sequence[int] = PAPER_EPOCHS,
        fire_at_end: bool = True,
        mode: Literal["max", "map"] = "max",
        rule: Literal["deconvnet", "guided", "gradient"] = "deconvnet",
        crop: Literal["receptive_field", "support", "none"] = "receptive_field",
        show_patches: bool = False,
        seed: int = 0,
        batch_size: int = 64,
        watch: Watch | None = None,
        measures: bool = True,
        occlusion: int = 0,
        occlusion_epochs: Sequence[int] | None = None,
        top_k: int = 0,
        top_k_epochs: Sequence[int] | None = None,
        top_k_batches: int | None = None,
        strict: bool = False,
        name: str | None = None,
        diagnose: bool = True,
    ) -> None:
        what = {
            "probe": probe, "probe_size": probe_size, "image_key": image_key, "layers": layers,
            "features_per_layer": features_per_layer, "features": features, "mode": mode, "rule": rule, "crop": crop,
            "seed": seed, "batch_size": batch_size, "name": name,
        }  # fmt: skip
        if watch is not None and (given := [key for key, value in what.items() if _given(value, _WATCH_DEFAULTS[key])]):
            raise ValueError(f"Give either `watch` or {given}, not both: a watch carries them.")
        self.watch = watch = own_watch(watch) if watch is not None else Watch(**what)
        watch.keeper = self  # its checkpoint state carries the probe and features for every monitor of the watch
        self.schedule = Schedule(tuple(epochs), at_end=fire_at_end)
        self.strict = strict
        self.record = Evolution(show_patches)
        self.measures = Measures(diagnose) if measures else None
        self.parts = figure_monitors(watch, self.schedule, occlusion, occlusion_epochs, top_k, top_k_epochs,
                                     top_k_batches, strict)  # fmt: skip
        self._options_given = {
            "epochs": self.schedule.epochs, "fire_at_end": fire_at_end, "show_patches": show_patches,
            "batch_size": watch.batch_size, "measures": measures, "occlusion": occlusion,
            "occlusion_epochs": occlusion_epochs and normalise_epochs(occlusion_epochs), "top_k": top_k,
            "top_k_epochs": top_k_epochs and normalise_epochs(top_k_epochs), "top_k_batches": top_k_batches,
        }  # fmt: skip
        # Per-run state: made at fit start, or restored from a checkpoint by load_state_dict().
        self.firing_seconds: dict[int, float] = {}
        self.measure_seconds: dict[int, float] = {}
        self._fired_epochs: set[int] = set()
        self._restored = False

    # ------------------------------------------------------------------ what it shows of its watch and parts
    @property
    def history(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Per layer, the columns of its evolution grid by epoch (crops, marks, sources)."""
        return self.record.history

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that changes what a firing computes (the watch's settings)."""
        return self.watch.settings

    @property
    def monitor_name(self) -> str:
        """The name of this instance's folder, ``<log_dir>/deconv/<monitor_name>``."""
        return self.watch.name

    @property
    def folder(self) -> Path | None:
        """``<log_dir>/deconv/<monitor_name>``, known from fit start."""
        return self.watch.folder

    @property
    def probe(self) -> Tensor | None:
        """The probe images, drawn at fit start (or restored)."""
        return self.watch.probe

    @property
    def features(self) -> dict[str, list[int]]:
        """The tracked channels of each layer, chosen at fit start (or restored)."""
        return self.watch.features

    @property
    def epochs(self) -> tuple[int, ...]:
        """The epochs it fires after (sorted, 1-based)."""
        return self.schedule.epochs

    @property
    def diagnosis(self) -> Any:
        """The Fig. 6 :class:`~lightning_deconv.analysis.diagnosis.Diagnosis` (``None`` without it)."""
        return None if self.measures is None else self.measures.diagnosis

    @property
    def top_k_done(self) -> list[int]:
        """The epochs whose top k were saved."""
        return [epoch for part in self.parts if isinstance(part, TopKMonitor) for epoch in part.done]

    @property
    def top_k_seconds(self) -> dict[int, float]:
        """How long each top-k scan took."""
        return {e: s for part in self.parts if isinstance(part, TopKMonitor) for e, s in part.seconds.items()}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.monitor_name, settings=self.settings)

    def _options(self) -> dict[str, Any]:
        """The settings that change only when and what is logged: a resume with other options keeps the history."""
        return self._options_given

    # ------------------------------------------------------------------ set-up: when the model is final
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        self.watch.setup(trainer, pl_module)
        if not self._restored:
            self.record.start(list(self.features))
            if self.measures is not None:
                self.measures.grams = {}
        self.record.check(trainer, self.folder)
        self._restored = False
        self._fired_epochs = set()
        self.firing_seconds, self.measure_seconds = {}, {}
        if self.measures is not None:
            sink = Sink(trainer) if trainer.is_global_zero else None
            self.measures.setup(self.watch.model, self.watch.seen, tuple(self.probe.shape[1:]), sink)
        for part in self.parts:
            part.begin(trainer)

    # ------------------------------------------------------------------ when to fire
    def fire_due(self, trainer: Any, epoch: int) -> None:
        """Fire after ``epoch`` if it is scheduled and not fired yet; then the parts (occlusion, top k)."""
        if self.schedule.due(epoch, self._done()):
            self._fire(trainer, epoch)
        for part in self.parts:
            part.fire_due(trainer, epoch)

    def fire_at_end(self, trainer: Any, completed: int) -> None:
        """The end-of-training firing, if the last epoch was not one; then the parts'."""
        if self.schedule.due_at_end(completed, self._done()):
            self._fire(trainer, completed)
        for part in self.parts:
            part.fire_at_end(trainer, completed)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.is_global_zero:
            self._print_tensorboard_command(trainer)

    def _done(self) -> set[int]:
        return self._fired_epochs | self.record.epochs

    # ------------------------------------------------------------------ one firing
    def _fire(self, trainer: Any, epoch: int) -> None:
        """Every rank projects its share of the features; rank 0 merges, measures, logs and writes."""
        start = time.perf_counter()
        self._fired_epochs.add(epoch)  # every rank must agree on what has fired, or collectives would hang

        def finish(parts: list[dict[str, Any]]) -> None:
            self._record(trainer, epoch, self.watch.merge(parts), parts[0]["maxima"], start)

        fire_safely(trainer, self.watch.model, f"firing after epoch {epoch}", self._project_share, finish, self.strict)

    def snapshot(self) -> dict[str, Projection]:
        """Project the tracked features now, as a firing does (on one process), without logging anything."""
        return self.watch.merge([self._project_share(0, 1, None)])

    def _project_share(self, rank: int, world: int, state: dict[str, Tensor] | None) -> dict[str, Any]:
        return self.watch.project_share(rank, world, state, summaries=self.measures is not None and rank == 0)

    def _record(self, trainer: Any, epoch: int, layers: dict[str, Projection], maxima: dict, start: float) -> None:
        """Record a firing whole or not at all: everything is computed and written first (the firing file, then
        the PNGs), and only then does the column join the history and the scalars go out."""
        measured = time.perf_counter()
        columns, scalars = {}, {}
        for layer, result in layers.items():
            columns[layer] = self.record.column(layer, epoch, result)
            if self.measures is not None:
                found = self.measures.layer(layer, maxima[layer], columns[layer], self.record.previous(layer, epoch))
                scalars.update({f"deconv/{layer}/{name}": value for name, value in found.items()})
        measured = time.perf_counter() - measured
        fig6 = None
        if self.measures is not None:
            fig6 = self.measures.figure6({layer: result.images for layer, result in layers.items()}, scalars)
        grams = {layer: found.gram for layer, found in maxima.items()}
        grids = {layer: self.record.grid(layer, self.features[layer], {epoch: columns[layer]}) for layer in layers}
        file = {**firing_file(self.watch, epoch, layers, grams, scalars), "filters": fig6[1] if fig6 else None}
        self.record.write(epoch, columns, file, grids, self.folder)  # the commit point
        sink = Sink(trainer)
        if self.measures is not None:
            self.measures.commit(grams, fig6 and fig6[0], epoch)
            self.measures.log_filters(sink, epoch)
        for layer in layers:
            crops = columns[layer]["crops"]
            patches = layers[layer].patches.cpu() if self.record.show_patches else None
            snapshot = projection_grid(crops, patches, nrow=len(crops))
            sink.images({f"deconv/{layer}/evolution": grids[layer], f"deconv/{layer}/epoch": snapshot}, epoch)
        seconds = time.perf_counter() - start
        self.firing_seconds[epoch], self.measure_seconds[epoch] = seconds, measured
        sink.scalars({**scalars, "deconv/seconds": seconds}, epoch)  # one step convention for everything: the epoch
        count = sum(len(c) for c in self.features.values())
        say(
            trainer,
            f"DeconvCallback: epoch {epoch}: projected {count} features of {len(layers)} layers in {seconds:.2f}s, "
            f"logged deconv/<layer>/evolution; files in {self.folder}",
        )

    # ------------------------------------------------------------------ output
    def evolution(self, layer: str) -> Tensor:
        """The evolution grid of ``layer`` so far: ``[3, H, W]``, rows = features, columns = epochs."""
        return self.record.grid(layer, self.features[layer])

    @staticmethod
    def _print_tensorboard_command(trainer: Any) -> None:
        folders = {str(logger.save_dir) for logger in trainer.loggers if _writes_tensorboard(logger)}
        for folder in sorted(folders):
            say(
                trainer,
                "DeconvCallback: see the feature evolution with\n"
                f"  tensorboard --logdir {folder} --samples_per_plugin images=100",
            )

    # ------------------------------------------------------------------ the record on disk, and checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "settings": self.settings,
            "options": self._options(),
            **self.watch.state_dict(),
            "history": self.record.history,
            "grams": {} if self.measures is None else self.measures.grams,
            "files": self.record.files,
            "top_k_done": self.top_k_done,
        }

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Say, once, when the checkpoint's DeconvCallback had other settings, and whether its history is kept
        (the options of when and what to log changed) or not (what is computed changed: never mixed in a grid)."""
        states = checkpoint.get("callbacks", {})
        mine = states.get(self.state_key)
        others = [state for key, state in states.items() if key.startswith(type(self).__qualname__ + "{")]
        if mine is None and len(others) != 1:
            return
        said = resume_warning(mine, None if mine else others[0], self._options(), self.watch)
        if said:
            rank_zero_warn(said)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.watch.load_state_dict(state_dict)
        self.record.history = state_dict["history"]
        if self.measures is not None:
            self.measures.grams = dict(state_dict.get("grams", {}))
        self.record.files = dict(state_dict.get("files", {}))
        for part in self.parts:
            if isinstance(part, TopKMonitor):
                part.done = list(state_dict.get("top_k_done", []))
        self._restored = True


_WATCH_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(DeconvCallback.__init__).parameters.items()
    if name in inspect.signature(Watch.__init__).parameters
}


def _given(value: Any, default: Any) -> bool:
    """Whether an argument differs from its default (by value: a config parser makes new, equal strings)."""
    return value is not None if default is None else value != default


def _writes_tensorboard(logger: Any) -> bool:
    """A logger whose files TensorBoard can show (not a stand-in such as ``fast_dev_run``'s)."""
    return type(logger).__name__ == "TensorBoardLogger" and getattr(logger, "save_dir", None) is not None
