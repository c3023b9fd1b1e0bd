"""DeconvCallback: feature evolution during training, logged to TensorBoard (Zeiler & Fergus 2014, Fig. 4).

At chosen epochs the callback takes a fixed probe set, finds each tracked feature's strongest activation
over it, projects that activation back to pixel space with the deconvnet and logs, per layer, an *evolution
grid*: rows are features, columns the epochs fired so far. The projecting is the engine's
(:class:`~lightning_deconv.engine.Projector`, one plan for the whole fit); the callback only decides what
to watch, schedules, splits and gathers the work under DDP, and logs.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_deconv._compat import callback_bases, override, rank_zero_info, rank_zero_warn
from lightning_deconv._trainer import (
    data_source,
    fire_safely,
    log_image,
    log_metrics,
    projected_model,
    same_on_every_rank,
    say,
    shard,
    validation_data,
)
from lightning_deconv.analysis.diagnosis import Diagnosis, FiringMeasures, cumulative_stride, measure_firing
from lightning_deconv.analysis.occlusion import occlusion
from lightning_deconv.analysis.settling import cka_from_grams, dead_share, drift, feature_marks
from lightning_deconv.analysis.top_k import project_top_k, top_k
from lightning_deconv.analysis.top_k_files import save_top_k
from lightning_deconv.checks import check_int
from lightning_deconv.engine import Projection, Projector, check_rule_and_mode
from lightning_deconv.layers import check_images, layer_name, named_layers
from lightning_deconv.maxima import TopK, merge_top_k
from lightning_deconv.probe import draw_probe, untouched_rng
from lightning_deconv.record import (
    FIRING_FORMAT,
    atomic_copy,
    atomic_save,
    firing_path,
    is_whole,
    remove_temporaries,
    save_png,
    set_aside,
)
from lightning_deconv.render import evolution_grid, filter_grid, normalize, occlusion_grid, projection_grid, top_k_grid
from lightning_deconv.selection import choose_features
from lightning_deconv.stages import Trace, auto_layers, trace

__all__ = ["PAPER_EPOCHS", "DeconvCallback"]

PAPER_EPOCHS: tuple[int, ...] = (1, 2, 5, 10, 20, 30, 40, 64)
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _normalise_epochs(epochs: Sequence[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated 1-based epochs; zero, negative or non-integer epochs are rejected."""
    bad = [e for e in epochs if isinstance(e, bool) or not isinstance(e, int) or e < 1]
    if isinstance(epochs, (str, bytes)) or bad:
        raise ValueError(
            f"`epochs` must be positive integers counted from 1 (epoch 1 = after the first pass); got {epochs!r}."
        )
    return tuple(sorted(set(epochs)))


