"""DeconvCallback: feature evolution during training, logged to TensorBoard (Zeiler & Fergus 2014, Fig. 4).

At chosen epochs the callback takes a fixed probe set, finds each tracked feature's strongest activation
over it, projects that activation back to pixel space with the deconvnet (:mod:`lightning_deconv.engine`)
and logs, per layer, an *evolution grid*: rows are features, columns the epochs fired so far.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.utils import save_image

from lightning_deconv._compat import callback_bases, override, rank_zero_info, rank_zero_warn
from lightning_deconv.engine import MODES, RULES, project
from lightning_deconv.geometry import ReceptiveField, receptive_field
from lightning_deconv.layers import check_images, eval_mode, layer_name
from lightning_deconv.render import crop, evolution_grid, projection_grid, support_boxes
from lightning_deconv.selection import auto_layers, choose_features, draw_probe, find_maxima, trace

__all__ = ["PAPER_EPOCHS", "DeconvCallback"]

PAPER_EPOCHS: tuple[int, ...] = (1, 2, 5, 10, 20, 30, 40, 64)
CROPS = ("receptive_field", "support", "none")


def _normalise_epochs(epochs: Sequence[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated 1-based epochs; zero, negative or non-integer epochs are rejected."""
    bad = [e for e in epochs if isinstance(e, bool) or not isinstance(e, int) or e < 1]
    if bad:
        raise ValueError(
            f"`epochs` must be positive integers counted from 1 (epoch 1 = after the first pass); got {bad}."
        )
    return tuple(sorted(set(epochs)))


