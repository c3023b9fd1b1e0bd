"""The top k activations of each feature over a whole dataset: the paper's Figure 2, streamed.

Zeiler & Fergus (2014, Fig. 2) show, for a random subset of features in each layer, the 9 strongest
activations across the validation data, each projected to pixel space beside its image patch. An image
counts once per feature, at its strongest position, so the 9 come from 9 different images.

:func:`top_k` finds them with one forward pass per batch, stopped at the deepest layer, for all layers at
once. It keeps per feature only a running top k: the running ``[F, k]`` and the batch's ``[F, B]``
per-image maxima are merged and cut back to ``k`` inside the layer's forward hook, so memory is
``O(F * k)`` plus one batch however many images are scanned. :func:`merge_top_k` merges the top k of
shards (DDP ranks) into the top k of the whole; :func:`project_top_k` projects all ``F * k`` activations;
:func:`save_top_k` and :func:`load_top_k` write and read a run's results for
:mod:`lightning_deconv.paper.figure2`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_deconv.batches import image_batches, images_in
from lightning_deconv.checks import check_int
from lightning_deconv.engine import Projection, Projector, Rule
from lightning_deconv.kernels import FastCPUOps
from lightning_deconv.layers import bound_forward, check_images, eval_mode, run_until, uncompiled
from lightning_deconv.probe import untouched_rng
from lightning_deconv.record import RecordError, atomic_save, load_record
from lightning_deconv.selection import Maxima, image_maxima, pooling_switches, resolve_features

__all__ = ["SavedTopK", "TopK", "load_top_k", "merge_top_k", "project_top_k", "save_top_k", "top_k", "top_k_path"]


@dataclass(frozen=True)
class TopK:
    """The ``k`` strongest activations of each tracked channel of one layer, each in a different image.

    Row ``f`` is channel ``channels[f]``; its columns are the images with the largest activation of that
    channel, strongest first, the earlier image first among equal values.

    Attributes:
        channels: ``[F]`` the tracked channels.
        value: ``[F, k]`` descending: each image's largest activation of the channel (float32; float64 for
            float64 models).
        index: ``[F, k]`` the image's position in the data's order (counted over every image scanned).
        position: ``[F, k, 2]`` (row, col) of that activation in the layer's output map (its first position
            in row-major order if the image reaches the value at several).
        map_size: ``(H, W)`` of the layer's output map.
        switch: for a max-pooling layer, ``[F, k, 2]`` the (row, col) in the pooling's input that each
            maximum was taken from (the paper's switch); ``None`` otherwise.
        images: ``[F, k, C, H, W]`` the images themselves, as the data gave them, when :func:`top_k` kept
            them (data that cannot be indexed again: loaders and iterable datasets); ``None`` otherwise.
    """

    channels: Tensor
    value: Tensor
    index: Tensor
    position: Tensor
    map_size: tuple[int, int]
    switch: Tensor | None = None
    images: Tensor | None = None

    @property
    def k(self) -> int:
        """How many images each row holds (fewer than asked for if the data had fewer)."""
        return self.value.shape[1]

    def reindexed(self, mapping: int | Tensor) -> TopK:
        """The same, with ``index`` moved to a larger dataset: ``index + mapping`` for an offset, or
        ``mapping[index]`` for a tensor of global indices (e.g. a ``DistributedSampler``'s indices of a rank).
        """
        index = self.index + mapping if isinstance(mapping, int) else torch.as_tensor(mapping)[self.index]
        return replace(self, index=index)


def _best(value: Tensor, index: Tensor, k: int) -> Tensor:
    """Per row, the columns of the best ``k`` candidates: the larger value first, then the smaller index;
    an index met twice in a row counts once (its first column). Fewer than ``k`` if fewer are distinct."""
    order = index.argsort(dim=1, stable=True)
    ordered = index.gather(1, order)
    repeat = torch.zeros_like(ordered, dtype=torch.uint8)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    # Stable sorts compose: by index, then by value descending, then repeats last.
    by_value = value.gather(1, order).argsort(dim=1, descending=True, stable=True)
    order, repeat = order.gather(1, by_value), repeat.gather(1, by_value)
    order = order.gather(1, repeat.argsort(dim=1, stable=True))
    distinct = int((1 - repeat).sum(dim=1).min()) if len(repeat) else 0
    return order[:, : min(k, distinct)]


def _take(top: TopK, order: Tensor) -> TopK:
    """The columns ``order [F, k]`` of every per-image field of ``top``."""

    def pick(tensor: Tensor | None) -> Tensor | None:
        if tensor is None:
            return None
        at = order.reshape(*order.shape, *[1] * (tensor.dim() - 2)).expand(*order.shape, *tensor.shape[2:])
        return tensor.gather(1, at)

    return replace(
        top,
        value=pick(top.value),
        index=pick(top.index),
        position=pick(top.position),
        switch=pick(top.switch),
        images=pick(top.images),
    )


def _concat(parts: Sequence[TopK]) -> TopK:
    """The parts' columns side by side (``switch`` and ``images`` only if every part has them)."""

    def cat(field: str) -> Tensor | None:
        tensors = [getattr(p, field) for p in parts]
        return None if any(t is None for t in tensors) else torch.cat(tensors, dim=1)

    first = parts[0]
    return TopK(
        first.channels, cat("value"), cat("index"), cat("position"), first.map_size, cat("switch"), cat("images")
    )


class _RunningTopK:
    """The running top k of every layer, updated in the layers' forward hooks, one batch at a time."""

    def __init__(self, modules: dict[str, nn.Module], channels: dict[str, Tensor], k: int, keep: bool) -> None:
        self.modules, self.channels, self.k, self.keep = modules, channels, k, keep
        self.best: dict[str, TopK] = {}
        self.seen = 0
        self.batch: Tensor | None = None  # the images of the batch being scanned, as the data gave them

    def __call__(self, name: str, activation: Tensor, layer_input: Tensor | None) -> TopK:
        channels = self.channels[name]
        value, position = image_maxima(name, activation, channels)  # [F, B], [F, B, 2]
        f, b = value.shape
        pooled = isinstance(self.modules[name], nn.MaxPool2d) and isinstance(layer_input, Tensor)
        pooled = pooled and layer_input.dim() == 4
        new = TopK(
            channels,
            value,
            torch.arange(self.seen, self.seen + b).expand(f, b),
            position,
            tuple(activation.shape[-2:]),
            torch.zeros(f, b, 2, dtype=torch.long) if pooled else None,
        )
        previous = self.best.get(name)
        kept = 0 if previous is None else previous.k
        candidates = new if previous is None else _concat([replace(previous, images=None), new])
        order = _best(candidates.value, candidates.index, self.k)
        best = _take(candidates, order)
        fresh = order >= kept  # columns that come from this batch
        rows = torch.arange(f).unsqueeze(1).expand_as(order)
        if pooled and fresh.any():
            # Switches of this batch's winners only, while the pooling's input is still alive.
            winners = Maxima(
                channels[rows[fresh]], best.value[fresh], order[fresh] - kept, best.position[fresh], new.map_size
            )
            best.switch[fresh] = pooling_switches(self.modules[name], layer_input, winners)
        if self.keep:  # copies of the chosen images, so that the batch itself is not held
            images = self.batch.new_empty((*order.shape, *self.batch.shape[1:]))
            images[fresh] = self.batch[order[fresh] - kept]
            if previous is not None:
                images[~fresh] = previous.images[rows[~fresh], order[~fresh]]
            best = replace(best, images=images)
        return best


def _keeps_images(data: object) -> bool:
    """Whether images must be kept to be seen again: a loader or an iterable dataset cannot be indexed."""
    return isinstance(data, (DataLoader, IterableDataset))


@torch.no_grad()
def top_k(
    model: nn.Module,
    data: Tensor | Dataset | DataLoader,
    layers: Mapping[str | nn.Module, Sequence[int] | Tensor],
    k: int = 9,
    batch_size: int = 64,
    max_batches: int | None = None,
    keep_images: bool | None = None,
    key: str | None = None,
    state: Mapping[str, Tensor] | None = None,
) -> dict[str, TopK]:
    """For each layer and each of its listed channels, the ``k`` images with its strongest activation.

    Each image counts once per channel, at its largest activation of it; images are ranked by that value,
    the earlier image first among equal values (as :func:`~lightning_deconv.selection.find_maxima` breaks
    ties). One forward pass per batch, stopped at the deepest layer, serves every layer; per channel only
    the running top ``k`` is kept, so memory does not grow with the number of images. Runs in eval mode
    without side effects: weights, train/eval modes, BatchNorm statistics and the global random streams
    (a shuffling loader or random transforms draw from a copy) are as before.

    Args:
        model: any ``nn.Module`` taking the images; on CPU the pass runs channels-last
            (:class:`~lightning_deconv.kernels.FastCPUOps`).
        data: ``[N, C, H, W]`` images, a ``Dataset`` (map-style, scanned in index order, or iterable) of
            images, ``(image, ...)`` tuples or dicts, or a ``DataLoader`` of such batches, scanned in the
            order it yields them.
        layers: ``{layer: channels}``, layers by name (as in ``model.named_modules()``) or module.
        k: images per channel. Data with fewer than ``k`` images gives all of them (``TopK.k < k``).
        batch_size: images per forward pass for tensors and datasets (a loader's batches are used as given).
        max_batches: scan only the first ``max_batches`` batches.
        keep_images: keep each selected image in :attr:`TopK.images`, so they can be projected without
            a second pass over the data. Default: for loaders and iterable datasets, whose images cannot be
            fetched back by index (they may be shuffled or randomly transformed); tensors and map-style
            datasets are indexed again.
        key: the image's key in dict items or batches (default: the first of
            :data:`~lightning_deconv.batches.IMAGE_KEYS` present).
        state: tensors used instead of the model's own, by name (e.g. rank 0's BatchNorm statistics).

    Returns:
        ``{layer name: TopK}``.

    Raises:
        ValueError: ``k``, ``batch_size`` or ``max_batches`` below 1, unknown layers (nearest names listed),
            empty or out-of-range channels, empty data, images that do not fit the model.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
        >>> top = top_k(net, torch.rand(20, 3, 16, 16), {"1": [0, 5], "2": [3]}, k=4, batch_size=8)
        >>> top["1"].index.shape, top["2"].position.shape, top["2"].switch.shape
        (torch.Size([2, 4]), torch.Size([1, 4, 2]), torch.Size([1, 4, 2]))
    """
    for value, label in ((k, "k"), (batch_size, "batch_size"), (max_batches, "max_batches")):
        check_int(value, label, optional=True)
    model = uncompiled(model)  # hooks must see every op: compiled code runs eagerly here
    modules, channels = resolve_features(model, layers)
    scan = _RunningTopK(modules, channels, k, _keeps_images(data) if keep_images is None else keep_images)
    reference = next(model.parameters(), None)
    forward = bound_forward(model, state)
    fast = FastCPUOps(reference.device if reference is not None else "cpu")
    with eval_mode(model), untouched_rng(), torch.compiler.set_stance("force_eager"):
        for number, batch in enumerate(image_batches(data, batch_size, key)):
            if max_batches is not None and number == max_batches:
                break
            if not len(batch):  # an empty tensor still splits into one empty batch
                continue
            check_images(model, batch)
            x = batch if reference is None else batch.to(reference.device, reference.dtype)
            scan.batch = batch
            with fast:
                scan.best = run_until(forward, fast.prepare(x), modules, scan)
            scan.seen += len(batch)
    if not scan.seen:
        raise ValueError("The data holds no images: give at least one.")
    return scan.best


def merge_top_k(
    parts: Sequence[Mapping[str, TopK]], offsets: Sequence[int | Tensor] | None = None, k: int | None = None
) -> dict[str, TopK]:
    """The top ``k`` of the whole from the top ``k`` of its shards (e.g. every DDP rank's own).

    Equal to :func:`top_k` over all shards' images at once, when every part's indices are global: give
    ``offsets``, per part an int added to its indices (a contiguous shard starting there) or a tensor of
    global indices (``mapping[local index]``, e.g. ``torch.tensor(list(distributed_sampler))``). An image
    held by several parts (a ``DistributedSampler`` pads its shards with repeats) counts once.

    Args:
        parts: per shard, ``{layer: TopK}`` with the same layers and channels.
        offsets: per shard, how its indices map to global ones (default: they already are global).
        k: images per channel (default: the largest ``k`` of the parts).

    Raises:
        ValueError: no parts, parts with other layers or channels, or as many offsets as parts.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> images = torch.rand(10, 3, 8, 8)
        >>> halves = [top_k(net, images[:6], {"1": [0, 2]}, k=3), top_k(net, images[6:], {"1": [0, 2]}, k=3)]
        >>> merged = merge_top_k(halves, offsets=[0, 6])
        >>> torch.equal(merged["1"].index, top_k(net, images, {"1": [0, 2]}, k=3)["1"].index)
        True
    """
    if not parts:
        raise ValueError("Nothing to merge: give at least one part.")
    if offsets is not None and len(offsets) != len(parts):
        raise ValueError(f"Give one offset per part: {len(offsets)} offsets for {len(parts)} parts.")
    if offsets is not None:
        parts = [{name: top.reindexed(o) for name, top in part.items()} for part, o in zip(parts, offsets, strict=True)]
    merged = {}
    for name, first in parts[0].items():
        same = [part.get(name) for part in parts]
        if any(top is None or not torch.equal(top.channels, first.channels) for top in same) or any(
            len(part) != len(parts[0]) for part in parts
        ):
            raise ValueError("Every part must hold the same layers with the same channels.")
        whole = _concat(same)
        merged[name] = _take(whole, _best(whole.value, whole.index, k or max(top.k for top in same)))
    return merged


def _images_of(top: Mapping[str, TopK], data: Tensor | Dataset | None, key: str | None) -> tuple[Tensor, list[Tensor]]:
    """The images the top k hold, each once (``[M, C, H, W]``, by index), and per layer each row's image in them."""
    index = torch.cat([t.index.flatten() for t in top.values()])
    unique, inverse = index.unique(return_inverse=True)
    sources = list(inverse.split([t.index.numel() for t in top.values()]))
    if all(t.images is not None for t in top.values()):
        kept = torch.cat([t.images.flatten(0, 1) for t in top.values()])
        first = torch.full((len(unique),), len(index)).scatter_reduce(0, inverse, torch.arange(len(index)), "amin")
        return kept[first], sources
    if isinstance(data, Tensor):
        return data[unique], sources
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return torch.stack([images_in(data[i], key) for i in unique.tolist()]), sources
    raise ValueError(
        "The images of the top k must be fetched back: give `data` as the tensor or map-style Dataset that was "
        "scanned, or run top_k with keep_images=True (the default for loaders and iterable datasets)."
    )


def project_top_k(
    model: nn.Module | Projector,
    top: Mapping[str, TopK],
    data: Tensor | Dataset | None = None,
    rule: Rule = "deconvnet",
    key: str | None = None,
    state: Mapping[str, Tensor] | None = None,
) -> dict[str, Projection]:
    """Project every one of the ``F x k`` activations of :func:`top_k`, each in its own image.

    The images come from :attr:`TopK.images` where :func:`top_k` kept them, else from ``data`` by index
    (the tensor or map-style dataset that was scanned). All layers go through one
    :class:`~lightning_deconv.engine.Projector` (a plan given as ``model``, or one made here): pooling
    layers start at their switches, every row on its receptive-field window where that is exact.

    Args:
        model: the model, or a :class:`~lightning_deconv.engine.Projector` made for it with ``mode="max"``
            and these layers (e.g. the callback's), which then sets the rule.
        top: ``{layer: TopK}`` as :func:`top_k` returned it.
        data: where to fetch the images by index when they were not kept.
        rule: ``"deconvnet"``, ``"guided"`` or ``"gradient"`` (when ``model`` is a module).
        key: the image's key in dict items.
        state: tensors used instead of the model's own, by name.

    Returns:
        ``{layer: Projection}`` with ``F * k`` rows: row ``f * k + j`` is channel ``top[layer].channels[f]`` in
        its ``j``-th image; ``source`` indexes the images as fetched, not the data (``TopK.index`` does).

    Raises:
        ValueError: images neither kept nor given by an indexable ``data``.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
        >>> images = torch.rand(20, 3, 16, 16)
        >>> projected = project_top_k(net, top_k(net, images, {"2": [0, 5]}, k=4), images)
        >>> projected["2"].images.shape, projected["2"].crops.shape
        (torch.Size([8, 3, 16, 16]), torch.Size([8, 3, 4, 4]))
    """
    if isinstance(model, Projector) and model.mode != "max":
        raise ValueError(
            f"Top-k activations are single activations: give a Projector with mode='max', not {model.mode!r}."
        )
    images, sources = _images_of(top, data, key)
    plan = (
        model
        if isinstance(model, Projector)
        else Projector(model, {name: t.channels for name, t in top.items()}, tuple(images.shape[1:]), rule=rule)
    )
    maxima = {
        name: Maxima(
            t.channels.repeat_interleave(t.k),
            t.value.flatten(),
            source,
            t.position.flatten(0, 1),
            t.map_size,
            None if t.switch is None else t.switch.flatten(0, 1),
        )
        for (name, t), source in zip(top.items(), sources, strict=True)
    }
    return plan.project(images, maxima, state)


FORMAT = "lightning-deconv top-k"


@dataclass(frozen=True)
class SavedTopK:
    """The top k of one firing as :func:`save_top_k` wrote it (the images themselves are not saved).

    Attributes:
        epoch: the epoch after which it was taken.
        top: ``{layer: TopK}`` without images.
        crops: ``{layer: [F, k, C, h, w]}`` the projections cut to their boxes.
        patches: ``{layer: [F, k, C, h, w]}`` the same boxes of the images.
        boxes: ``{layer: [F, k, 4]}`` (top, left, bottom, right) in the images, end exclusive.
    """

    epoch: int
    top: dict[str, TopK]
    crops: dict[str, Tensor]
    patches: dict[str, Tensor]
    boxes: dict[str, Tensor]


def top_k_path(folder: str | Path, epoch: int, k: int) -> Path:
    """Where a firing's top k go: ``<folder>/top<k>_epoch_<epoch, 3 digits>.pt``."""
    return Path(folder) / f"top{k}_epoch_{epoch:03d}.pt"


def save_top_k(folder: str | Path, epoch: int, top: Mapping[str, TopK], projections: Mapping[str, Projection]) -> Path:
    """Save the top k of a firing and their projections' crops, so that Figure 2 is drawn without the model.

    The file (:func:`top_k_path`, ``k`` the largest of the layers') is written atomically (a temporary file
    renamed into place); it is a ``torch.save`` dict, readable with
    ``torch.load(path, weights_only=True)``::

        {"format": "lightning-deconv top-k", "version": 1, "epoch": int, "k": int,
         "layers": {layer: {"channels": [F], "value": [F, k], "index": [F, k], "position": [F, k, 2],
                            "map_size": (H, W), "switch": [F, k, 2] or None,
                            "crops": [F, k, C, h, w], "patches": [F, k, C, h, w], "boxes": [F, k, 4]}}}

    Args:
        folder: where to write (the callback uses its monitor folder, ``<log_dir>/deconv/<name>``).
        epoch: the epoch after which the top k were taken.
        top: ``{layer: TopK}`` from :func:`top_k` (or :func:`merge_top_k`).
        projections: ``{layer: Projection}`` from :func:`project_top_k` on ``top``.

    Returns:
        The path written.

    Raises:
        ValueError: projections that are not those of ``top`` (other layers, channels or row count).
    """
    layers = {}
    for name, t in top.items():
        p = projections.get(name)
        if p is None or not torch.equal(p.channels.cpu(), t.channels.repeat_interleave(t.k)):
            raise ValueError(f"The projections of {name!r} are not those of its top k: use project_top_k(top).")
        saved = {f.name: getattr(t, f.name) for f in fields(TopK) if f.name != "images"}
        by_feature = {kind: getattr(p, kind).cpu().unflatten(0, (len(t.channels), t.k)) for kind in _CUTS}
        layers[name] = {**saved, **by_feature}
    k = max(t.k for t in top.values())
    record = {"format": FORMAT, "version": 1, "epoch": epoch, "k": k, "layers": layers}
    return atomic_save(record, top_k_path(folder, epoch, k))


_CUTS = ("crops", "patches", "boxes")


def load_top_k(path: str | Path) -> SavedTopK:
    """Read a file written by :func:`save_top_k`.

    Raises:
        RecordError (a ValueError): the file is unreadable or not one of :func:`save_top_k`'s.
    """
    raw = load_record(path, FORMAT)
    if raw.get("format") != FORMAT:
        raise RecordError(path, "is not a top-k file written by save_top_k", "Point at a topK_epoch_XXX.pt file")
    layers = raw["layers"]
    top = {
        name: TopK(**{f.name: saved[f.name] for f in fields(TopK) if f.name != "images"})
        for name, saved in layers.items()
    }
    cuts = {kind: {name: saved[kind] for name, saved in layers.items()} for kind in _CUTS}
    return SavedTopK(raw["epoch"], top, **cuts)
