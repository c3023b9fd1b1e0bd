"""The top k activations of each feature over a whole dataset: the paper's Figure 2, streamed.

Zeiler & Fergus (2014, Fig. 2) show, for a random subset of features in each layer, the 9 strongest
activations across the validation data, each projected to pixel space beside its image patch. An image
counts once per feature, at its strongest position, so the 9 come from 9 different images.

:func:`top_k` finds them with the search of :mod:`lightning_deconv.maxima` (one forward pass per batch,
stopped at the deepest layer, for all layers at once; per feature only a running top ``k``, so memory is
``O(F * k)`` plus one batch however many images are scanned); :func:`~lightning_deconv.maxima.merge_top_k`
merges the top k of shards (DDP ranks) into the top k of the whole; :func:`project_top_k` projects all
``F * k`` activations; :mod:`lightning_deconv.analysis.top_k_files` writes and reads a run's results for
:mod:`lightning_deconv.paper.figure2`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from itertools import islice

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_deconv.batches import image_batches, images_in
from lightning_deconv.checks import check_int
from lightning_deconv.engine import Projection, Projector
from lightning_deconv.maxima import TopK, scan
from lightning_deconv.plan import Rule

__all__ = ["project_top_k", "top_k"]


def _keeps_images(data: object) -> bool:
    """Whether images must be kept to be seen again: a loader or an iterable dataset cannot be indexed."""
    return isinstance(data, (DataLoader, IterableDataset))


def top_k(
    model: nn.Module,
    data: Tensor | Dataset | DataLoader,
    layers: Mapping[str | nn.Module, Sequence[int] | Tensor],
    *,
    k: int = 9,
    batch_size: int = 64,
    max_batches: int | None = None,
    keep_images: bool | None = None,
    image_key: str | None = None,
    state: Mapping[str, Tensor] | None = None,
) -> dict[str, TopK]:
    """For each layer and each of its listed channels, the ``k`` images with its strongest activation.

    Each image counts once per channel, at its largest activation of it; images are ranked by that value,
    the earlier image first among equal values (as :func:`~lightning_deconv.maxima.find_maxima` breaks
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
        image_key: the image's key in dict items or batches (default: the first of
            :data:`~lightning_deconv.batches.IMAGE_KEYS` present).
        state: tensors used instead of the model's own, by name (e.g. rank 0's BatchNorm statistics).

    Returns:
        ``{layer name: TopK}``; ``TopK.source`` is the image's position in the data's order.

    Raises:
        ValueError: ``k``, ``batch_size`` or ``max_batches`` below 1, unknown layers (nearest names listed),
            empty or out-of-range channels, empty data, images that do not fit the model.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
        >>> top = top_k(net, torch.rand(20, 3, 16, 16), {"1": [0, 5], "2": [3]}, k=4, batch_size=8)
        >>> top["1"].source.shape, top["2"].position.shape, top["2"].switch.shape
        (torch.Size([2, 4]), torch.Size([1, 4, 2]), torch.Size([1, 4, 2]))
    """
    for value, label in ((k, "k"), (batch_size, "batch_size"), (max_batches, "max_batches")):
        check_int(value, label, optional=True)
    keep = _keeps_images(data) if keep_images is None else keep_images
    batches = islice(image_batches(data, batch_size, image_key), max_batches)
    return scan(model, batches, layers, k, keep_images=keep, state=state)


def _images_of(
    top: Mapping[str, TopK], data: Tensor | Dataset | None, image_key: str | None
) -> tuple[Tensor, list[Tensor]]:
    """The images the top k hold, each once (``[M, C, H, W]``, by source), and per layer each row's image in them."""
    source = torch.cat([t.source.flatten() for t in top.values()])
    unique, inverse = source.unique(return_inverse=True)
    sources = list(inverse.split([t.source.numel() for t in top.values()]))
    if all(t.images is not None for t in top.values()):
        kept = torch.cat([t.images.flatten(0, 1) for t in top.values()])
        first = torch.full((len(unique),), len(source)).scatter_reduce(0, inverse, torch.arange(len(source)), "amin")
        return kept[first], sources
    if isinstance(data, Tensor):
        return data[unique], sources
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return torch.stack([images_in(data[i], image_key) for i in unique.tolist()]), sources
    raise ValueError(
        "The images of the top k must be fetched back: give `data` as the tensor or map-style Dataset that was "
        "scanned, or run top_k with keep_images=True (the default for loaders and iterable datasets)."
    )


def project_top_k(
    model: nn.Module | Projector,
    top: Mapping[str, TopK],
    *,
    data: Tensor | Dataset | None = None,
    rule: Rule = "deconvnet",
    image_key: str | None = None,
    state: Mapping[str, Tensor] | None = None,
) -> dict[str, Projection]:
    """Project every one of the ``F x k`` activations of :func:`top_k`, each in its own image.

    The images come from :attr:`TopK.images` where :func:`top_k` kept them, else from ``data`` by source
    (the tensor or map-style dataset that was scanned). All layers go through one
    :class:`~lightning_deconv.engine.Projector` (a plan given as ``model``, or one made here): pooling
    layers start at their switches, every row on its receptive-field window where that is exact.

    Args:
        model: the model, or a :class:`~lightning_deconv.engine.Projector` made for it with ``mode="max"``
            and these layers (e.g. the callback's), which then sets the rule.
        top: ``{layer: TopK}`` as :func:`top_k` returned it.
        data: where to fetch the images by source when they were not kept.
        rule: ``"deconvnet"``, ``"guided"`` or ``"gradient"`` (when ``model`` is a module).
        image_key: the image's key in dict items.
        state: tensors used instead of the model's own, by name.

    Returns:
        ``{layer: Projection}`` with ``F * k`` rows: row ``f * k + j`` is channel ``top[layer].channels[f]`` in
        its ``j``-th image; ``source`` indexes the images as fetched, not the data (``TopK.source`` does).

    Raises:
        ValueError: images neither kept nor given by an indexable ``data``.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
        >>> images = torch.rand(20, 3, 16, 16)
        >>> projected = project_top_k(net, top_k(net, images, {"2": [0, 5]}, k=4), data=images)
        >>> projected["2"].images.shape, projected["2"].crops.shape
        (torch.Size([8, 3, 16, 16]), torch.Size([8, 3, 4, 4]))
    """
    if isinstance(model, Projector) and model.mode != "max":
        raise ValueError(
            f"Top-k activations are single activations: give a Projector with mode='max', not {model.mode!r}."
        )
    images, sources = _images_of(top, data, image_key)
    plan = (
        model
        if isinstance(model, Projector)
        else Projector(model, {name: t.channels for name, t in top.items()}, input_size=images.shape[1:], rule=rule)
    )
    fetched = {
        name: replace(t, source=source.view_as(t.source), images=None)
        for (name, t), source in zip(top.items(), sources, strict=True)
    }
    return plan.project(images, fetched, state)