class DeconvCallback(*callback_bases()):
    r"""Project each tracked feature's strongest activation back to pixels at chosen epochs, and log it.

    Works with ``lightning.pytorch.Trainer`` and ``pytorch_lightning.Trainer``. Monitoring never changes
    training: projections run in eval mode on the live weights, consume no random numbers, leave no
    gradients and move no BatchNorm statistics.

    Args:
        probe: the fixed probe images: a ``[N, C, H, W]`` tensor (normalised as the model expects), a
            ``Dataset`` of images or ``(image, target)`` pairs (``probe_size`` items drawn with ``seed``),
            or ``None`` to draw them at fit start from the datamodule's ``probe_dataset()``, else its
            validation set, else its training set (random transforms made deterministic by seeding).
        probe_size: how many images to draw when ``probe`` is a dataset or ``None``.
        layers: ``"auto"`` (the conv stages; ZFNet/AlexNet: conv1..conv5 after ReLU and pooling) or a
            list of module names from ``model.named_modules()``.
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

    Raises:
        ValueError: at construction for invalid arguments, and at fit start (before any training step)
            for unknown layers (nearest names listed), a probe that does not fit the model (checked with
            one dry forward), an empty probe or more features than a layer has channels.

    Logs, on rank 0, per layer: ``deconv/<layer>/evolution`` (the evolution grid so far) and
    ``deconv/<layer>/epoch`` (this firing's features), both with ``global_step`` = epoch, and the scalar
    ``deconv/seconds``. TensorBoard keeps only 10 images per tag unless started with
    ``--samples_per_plugin images=100``. Each firing's projections, crops, sources, positions and values
    are saved to ``<log_dir>/deconv/epoch_XXX.pt`` and each layer's grid to a PNG beside it.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> probe = torch.rand(16, 3, 64, 64)
        >>> trainer = Trainer(callbacks=[DeconvCallback(probe=probe, features_per_layer=4, epochs=(1, 2, 5))])
    """

    def __init__(
        self,
        probe: Tensor | Dataset | None = None,
        probe_size: int = 32,
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
    ) -> None:
        if probe is not None and not isinstance(probe, (Tensor, Dataset)):
            raise TypeError(f"`probe` must be a Tensor, a Dataset or None, got {type(probe).__name__}.")
        if isinstance(probe, Tensor) and (probe.dim() != 4 or len(probe) == 0):
            raise ValueError(f"A probe tensor must be non-empty [N, C, H, W], got shape {tuple(probe.shape)}.")
        if layers != "auto" and (isinstance(layers, str) or not layers):
            raise ValueError(f"`layers` must be 'auto' or a non-empty list of module names, got {layers!r}.")
        if features is not None and (not features or any(len(c) == 0 for c in features.values())):
            raise ValueError("`features` must map each layer name to a non-empty list of channels.")
        for value, label in ((probe_size, "probe_size"), (features_per_layer, "features_per_layer")):
            if value < 1:
                raise ValueError(f"`{label}` must be at least 1, got {value}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        for value, allowed, label in ((mode, MODES, "mode"), (rule, RULES, "rule"), (crop, CROPS, "crop")):
            if value not in allowed:
                raise ValueError(f"Unknown {label} {value!r}; choose one of {allowed}.")
        self.epochs = _normalise_epochs(epochs)
        if not self.epochs and not fire_at_end:
            raise ValueError("Nothing would ever fire: give some `epochs` or set `fire_at_end=True`.")
        self.probe_source = probe
        self.probe_size = probe_size
        self.layers = layers
        self.features_per_layer = features_per_layer
        self.explicit_features = {k: [int(c) for c in v] for k, v in (features or {}).items()}
        self.fire_at_end = fire_at_end
        self.mode, self.rule, self.crop, self.show_patches = mode, rule, crop, show_patches
        self.seed, self.batch_size = seed, batch_size
        # Per-run state, created in setup() or restored by load_state_dict().
        self.probe: Tensor | None = None
        self.features: dict[str, list[int]] = {}
        self.history: dict[str, dict[int, dict[str, Tensor]]] = {}
        self._fields: dict[str, ReceptiveField | None] = {}
        self._windows: dict[str, ReceptiveField | None] = {}
        self._fired_epochs: set[int] = set()
        self.firing_seconds: dict[int, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            layers=self.layers, features=self.explicit_features, epochs=self.epochs, seed=self.seed
        )

    # ------------------------------------------------------------------ set-up: validate before training
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self.probe = self._resolve_probe(trainer)
        check_images(pl_module, self.probe)
        param = next(pl_module.parameters())
        seen = trace(pl_module, self.probe[:1].to(param.device, param.dtype))
        self.features = self._choose_features(pl_module, seen)
        self.history = {layer: {} for layer in self.features}
        self._fired_epochs = set()
        self.firing_seconds = {}
        fields = {layer: self._receptive_field(pl_module, layer) for layer in self.features}
        self._fields = fields if self.crop == "receptive_field" else {}
        self._windows = self._exact_windows(pl_module, fields)

    def _resolve_probe(self, trainer: Any) -> Tensor:
        source = self.probe_source
        if isinstance(source, Tensor):
            return source.detach().cpu()
        if source is None:
            source = self._dataset_from(trainer)
        images, _ = draw_probe(source, self.probe_size, self.seed)
        return images

    @staticmethod
    def _dataset_from(trainer: Any) -> Dataset:
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "probe_dataset"):
            return datamodule.probe_dataset()
        for owner in (datamodule, trainer.lightning_module):
            for method in ("val_dataloader", "train_dataloader"):
                try:
                    loader = getattr(owner, method, None) and getattr(owner, method)()
                except NotImplementedError:  # a LightningModule that does not define it
                    loader = None
                if loader is not None and hasattr(loader, "dataset"):
                    return loader.dataset
        raise ValueError(
            "DeconvCallback(probe=None) needs a datamodule (or LightningModule) with a val_dataloader or "
            "train_dataloader to draw the probe from. Pass `probe=` a tensor of images or a Dataset."
        )

    def _choose_features(self, pl_module: Any, seen: Any) -> dict[str, list[int]]:
        if self.explicit_features:
            wanted = {layer_name(pl_module, name): chans for name, chans in self.explicit_features.items()}
        elif self.layers == "auto":
            wanted = dict.fromkeys(auto_layers(pl_module, seen))
        else:
            wanted = dict.fromkeys(layer_name(pl_module, name) for name in self.layers)
        if not wanted:
            raise ValueError(f"Found no convolutional stages in {type(pl_module).__name__}; name `layers`.")
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

    def _receptive_field(self, pl_module: Any, layer: str) -> ReceptiveField | None:
        try:
            return receptive_field(pl_module, layer, tuple(self.probe.shape[1:]))
        except ValueError as error:
            if self.crop == "receptive_field":
                rank_zero_warn(f"DeconvCallback: {error} Cropping {layer!r} to the projections' support.")
            return None

    def _exact_windows(
        self, pl_module: Any, fields: dict[str, ReceptiveField | None]
    ) -> dict[str, ReceptiveField | None]:
        """Per layer, its field if projecting on receptive-field windows is exact for this model, else None.

        Windows are what keeps a firing cheap (deep layers see a part of the image, shallow ones a patch),
        but they are only as right as the traced geometry, so they are checked once here against whole-image
        projections of a few probe images.
        """
        known = {layer: field for layer, field in fields.items() if field is not None}
        if not known or self.mode != "max":
            return dict.fromkeys(fields)
        probe = self.probe[:4].to(next(pl_module.parameters()).device)
        with eval_mode(pl_module):
            maxima = find_maxima(pl_module, probe, {layer: self.features[layer] for layer in known})
        windows: dict[str, ReceptiveField | None] = dict.fromkeys(fields)
        for layer, field in known.items():
            whole = project(pl_module, probe, layer, maxima[layer], rule=self.rule)
            windowed = project(pl_module, probe, layer, maxima[layer], rule=self.rule, field=field)
            scale = whole.abs().amax()
            if scale > 0 and (windowed - whole).abs().amax() <= 1e-4 * scale:
                windows[layer] = field
            else:
                rank_zero_warn(
                    f"DeconvCallback: projecting {layer!r} on whole images (its receptive field is not exact)."
                )
        return windows

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
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        completed = trainer.fit_loop.epoch_progress.current.completed
        if self.fire_at_end and completed > 0 and not self._fired(completed):
            self._fire(trainer, pl_module, completed)
        if trainer.is_global_zero:
            self._print_tensorboard_command(trainer)

    def _fired(self, epoch: int) -> bool:
        return epoch in self._fired_epochs or any(epoch in columns for columns in self.history.values())

    def _maybe_fire(self, trainer: Any, pl_module: Any, epoch: int) -> None:
        if epoch in self.epochs and not self._fired(epoch):
            self._fire(trainer, pl_module, epoch)

    # ------------------------------------------------------------------ one firing
    def _fire(self, trainer: Any, pl_module: Any, epoch: int) -> None:
        start = time.perf_counter()
        rank, world = trainer.global_rank, trainer.world_size
        share = {layer: chans[rank::world] for layer, chans in self.features.items() if chans[rank::world]}
        mine = self.snapshot(pl_module, share, _rank_zero_buffers(pl_module, world))
        results = _gather_to_zero(mine, world)
        self._fired_epochs.add(epoch)  # every rank must agree on what has fired, or collectives would hang
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        layers = {layer: _interleave([r[layer] for r in results if layer in r], world) for layer in self.features}
        for layer, result in layers.items():
            self.history[layer][epoch] = {"crops": result["crops"], "patches": result["patches"]}
        out_dir = Path(log_dir) / "deconv"
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"epoch": epoch, "mode": self.mode, "rule": self.rule, "layers": layers},
            out_dir / f"epoch_{epoch:03d}.pt",
        )
        for layer, result in layers.items():
            self._log_layer(trainer, out_dir, layer, result, epoch)
        seconds = time.perf_counter() - start
        self.firing_seconds[epoch] = seconds
        for logger in trainer.loggers:
            logger.log_metrics({"deconv/seconds": seconds}, step=trainer.global_step)
        count = sum(len(c) for c in self.features.values())
        _say(
            trainer,
            f"DeconvCallback: epoch {epoch}: projected {count} features of {len(layers)} layers in {seconds:.2f}s, "
            f"logged deconv/<layer>/evolution; files in {out_dir}",
        )

    def snapshot(
        self, pl_module: Any, features: dict[str, list[int]] | None = None, state: dict[str, Tensor] | None = None
    ) -> dict[str, dict[str, Tensor]]:
        """Project the tracked features (or ``features``) now, as a firing does, without logging anything.

        The maxima of every feature come from one forward pass over the probe set, stopped at the deepest
        layer; then each layer's features are projected in one batch, on receptive-field windows where that
        is exact. Returns, per layer, ``channels``, ``projections``, ``crops``, ``patches``, ``source``,
        ``position``, ``value`` and ``boxes``.
        """
        share = self.features if features is None else features
        if not share:
            return {}
        device = next(pl_module.parameters()).device
        probe = self.probe.to(device)
        with eval_mode(pl_module), torch.inference_mode(False):
            maxima = find_maxima(pl_module, probe, share, self.batch_size, state)
        out = {}
        for layer, found in maxima.items():
            projections = project(
                pl_module, probe, layer, found, self.mode, self.rule, state=state, field=self._windows.get(layer)
            ).cpu()
            boxes = self._boxes(layer, projections, found.position)
            out[layer] = {
                "channels": found.channels,
                "projections": projections,
                "crops": crop(projections, boxes),
                "patches": crop(self.probe[found.source], boxes),
                "source": found.source,
                "position": found.position,
                "value": found.value,
                "boxes": boxes,
            }
        return out

    def _boxes(self, layer: str, projections: Tensor, positions: Tensor) -> Tensor:
        field = self._fields.get(layer)
        if field is not None:
            return field.boxes(positions, within=tuple(projections.shape[-2:]))
        if self.crop != "none":
            return support_boxes(projections)
        h, w = projections.shape[-2:]
        return torch.tensor([[0, 0, h, w]]).expand(len(projections), -1)

    # ------------------------------------------------------------------ output
    def evolution(self, layer: str) -> Tensor:
        """The evolution grid of ``layer`` so far: ``[3, H, W]``, rows = features, columns = epochs."""
        columns = self.history[layer]
        epochs = sorted(columns)
        return evolution_grid(
            [columns[e]["crops"] for e in epochs],
            [f"ep {e}" for e in epochs],
            [f"#{c}" for c in self.features[layer]],
            patches=[columns[e]["patches"] for e in epochs] if self.show_patches else None,
        )

    def _log_layer(self, trainer: Any, out_dir: Path, layer: str, result: dict, epoch: int) -> None:
        grid = self.evolution(layer)
        patches = result["patches"] if self.show_patches else None
        snapshot = projection_grid(result["crops"], patches, nrow=len(result["crops"]))
        save_image(grid, out_dir / f"{layer}_evolution.png")
        for tag, image in ((f"deconv/{layer}/evolution", grid), (f"deconv/{layer}/epoch", snapshot)):
            for logger in trainer.loggers:
                _log_image(logger, tag, image, epoch)

    @staticmethod
    def _print_tensorboard_command(trainer: Any) -> None:
        for logger in trainer.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_image"):
                _say(
                    trainer,
                    "DeconvCallback: see the feature evolution with\n"
                    f"  tensorboard --logdir {logger.save_dir} --samples_per_plugin images=100",
                )

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"probe": self.probe, "features": self.features, "history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe = state_dict["probe"]
        self.features = state_dict["features"]
        self.history = state_dict["history"]


