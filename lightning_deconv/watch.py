"""What the monitors watch and where they record it: one probe, the tracked features, the plan and the run folder.

A :class:`Watch` is the one piece of state the monitors share. :class:`~lightning_deconv.callback.DeconvCallback`
makes one from its arguments; give the same ``Watch`` to :class:`~lightning_deconv.monitors.TopKMonitor` and
:class:`~lightning_deconv.monitors.OcclusionMonitor` and they use the same probe images, the same features and the
same folder, set up once per fit (after ``configure_model``, the move to the device and checkpoint restore, before
the first step: bad input fails there, not hours into training).
"""

from __future__ import annotations

import hashlib
import re
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_deconv._compat import rank_zero_info, rank_zero_warn
from lightning_deconv._trainer import data_source, projected_model, same_on_every_rank
from lightning_deconv.checks import check_int
from lightning_deconv.engine import Projection, Projector, check_rule_and_mode
from lightning_deconv.layers import check_images, layer_name
from lightning_deconv.probe import draw_probe, untouched_rng
from lightning_deconv.record import remove_temporaries, set_aside
from lightning_deconv.selection import choose_features
from lightning_deconv.stages import Trace, auto_layers, trace

__all__ = ["Watch", "own_watch"]

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class Watch:
    r"""The probe, the features and the record folder that monitors share, set up once per fit.

    Args:
        probe: the fixed probe images: a ``[N, C, H, W]`` tensor (normalised as the model expects), a
            ``Dataset`` or ``DataLoader`` (``probe_size`` images drawn with ``seed``), or ``None`` to draw them
            at fit start from the datamodule's ``probe_dataset()``, else the validation data, else the
            training data, wherever they are defined (loaders passed to ``fit()``, a datamodule, or the
            LightningModule's hooks). Random transforms are made deterministic by seeding each item.
        probe_size: how many images to draw when ``probe`` is not a tensor.
        image_key: the image's key in dict items or batches (default: ``"image"``, ``"images"``, ``"x"``, ...).
        layers: ``"auto"`` (one layer per spatial-resolution stage; ZFNet/AlexNet: conv1..conv5 after ReLU and
            pooling; VGG: the pooled stages; ResNet: the stem and ``layer1..layer4``) or a list of module names
            from ``model.named_modules()``.
        features_per_layer: how many channels to track per layer, a seeded random subset (the paper's
            "randomly chosen subset").
        features: explicit ``{layer: [channels]}``; overrides ``layers`` and ``features_per_layer``.
        seed: seeds the probe draw and the feature choice.
        batch_size: at most this many probe images per forward pass (on CPU passes are cut smaller where the maps
            they hold at once would pass 24 MiB: see :meth:`~lightning_deconv.engine.Projector.images_per_pass`).
        mode: ``"max"`` (the single strongest activation, the paper) or ``"map"`` (its whole map).
        rule: ``"deconvnet"``, ``"guided"`` or ``"gradient"``.
        crop: cut each projection to its activation's ``"receptive_field"``, to the projections'
            ``"support"``, or ``"none"``.
        name: the record folder, ``<log_dir>/deconv/<name>/`` (letters, digits, ``.``, ``_``, ``-``). Default: a
            digest of the settings above, so that two watches never write over each other and a resume with other
            settings never mixes columns in one grid.

    Raises:
        TypeError, ValueError: at construction for invalid arguments; at fit start (before any training step)
            for unknown layers (nearest names listed), a probe that does not fit the model (checked with one
            dry forward), holds NaN/Inf or is not images, or more features than a layer has channels.

    Example::

        >>> from lightning_deconv import DeconvCallback, OcclusionMonitor, TopKMonitor
        >>> watch = Watch(probe=torch.rand(16, 3, 64, 64), features_per_layer=4)
        >>> callbacks = [DeconvCallback(watch=watch), TopKMonitor(watch, k=9), OcclusionMonitor(watch, images=2)]
        >>> watch.name.startswith("evolution-")
        True
    """

    def __init__(
        self,
        probe: Tensor | Dataset | DataLoader | None = None,
        probe_size: int = 32,
        image_key: str | None = None,
        layers: str | Sequence[str] = "auto",
        features_per_layer: int = 8,
        features: Mapping[str, Sequence[int]] | None = None,
        seed: int = 0,
        batch_size: int = 64,
        mode: Literal["max", "map"] = "max",
        rule: Literal["deconvnet", "guided", "gradient"] = "deconvnet",
        crop: Literal["receptive_field", "support", "none"] = "receptive_field",
        name: str | None = None,
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
        check_int(probe_size, "probe_size")
        check_int(features_per_layer, "features_per_layer")
        check_int(batch_size, "batch_size")
        check_int(seed, "seed", minimum=None)
        check_rule_and_mode(rule, mode, crop)
        if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
            raise ValueError(
                "`name` must be a folder name of letters, digits, '.', '_' or '-' (not starting with '.'); "
                f"got {name!r}."
            )
        self.probe_source, self.probe_size, self.image_key = probe, probe_size, image_key
        self.layers, self.features_per_layer = layers, features_per_layer
        self.explicit_features = {k: [int(c) for c in v] for k, v in (features or {}).items()}
        self.seed, self.batch_size, self.mode, self.rule, self.crop = seed, batch_size, mode, rule, crop
        self.settings = self._settings()
        self.name = name or f"evolution-{hashlib.sha1(repr(sorted(self.settings.items())).encode()).hexdigest()[:8]}"
        # Per-run state: made at fit start, or restored from a checkpoint by load_state_dict().
        self.probe: Tensor | None = None
        self.features: dict[str, list[int]] = {}
        self.folder: Path | None = None  # <log_dir>/deconv/<name>, set at fit start
        self.model: nn.Module | None = None  # what the plan runs: the LightningModule, or its network
        self.seen: Trace | None = None  # the dry forward's trace of the probe's first image
        self.resumed = False  # whether this fit's probe and features came from a checkpoint
        self._plan: Projector | None = None
        self._restored = False
        self._set_up_for: weakref.ref | None = None
        self.keeper: Any = None  # the one monitor whose checkpoint state carries the probe and features

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
            "probe_key": self.image_key,  # the old name: the default folder and state_key are a digest of these
            "layers": layers if not self.explicit_features else None,
            "features_per_layer": self.features_per_layer if not self.explicit_features else None,
            "features": self.explicit_features or None,
            "mode": self.mode,
            "rule": self.rule,
            "crop": self.crop,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ set-up, once per fit
    def setup(self, trainer: Any, pl_module: nn.Module) -> None:
        """Draw (or keep the restored) probe, check it with one dry forward, choose the features, find the folder and
        make the plan. Called by every monitor that shares this watch at fit start; only the first call works."""
        if self._set_up_for is not None and self._set_up_for() is trainer:
            return
        self.model = model = projected_model(pl_module)
        self.resumed = self._restored
        if not self._restored:
            self.probe = same_on_every_rank(trainer, self._draw_probe(trainer))
        check_images(model, self.probe)
        param = next(model.parameters())
        self.seen = trace(model, self.probe[:1].to(param.device, param.dtype))  # one dry forward: fails early
        if not self._restored:
            self.features = self._choose_features(model, self.seen)
        self.folder = Path(trainer.log_dir or trainer.default_root_dir) / "deconv" / self.name
        if trainer.is_global_zero:
            remove_temporaries(self.folder)
            if not self._restored and (aside := set_aside(self.folder)) is not None:
                rank_zero_warn(f"lightning-deconv: {self.folder} held firings of another run; moved to {aside}.")
        self._restored = False
        self._plan = self._make_plan(model)
        self._set_up_for = weakref.ref(trainer)
        rank_zero_info(f"lightning-deconv: {self._plan.describe()}")  # no progress bar to print above yet

    def release(self) -> None:
        """Forget the fit (at its end), so that the next fit sets up again."""
        self._set_up_for = None

    @property
    def plan(self) -> Projector:
        """The projection plan for the live model, remade if the model changed structure since the last firing."""
        if self._plan is None or self.model is None:
            raise RuntimeError("The watch is set up at fit start; use it inside a fit.")
        if not self._plan.fits(self.model, self.probe.shape[1:]):
            self._plan = self._make_plan(self.model)
        return self._plan

    @property
    def device(self) -> Any:
        """Where the live model's parameters are."""
        return next(self.model.parameters()).device

    def project_share(
        self, rank: int, world: int, state: Mapping[str, Tensor] | None, summaries: bool = False
    ) -> dict[str, Any]:
        """One DDP rank's share of a firing: the maxima of every tracked feature on the probe, and the projections
        of rows ``rank, rank + world, ...`` of each layer (``summaries``: with the channel peaks and Gram matrices
        the measures need)."""
        plan, probe = self.plan, self.probe.to(self.device)
        ops = plan.ops()  # one for both halves of the firing: each filter is laid out once
        maxima = plan.maxima(probe, state, summaries=summaries, ops=ops)
        share = {layer: found.take(range(rank, len(found.channels), world)) for layer, found in maxima.items()}
        share = {layer: found for layer, found in share.items() if len(found.channels)}
        projected = plan.project(probe, share, state, ops=ops) if share else {}
        return {"maxima": maxima, "images": {layer: p.images for layer, p in projected.items()}}

    def merge(self, parts: list[dict[str, Any]]) -> dict[str, Projection]:
        """The ranks' shares back in feature order (rank ``r`` held rows ``r, r + world, ...``), cropped."""
        world, maxima = len(parts), parts[0]["maxima"]
        merged = {}
        for layer, found in maxima.items():
            images = torch.zeros(len(found.channels), *self.probe.shape[1:])
            for rank, part in enumerate(parts):
                if layer in part["images"]:
                    images[rank::world] = part["images"][layer]
            merged[layer] = Projection.assemble(self.plan.layers[layer], images, found, self.probe)
        return merged

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

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The probe and the features: what a resumed run must keep to continue the same record."""
        return {"probe": self.probe, "features": self.features}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the probe and features of a checkpoint (the next fit start keeps them)."""
        self.probe, self.features = state["probe"], state["features"]
        self._restored = True


def own_watch(watch: Watch | None) -> Watch:
    """``watch``, checked, or a default ``Watch()`` for a monitor used alone."""
    if watch is not None and not isinstance(watch, Watch):
        raise TypeError(f"`watch` must be a lightning_deconv.Watch, got {type(watch).__name__}.")
    return watch or Watch()