class DeconvCallback(*callback_bases()):
    r"""Project each tracked feature's strongest activation back to pixels at chosen epochs, and log it.

    Works with ``lightning.pytorch.Trainer`` and ``pytorch_lightning.Trainer``. Monitoring never changes
    training: projections run in eval mode on the live weights, consume no random numbers, leave no
    gradients and move no BatchNorm statistics. It never stops training either: a firing that fails (or
    meets NaN/Inf activations) warns with the cause and training goes on; ``strict=True`` raises instead.

    Args:
        probe: the fixed probe images: a ``[N, C, H, W]`` tensor (normalised as the model expects), a
            ``Dataset`` or ``DataLoader`` (``probe_size`` images drawn with ``seed``), or ``None`` to draw them
            at fit start from the datamodule's ``probe_dataset()``, else the validation data, else the
            training data, wherever they are defined (loaders passed to ``fit()``, a datamodule, or the
            LightningModule's hooks). Random transforms are made deterministic by seeding each item.
        probe_size: how many images to draw when ``probe`` is not a tensor.
        image_key: the image's key in dict items or batches (default: ``"image"``, ``"images"``, ``"x"``, ...).
        layers: ``"auto"`` (the conv stages; ZFNet/AlexNet: conv1..conv5 after ReLU and pooling; VGG: the
            pooled stages; ResNet: the stem and ``layer1..layer4``, also inside ``self.net``-style wrappers)
            or a list of module names from ``model.named_modules()``.
        features_per_layer: how many channels to track per layer, a seeded random subset (the paper's
            "randomly chosen subset").
        features: explicit ``{layer: [channels]}``; overrides ``layers`` and ``features_per_layer``.
        epochs: when to fire, after these 1-based training epochs (the paper: 1, 2, 5, 10, 20, 30, 40, 64).
            Unsorted or repeated epochs are sorted and de-duplicated; epochs past ``max_epochs`` are fine.
        fire_at_end: also fire once when training ends, if the last epoch was not scheduled, so that short
            runs end with a final column.
        mode: ``"max"`` (the single strongest activation, the paper) or ``"map"`` (its whole map).
        rule: ``"deconvnet"``, ``"guided"`` or ``"gradient"``.
        crop: cut each projection to its activation's ``"receptive_field"``, to the projections'
            ``"support"``, or ``"none"``.
        show_patches: show the matching probe-image patch beside each projection.
        seed: seeds the probe draw and the feature choice.
        batch_size: probe images per forward pass when searching the maxima.
        measures: also measure, from the same forward pass, each layer's settling (linear CKA to the previous
            firing), its dead channels and its features' drift, and log the first layer's filters (see
            :mod:`lightning_deconv.analysis.settling`).
        occlusion: log the paper's Fig. 7 maps (:func:`~lightning_deconv.analysis.occlusion.occlusion`) of this
            many probe images: the deepest tracked layer's strongest feature map, the probability of the
            unoccluded top class and the most probable class, as a grey square (a quarter of the image side,
            stride a sixteenth) slides over each image. 0: off.
        occlusion_epochs: when to log those maps (default: at every firing).
        top_k: the paper's Fig. 2: for each tracked feature, its ``top_k`` strongest activations over the whole
            validation set (each in a different image), projected beside their image patches
            (:func:`~lightning_deconv.analysis.top_k.top_k`). 0: off. Under DDP each rank scans its own shard.
        top_k_epochs: when to scan (default: once, at the end of training).
        top_k_batches: scan only this many batches of the validation set (default: all of it).
        strict: raise on a failing firing instead of warning and going on (for debugging).
        name: the folder this instance writes to, ``<log_dir>/deconv/<name>/`` (letters, digits, ``.``, ``_``,
            ``-``). Default: a digest of the settings that change what is computed, so that instances never
            write over each other and a resume with other settings never mixes columns in one grid.
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

        >>> from lightning.pytorch import Trainer
        >>> probe = torch.rand(16, 3, 64, 64)
        >>> trainer = Trainer(callbacks=[DeconvCallback(probe=probe, features_per_layer=4, epochs=(1, 2, 5))])
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
        if probe is not None and not isinstance(probe, (Tensor, Dataset, DataLoader)):
            raise TypeError(f"`probe` must be a Tensor, a Dataset, a DataLoader or None, got {type(probe).__name__}.")
        if isinstance(probe, Tensor) and (probe.dim() != 4 or len(probe) == 0):
            raise ValueError(f"A probe tensor must be non-empty [N, C, H, W], got shape {tuple(probe.shape)}.")
        if image_key is not None and not isinstance(image_key, str):
            raise TypeError(f"`image_key` must be a string (a key of the dict items), got {image_key!r}.")
        if layers != "auto" and (isinstance(layers, str) or not layers):
            raise ValueError(f"`layers` must be 'auto' or a non-empty list of module names, got {layers!r}.")
        if features is not None and (not features or any(len(c) == 0 for c in features.values())):
            raise ValueError("`features` must map each layer name to a non-empty list of channels.")
        for value, label in ((probe_size, "probe_size"), (features_per_layer, "features_per_layer")):
            check_int(value, label)
        check_int(batch_size, "batch_size")
        check_int(occlusion, "occlusion", minimum=0)
        check_int(top_k, "top_k", minimum=0)
        check_int(top_k_batches, "top_k_batches", optional=True)
        check_int(seed, "seed", minimum=None)
        check_rule_and_mode(rule, mode, crop)
        if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
            raise ValueError(
                "`name` must be a folder name of letters, digits, '.', '_' or '-' (not starting with '.'); "
                f"got {name!r}."
            )
        self.epochs = _normalise_epochs(epochs)
        if not self.epochs and not fire_at_end:
            raise ValueError("Nothing would ever fire: give some `epochs` or set `fire_at_end=True`.")
        self.probe_source = probe
        self.probe_size, self.image_key = probe_size, image_key
        self.layers = layers
        self.features_per_layer = features_per_layer
        self.explicit_features = {k: [int(c) for c in v] for k, v in (features or {}).items()}
        self.fire_at_end = fire_at_end
        self.mode, self.rule, self.crop, self.show_patches = mode, rule, crop, show_patches
        self.seed, self.batch_size, self.measures, self.strict = seed, batch_size, measures, strict
        self.occlusion = occlusion
        self.occlusion_epochs = None if occlusion_epochs is None else _normalise_epochs(occlusion_epochs)
        self.top_k, self.top_k_batches = top_k, top_k_batches
        self.top_k_epochs = None if top_k_epochs is None else _normalise_epochs(top_k_epochs)
        # Per-run state: made at fit start, or restored from a checkpoint by load_state_dict().
        self.probe: Tensor | None = None
        self.features: dict[str, list[int]] = {}
        self.history: dict[str, dict[int, dict[str, Any]]] = {}
        self.plan: Projector | None = None
        self._model: nn.Module | None = None  # what the plan runs: the LightningModule, or its network
        self.firing_seconds: dict[int, float] = {}
        self.measure_seconds: dict[int, float] = {}
        self.top_k_seconds: dict[int, float] = {}
        self._first_conv: str | None = None
        self.diagnosis = Diagnosis() if diagnose else None
        self._period: tuple[int, int] | None = None  # the first conv's cumulative stride: the aliasing lattice
        self._fired_epochs: set[int] = set()
        self.top_k_done: list[int] = []  # epochs whose top k were saved (resumable)
        self.name = name
        self.settings = self._settings()
        self.folder: Path | None = None  # <log_dir>/deconv/<name>, set at fit start
        self._grams: dict[str, Tensor] = {}  # each layer's Gram matrix at its last firing (for CKA)
        self._files: dict[int, str] = {}  # where each recorded firing's file is
        self._restored = False
        self._done_at_start = 0  # epochs completed when this fit started (a resumed run's checkpoint)

    def _settings(self) -> dict[str, Any]:
        """Everything that changes what a firing computes: a resume with other settings starts afresh."""
        probe = self.probe_source
        if isinstance(probe, Tensor):
            sample = probe.detach().flatten()[:: max(1, probe.numel() // 4096)].double().cpu()
            probe_id = f"tensor{list(probe.shape)}:{hashlib.sha1(sample.numpy().tobytes()).hexdigest()[:12]}"
        else:
            probe_id = f"{type(probe).__name__}[{self.probe_size}]"
        layers = self.layers if isinstance(self.layers, str) else list(self.layers)
        return {
            "probe": probe_id,
            "probe_key": self.image_key,  # the old name: a monitor folder is named by a digest of these
            "layers": layers if not self.explicit_features else None,
            "features_per_layer": self.features_per_layer if not self.explicit_features else None,
            "features": self.explicit_features or None,
            "mode": self.mode,
            "rule": self.rule,
            "crop": self.crop,
            "seed": self.seed,
        }

    def _options(self) -> dict[str, Any]:
        """The settings that change only when and what is logged: a resume with other options keeps the history."""
        names = ("epochs", "fire_at_end", "show_patches", "batch_size", "measures", "occlusion", "occlusion_epochs")
        return {name: getattr(self, name) for name in (*names, "top_k", "top_k_epochs", "top_k_batches")}

    @property
    def monitor_name(self) -> str:
        """The name of this instance's folder, ``<log_dir>/deconv/<monitor_name>``."""
        digest = hashlib.sha1(repr(sorted(self.settings.items())).encode()).hexdigest()[:8]
        return self.name or f"evolution-{digest}"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.monitor_name, settings=self.settings)

    # ------------------------------------------------------------------ set-up: when the model is final
    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # After configure_model, the move to the device and checkpoint restore; before the first step, so
        # that bad input fails here and not hours into training.
        self._model = model = projected_model(pl_module)
        if not self._restored:
            self.top_k_done, self._grams, self._files = [], {}, {}
            self.probe = same_on_every_rank(trainer, self._draw_probe(trainer))
        check_images(model, self.probe)
        param = next(model.parameters())
        seen = trace(model, self.probe[:1].to(param.device, param.dtype))  # one dry forward: fails early
        if not self._restored:
            self.features = self._choose_features(model, seen)
            self.history = {layer: {} for layer in self.features}
        self.folder = Path(trainer.log_dir or trainer.default_root_dir) / "deconv" / self.monitor_name
        self._check_record(trainer)
        self._restored = False
        self._fired_epochs, self._top_k_tried, self._training_ran = set(), set(), False
        self.firing_seconds, self.measure_seconds, self.top_k_seconds = {}, {}, {}
        self.plan = self._make_plan(model)
        self._first_conv = _first_conv(model, seen) if self.measures else None
        if self._first_conv is not None:
            self._period = cumulative_stride(model, self._first_conv, self.probe.shape[1:])
        if self.diagnosis is not None:
            self.diagnosis.reset()
        if trainer.is_global_zero and self.measures:
            self._add_layout(trainer)
        rank_zero_info(f"DeconvCallback: {self.plan.describe()}")  # no progress bar to print above yet

    def _draw_probe(self, trainer: Any) -> Tensor:
        source = self.probe_source
        if isinstance(source, Tensor):
            return draw_probe(source, len(source), self.seed)  # every image, in order, checked
        if source is None:
            with untouched_rng():
                source = data_source(trainer)
        return draw_probe(source, self.probe_size, self.seed, self.image_key)

    def _choose_features(self, model: nn.Module, seen: Trace) -> dict[str, list[int]]:
        if self.explicit_features:
            wanted = {layer_name(model, name): chans for name, chans in self.explicit_features.items()}
        elif self.layers == "auto":
            wanted = dict.fromkeys(auto_layers(model, seen))
        else:
            wanted = dict.fromkeys(layer_name(model, name) for name in self.layers)
        if not wanted:
            raise ValueError(
                f"Found no convolutional stages in {type(model).__name__}; name the layers to watch with `layers=`."
            )
        chosen = {}
        for index, (name, channels) in enumerate(wanted.items()):
            if name not in seen.shapes:
                raise ValueError(
                    f"Layer {name!r} does not output a 4-D [N, C, H, W] feature map on the probe images "
                    "(or never runs). Choose convolution, ReLU or pooling modules."
                )
            count = seen.shapes[name][1]
            if channels is None:
                if self.features_per_layer > count:
                    raise ValueError(
                        f"features_per_layer={self.features_per_layer} exceeds the {count} channels of layer "
                        f"{name!r}; lower it to at most {count} or list `features` explicitly."
                    )
                channels = choose_features(count, self.features_per_layer, self.seed + index)
            bad = [c for c in channels if not 0 <= c < count]
            if bad:
                raise ValueError(f"Channels {bad} are out of range for layer {name!r} (0..{count - 1}).")
            chosen[name] = list(channels)
        return chosen

    def _make_plan(self, model: nn.Module) -> Projector:
        return Projector(
            model,
            self.features,
            input_size=self.probe.shape[1:],
            rule=self.rule,
            mode=self.mode,
            crop=self.crop,
            batch_size=self.batch_size,
        )

    # ------------------------------------------------------------------ when to fire
    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Fire right after the epoch's last optimiser step: before validation, and so before any checkpoint
        # of this epoch is written, so a resumed run never misses a column.
        if batch_idx + 1 == trainer.num_training_batches:
            self._maybe_fire(trainer, pl_module, trainer.current_epoch + 1)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._maybe_fire(trainer, pl_module, trainer.current_epoch + 1)  # loaders without a length

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._training_ran = True

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._fire_at_end(trainer, pl_module)
        if trainer.is_global_zero:
            self._print_tensorboard_command(trainer)

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # A resumed run whose checkpoint is already at the end skips training (and on_train_end): the firing
        # at the end, if a kill cut it short last time, is made here.
        if not self._training_ran:
            self._fire_at_end(trainer, pl_module)

    def _fire_at_end(self, trainer: Any, pl_module: Any) -> None:
        completed = trainer.fit_loop.epoch_progress.current.completed
        if self.fire_at_end and completed > 0 and not self._fired(completed):
            self._fire(trainer, pl_module, completed)
        if self.top_k and self.top_k_epochs is None and completed > 0 and not self._top_k_fired(completed):
            self._fire_top_k(trainer, completed)

    def _fired(self, epoch: int) -> bool:
        return epoch in self._fired_epochs or any(epoch in columns for columns in self.history.values())

    def _top_k_fired(self, epoch: int) -> bool:
        return epoch in self._top_k_tried or epoch in self.top_k_done

    def _maybe_fire(self, trainer: Any, pl_module: Any, epoch: int) -> None:
        if epoch in self.epochs and not self._fired(epoch):
            self._fire(trainer, pl_module, epoch)
        if self.top_k and epoch in (self.top_k_epochs or ()) and not self._top_k_fired(epoch):
            self._fire_top_k(trainer, epoch)

    # ------------------------------------------------------------------ one firing
    def _fire(self, trainer: Any, pl_module: Any, epoch: int) -> None:
        """Every rank projects its share of the features; rank 0 merges, measures, logs and writes."""
        start = time.perf_counter()
        self._fired_epochs.add(epoch)  # every rank must agree on what has fired, or collectives would hang

        def finish(parts: list[dict[str, Any]]) -> None:
            self._record(trainer, epoch, self._merge(parts), parts[0]["maxima"], start)

        fire_safely(trainer, self._model, f"firing after epoch {epoch}", self._project_share, finish, self.strict)

    def _fire_top_k(self, trainer: Any, epoch: int) -> None:
        """Fig. 2: every rank scans its shard of the validation set; rank 0 merges, projects, saves and logs."""
        start = time.perf_counter()
        self._top_k_tried.add(epoch)  # every rank, so that all agree on what has fired

        def share(rank: int, world: int, state: dict[str, Tensor] | None) -> dict[str, TopK]:
            return self._top_k_share(trainer, rank, world, state)

        def finish(parts: list[dict[str, TopK]]) -> None:
            top = merge_top_k(parts, k=self.top_k)
            projected = project_top_k(self.plan, top)
            pictures = {}
            for layer, found in top.items():
                rows = (len(found.channels), found.k)
                crops, patches = projected[layer].crops.unflatten(0, rows), projected[layer].patches.unflatten(0, rows)
                pictures[layer] = top_k_grid(crops, patches)
            for layer, picture in pictures.items():
                save_png(picture, self.folder / f"{layer}_top{self.top_k}.png")
            save_top_k(self.folder, epoch, top, projected)  # the record's commit point
            self.top_k_done.append(epoch)
            for layer, picture in pictures.items():
                for logger in trainer.loggers:
                    log_image(logger, f"deconv/{layer}/top{self.top_k}", picture, epoch)
            self.top_k_seconds[epoch] = time.perf_counter() - start

        fire_safely(trainer, self._model, f"top-{self.top_k} scan after epoch {epoch}", share, finish, self.strict)

    def _top_k_share(self, trainer: Any, rank: int, world: int, state: dict[str, Tensor] | None) -> dict[str, TopK]:
        """This rank's top k over items ``rank, rank + world, ...`` of the validation set, with global indices."""
        data = shard(validation_data(trainer), rank, world)
        batches = None if self.top_k_batches is None else -(-self.top_k_batches // world)
        found = top_k(
            self._model,
            data,
            self.features,
            k=self.top_k,
            batch_size=self.batch_size,
            max_batches=batches,
            keep_images=True,
            image_key=self.image_key,
            state=state,
        )
        return {layer: replace(t, source=t.source * world + rank) for layer, t in found.items()}

    def _project_share(self, rank: int, world: int, state: dict[str, Tensor] | None) -> dict[str, Any]:
        """This rank's share of every layer's projections (``rows[rank::world]``), with the maxima of all."""
        model = self._model
        if not self.plan.fits(model, self.probe.shape[1:]):
            self.plan = self._make_plan(model)  # the model changed structure since the last firing
        probe = self.probe.to(next(model.parameters()).device)
        maxima = self.plan.maxima(probe, state, summaries=self.measures and rank == 0)  # only rank 0 measures
        share = {layer: found.take(range(rank, len(found.channels), world)) for layer, found in maxima.items()}
        share = {layer: found for layer, found in share.items() if len(found.channels)}
        projected = self.plan.project(probe, share, state) if share else {}
        return {"maxima": maxima, "images": {layer: p.images for layer, p in projected.items()}}

    def _merge(self, parts: list[dict[str, Any]]) -> dict[str, Projection]:
        """Put the ranks' shares back in feature order (rank ``r`` held rows ``r, r + world, ...``) and crop."""
        world, maxima = len(parts), parts[0]["maxima"]
        merged = {}
        for layer, found in maxima.items():
            images = torch.zeros(len(found.channels), *self.probe.shape[1:])
            for rank, part in enumerate(parts):
                if layer in part["images"]:
                    images[rank::world] = part["images"][layer]
            merged[layer] = Projection.assemble(self.plan.layers[layer], images, found, self.probe)
        return merged

    def snapshot(self) -> dict[str, Projection]:
        """Project the tracked features now, as a firing does (on one process), without logging anything."""
        return self._merge([self._project_share(0, 1, None)])

    def _record(self, trainer: Any, epoch: int, layers: dict[str, Projection], maxima: dict, start: float) -> None:
        """Record a firing whole or not at all: everything is computed and written first (the firing file, then
        the PNGs; a failure removes the file again), and only then does the column join the history and the
        scalars go out."""
        measured = time.perf_counter()
        columns, scalars = {}, {}
        for layer, result in layers.items():
            columns[layer], measures = self._column(layer, epoch, result, maxima[layer])
            scalars.update({f"deconv/{layer}/{name}": value for name, value in measures.items()})
        measured = time.perf_counter() - measured
        fig6 = self._figure6(layers, scalars) if self._first_conv is not None else None  # (measures, filters)
        grids = {layer: self._grid(layer, {**self.history[layer], epoch: columns[layer]}) for layer in layers}
        path = atomic_save(
            {**self._firing_file(epoch, layers, maxima, scalars), "filters": fig6[1] if fig6 else None},
            firing_path(self.folder, epoch),
        )
        try:
            for layer, grid in grids.items():
                save_png(grid, self.folder / f"{layer}_evolution.png")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        for layer, column in columns.items():  # committed: nothing below can lose the firing
            self.history[layer][epoch] = column
            if maxima[layer].gram is not None:
                self._grams[layer] = maxima[layer].gram
        self._files[epoch] = str(path)
        if fig6 is not None and self.diagnosis is not None:  # warned only for a firing that was recorded
            for line in self.diagnosis.check(fig6[0], epoch):
                rank_zero_warn(f"DeconvCallback: {line}")
        for layer, result in layers.items():
            self._log_layer(trainer, layer, grids[layer], columns[layer], result, epoch)
        self._log_filters(trainer, epoch)
        if self.occlusion and (self.occlusion_epochs is None or epoch in self.occlusion_epochs):
            self._log_occlusion(trainer, epoch, next(reversed(layers)))
        seconds = time.perf_counter() - start
        self.firing_seconds[epoch] = seconds
        self.measure_seconds[epoch] = measured
        for logger in trainer.loggers:  # one step convention for everything the callback logs: the epoch
            log_metrics(logger, {**scalars, "deconv/seconds": seconds}, epoch)
        count = sum(len(c) for c in self.features.values())
        say(
            trainer,
            f"DeconvCallback: epoch {epoch}: projected {count} features of {len(layers)} layers in {seconds:.2f}s, "
            f"logged deconv/<layer>/evolution; files in {self.folder}",
        )

    def _firing_file(self, epoch: int, layers: dict[str, Projection], maxima: dict, scalars: dict) -> dict[str, Any]:
        """What a firing file holds: plain tensors and builtins, loadable with ``weights_only=True``."""
        saved = {layer: {**_as_dict(result), "gram": maxima[layer].gram} for layer, result in layers.items()}
        sources = torch.unique(torch.cat([result.source.cpu() for result in layers.values()]))
        return {
            "format": FIRING_FORMAT,
            "version": 3,
            "epoch": epoch,
            "name": self.monitor_name,
            "settings": self.settings,
            "mode": self.mode,
            "rule": self.rule,
            "layers": saved,
            "measures": scalars,
            "probe_images": {"index": sources, "pixels": _display_pixels(self.probe[sources])},
        }

    def _column(self, layer: str, epoch: int, result: Projection, found: TopK) -> tuple[dict, dict[str, float]]:
        """This firing's column of ``layer``'s evolution grid (dead and NaN features marked), and its measures:
        CKA to the previous firing, the share of dead channels, the features' drift since the previous firing.
        A column keeps only what the grid and the next firing's measures need."""
        marks = feature_marks(result.value, result.images)
        if "NaN" in marks:
            rank_zero_warn(
                f"DeconvCallback: after epoch {epoch}, {marks.count('NaN')} features of {layer!r} have NaN/Inf "
                "activations or projections (diverged weights?); they are marked in the grid."
            )
        column = {
            "crops": torch.nan_to_num(result.crops, nan=0.0, posinf=0.0, neginf=0.0).cpu(),
            "patches": result.patches.cpu() if self.show_patches else None,
            "marks": marks,
            "source": result.source.cpu(),
        }
        measures: dict[str, float] = {}
        if found.peaks is not None:
            measures["dead"] = dead_share(found.peaks)
        earlier = [e for e in self.history[layer] if e < epoch]
        if earlier:
            previous = self.history[layer][max(earlier)]
            if found.gram is not None and layer in self._grams:
                measures["cka_previous"] = cka_from_grams(found.gram, self._grams[layer])
            if previous["crops"].shape == column["crops"].shape:
                change, moved = drift(previous["crops"], column["crops"], previous["source"], column["source"])
                measures["drift"], measures["source_changed"] = change, moved
        return column, measures

    def _figure6(self, layers: dict[str, Projection], scalars: dict[str, float]) -> tuple[FiringMeasures, dict] | None:
        """Add the Fig. 6 measures to ``scalars``; return them (for the diagnosis) and the first-layer filters."""
        try:
            weight = named_layers(self._model)[self._first_conv].weight.detach().float().cpu()
            dead = {layer: scalars[f"deconv/{layer}/dead"] for layer in layers if f"deconv/{layer}/dead" in scalars}
            images = {layer: result.images for layer, result in layers.items()}
            found = measure_firing(self._first_conv, weight, images, self._period, dead)
        except Exception as error:  # a measure that fails must never cost the firing
            rank_zero_warn(f"DeconvCallback could not measure the Fig. 6 spectrum and aliasing: {error}")
            return None
        scalars.update(found.scalars())
        return found, {"name": self._first_conv, "weight": weight}

    def _log_filters(self, trainer: Any, epoch: int) -> None:
        """The first layer's filters as a picture (the paper's Fig. 6) and their RMS as a histogram, on TensorBoard."""
        if self._first_conv is None:
            return
        weight = named_layers(self._model)[self._first_conv].weight.detach().float().cpu()
        rms = weight.flatten(1).pow(2).mean(dim=1).sqrt()
        picture = filter_grid(weight) if weight.shape[1] in (1, 3) else None
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            try:
                if picture is not None:
                    log_image(logger, f"deconv/{self._first_conv}/filters", picture, epoch)
                if hasattr(experiment, "add_histogram"):
                    experiment.add_histogram(f"deconv/{self._first_conv}/filter_rms", rms, global_step=epoch)
            except Exception as error:  # a logging failure must never stop training
                rank_zero_warn(f"DeconvCallback could not log the filters to {type(logger).__name__}: {error}")

    # ------------------------------------------------------------------ output
    def evolution(self, layer: str) -> Tensor:
        """The evolution grid of ``layer`` so far: ``[3, H, W]``, rows = features, columns = epochs."""
        return self._grid(layer, self.history[layer])

    def _grid(self, layer: str, columns: dict[int, dict[str, Any]]) -> Tensor:
        epochs = sorted(columns)
        return evolution_grid(
            [columns[e]["crops"] for e in epochs],
            [f"ep {e}" for e in epochs],
            [f"#{c}" for c in self.features[layer]],
            patches=[columns[e]["patches"] for e in epochs] if self.show_patches else None,
            marks=[columns[e]["marks"] for e in epochs],
        )

    def _log_layer(self, trainer: Any, layer: str, grid: Tensor, column: dict, result: Projection, epoch: int) -> None:
        crops = column["crops"]
        snapshot = projection_grid(crops, result.patches.cpu() if self.show_patches else None, nrow=len(crops))
        for tag, image in ((f"deconv/{layer}/evolution", grid), (f"deconv/{layer}/epoch", snapshot)):
            for logger in trainer.loggers:
                log_image(logger, tag, image, epoch)

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
    def _check_record(self, trainer: Any) -> None:
        """Make the record whole before training: clear what a killed writer left, set aside earlier files that
        are not this run's, bring a resumed run's firing files into this log dir, and forget a restored column
        whose file is lost (the end-of-training firing is then made again)."""
        dropped: list[int] = []
        if trainer.is_global_zero:
            remove_temporaries(self.folder)
            if not self._restored and (aside := set_aside(self.folder)) is not None:
                rank_zero_warn(
                    f"DeconvCallback: {self.folder} held firings of another run; they were moved to {aside}."
                )
            dropped = self._adopt_files()
        if trainer.world_size > 1:
            dropped = trainer.strategy.broadcast(dropped, src=0)  # every rank must agree on what has fired
        for epoch in dropped:
            for columns in self.history.values():
                columns.pop(epoch, None)
            self._files.pop(epoch, None)

    def _adopt_files(self) -> list[int]:
        """Copy a restored history's firing files into this run's folder (a resume into a new logger version);
        return the epochs whose file is missing or unreadable everywhere, with one warning."""
        lost = []
        for epoch in sorted({e for columns in self.history.values() for e in columns}):
            here = firing_path(self.folder, epoch)
            if is_whole(here):
                self._files[epoch] = str(here)
                continue
            earlier = Path(self._files.get(epoch, here))
            if earlier != here and is_whole(earlier):
                atomic_copy(earlier, here)
                self._files[epoch] = str(here)
            else:
                lost.append(epoch)
        if lost:
            rank_zero_warn(
                f"DeconvCallback: the firing files of epochs {lost} are missing or unreadable (looked in "
                f"{self.folder}); their columns are dropped from the grids so that every column has its file. "
                "The end-of-training firing, if it is one of them, is made again."
            )
        return lost

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "settings": self.settings,
            "options": self._options(),
            "probe": self.probe,
            "features": self.features,
            "history": self.history,
            "grams": self._grams,
            "files": self._files,
            "top_k_done": self.top_k_done,
        }

    @override
    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Say, once, when the checkpoint's DeconvCallback had other settings, and whether its history is kept
        (the options of when and what to log changed) or not (what is computed changed: never mixed in a grid)."""
        states = checkpoint.get("callbacks", {})
        if self.state_key in states:
            changed = _differences(states[self.state_key].get("options", {}), self._options())
            if changed:
                rank_zero_warn(
                    f"DeconvCallback: the checkpoint's DeconvCallback had other settings ({changed}); they do not "
                    "change what is computed, so its history is kept."
                )
            return
        others = [state for key, state in states.items() if key.startswith(type(self).__qualname__ + "{")]
        if len(others) != 1:
            return
        before = others[0].get("settings")
        if before is None:
            changed = "it was written by lightning-deconv before 0.2, which kept no settings"
        else:
            changed = _differences(before, self.settings) or f"its name differs (now {self.monitor_name!r})"
        rank_zero_warn(
            f"DeconvCallback: the checkpoint's DeconvCallback had other settings ({changed}). Its history is not "
            f"used: this run's grids start afresh in deconv/{self.monitor_name} (the earlier files stay where they "
            "are). Resume with the same settings to keep the history."
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe = state_dict["probe"]
        self.features = state_dict["features"]
        self.history = state_dict["history"]
        self._grams = dict(state_dict.get("grams", {}))
        self._files = dict(state_dict.get("files", {}))
        self.top_k_done = list(state_dict.get("top_k_done", []))
        self._restored = True

    def _log_occlusion(self, trainer: Any, epoch: int, layer: str) -> None:
        """The paper's Fig. 7 maps for the first ``occlusion`` probe images, on the live weights."""
        images = self.probe[: self.occlusion]
        side = min(images.shape[-2:])
        device = next(self._model.parameters()).device
        found = occlusion(self._model, images.to(device), layer, patch=max(1, side // 4), stride=max(1, side // 16))
        picture = occlusion_grid(images, found.feature, found.probability, found.label)
        for logger in trainer.loggers:
            log_image(logger, "deconv/occlusion", picture, epoch)

    @staticmethod
    def _add_layout(trainer: Any) -> None:
        """TensorBoard's custom-scalars layout: one chart per measure, one line per layer."""
        charts = {
            "layer settling: linear CKA to the previous firing": "cka_previous",
            "dead features: share of channels never positive on the probe": "dead",
            "feature drift: mean 1 - cosine of projections since the previous firing": "drift",
            "share of features whose strongest probe image changed": "source_changed",
            "first-layer filters: mean share of spectral power, low / mid / high band": "spectrum/.*",
            "aliasing: share of the projections' power on the first conv's stride lattice": "aliasing",
        }
        layout = {"deconv": {title: ["Multiline", [rf"deconv/.*/{tag}$"]] for title, tag in charts.items()}}
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_custom_scalars"):
                try:
                    experiment.add_custom_scalars(layout)
                except Exception as error:  # a logging failure must never stop training
                    rank_zero_warn(f"DeconvCallback could not write the TensorBoard layout: {error}")


def _first_conv(model: nn.Module, seen: Trace) -> str | None:
    """The name of the first convolution the model ran (the paper's layer-1 filters)."""
    modules = named_layers(model)
    return next((name for name in seen.order if isinstance(modules.get(name), nn.Conv2d)), None)


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


def _differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """``"name old -> new; ..."`` for the settings that differ."""
    return "; ".join(f"{k} {before.get(k)!r} -> {v!r}" for k, v in now.items() if k in before and before[k] != v)


def _display_pixels(images: Tensor) -> Tensor:
    """Probe images as ``uint8`` pixels for display (each min-max scaled): a firing file keeps its features'
    source images this way, a quarter of the float size."""
    return (normalize(images.detach().float().cpu(), "minmax") * 255).round().to(torch.uint8)


def _writes_tensorboard(logger: Any) -> bool:
    """A logger whose files TensorBoard can show (not a stand-in such as ``fast_dev_run``'s)."""
    return type(logger).__name__ == "TensorBoardLogger" and getattr(logger, "save_dir", None) is not None