def _say(trainer: Any, message: str) -> None:
    """One line for the user, above the progress bar if there is one (rank 0 only)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and hasattr(bar, "print") and trainer.is_global_zero:
        bar.print(message)
    else:
        rank_zero_info(message)


def _log_image(logger: Any, tag: str, image: Tensor, epoch: int) -> None:
    """Log through TensorBoard's ``add_image`` or a logger's ``log_image``; warn rather than crash."""
    try:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, image, global_step=epoch)
        elif hasattr(logger, "log_image"):
            logger.log_image(key=tag, images=[image], step=epoch)
    except Exception as error:  # a logging failure must never stop training
        rank_zero_warn(f"DeconvCallback could not log {tag!r} to {type(logger).__name__}: {error}")


def _rank_zero_buffers(model: Any, world: int) -> dict[str, Tensor] | None:
    """Under DDP, rank 0's buffers (BatchNorm statistics), which can differ on other ranks between forward
    passes; every rank projects with them, without changing its own copy."""
    if world == 1 or not torch.distributed.is_initialized():
        return None
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    for tensor in buffers.values():
        torch.distributed.broadcast(tensor, src=0)
    return buffers


def _gather_to_zero(mine: dict, world: int) -> list[dict]:
    """Every rank's results, on rank 0 (other ranks get an empty list)."""
    if world == 1 or not torch.distributed.is_initialized():
        return [mine]
    gathered: list[dict] | None = [{} for _ in range(world)] if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    return gathered or []


def _interleave(parts: list[dict[str, Tensor]], world: int) -> dict[str, Tensor]:
    """Undo the ``channels[rank::world]`` split: rank ``r``'s ``i``-th item was feature ``i * world + r``."""
    if len(parts) == 1:
        return parts[0]
    total = sum(len(p["channels"]) for p in parts)
    order = torch.cat([torch.arange(r, total, world) for r in range(len(parts))]).argsort()
    return {key: torch.cat([p[key] for p in parts])[order] for key in parts[0]}
