"""The fixed probe set: the images on which every firing looks for each feature's strongest activation.

Zeiler & Fergus (2014, Sec. 4) follow each feature's strongest activation over a fixed set of images from
epoch to epoch. :func:`draw_probe` draws such a set from whatever holds the user's images: a tensor, a
map-style ``Dataset`` (a seeded random subset), an iterable dataset or any iterable of batches (its first
items, in order), or a ``DataLoader`` over either; items and batches may be tensors, tuples or dicts. The
draw is deterministic and leaves every random stream of the caller as it was.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_deconv.batches import images_in
from lightning_deconv.checks import check_int

__all__ = ["draw_probe", "untouched_rng"]


@contextlib.contextmanager
def untouched_rng() -> Iterator[None]:
    """Run a block without consuming the global torch (CPU and CUDA), NumPy or Python random streams."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    """Seed the CPU streams an item's transforms draw from; CUDA generators are never touched."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _is_map_style(data: Any) -> bool:
    if isinstance(data, IterableDataset) or not hasattr(data, "__getitem__"):
        return False
    try:
        return len(data) >= 0
    except TypeError:
        return False


def _from_items(dataset: Dataset, count: int, seed: int, image_key: str | None) -> list[Tensor]:
    """``count`` items at seeded random indices, each loaded with the streams seeded from its index."""
    size = len(dataset)
    if size == 0:
        raise ValueError("The dataset to draw the probe from is empty.")
    indices = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: min(count, size)].sort().values
    images = []
    for index in indices.tolist():
        _seed_all(seed * 1_000_003 + index)
        images.append(images_in(dataset[index], image_key))
    return images


def _from_stream(data: Iterable, count: int, seed: int, image_key: str | None, batched: bool | None) -> list[Tensor]:
    """The first ``count`` images of an iterable of items (``batched=False``) or batches (``True``; ``None``:
    told apart by their dimensions), with the streams seeded once before the first."""
    _seed_all(seed)
    images: list[Tensor] = []
    for element in data:
        found = images_in(element, image_key)
        is_batch = batched if batched is not None else found.dim() == 4
        images.extend(found.unbind(0) if is_batch else [found])
        if len(images) >= count:
            break
    if not images:
        raise ValueError("The data to draw the probe from yielded no images.")
    return images[:count]


def draw_probe(
    data: Tensor | Dataset | DataLoader | Iterable, count: int, seed: int = 0, image_key: str | None = None
) -> Tensor:
    """A fixed probe set of up to ``count`` images from ``data``, the same every time for the same ``seed``.

    A tensor or a map-style dataset gives ``count`` images at seeded random indices (in index order); an
    iterable dataset, a loader over one, or any iterable of batches gives its first ``count`` images. Items
    and batches may be tensors, ``(image, ...)`` tuples or dicts (the image under ``image_key``, else a usual key
    such as ``"image"``). Random transforms are made deterministic by seeding each item, and the caller's
    random streams (Python, NumPy, torch CPU and CUDA) are left as they were.

    Returns:
        ``[n, C, H, W]`` float images, ``n = min(count, len(data))``.

    Raises:
        ValueError: empty data, ``count < 1``, items that are not ``[C, H, W]`` images of one size, or
            images holding NaN or Inf.
        TypeError: items whose image is not a tensor (the message says which transform to add).

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.rand(10, 3, 8, 8), torch.arange(10))
        >>> draw_probe(data, 4, seed=0).shape
        torch.Size([4, 3, 8, 8])
    """
    check_int(count, "count")
    with untouched_rng():
        if isinstance(data, Tensor):
            images = _from_items(data, count, seed, image_key)
        elif isinstance(data, DataLoader) and data.dataset is not None:
            source = data.dataset
            images = (
                _from_items(source, count, seed, image_key)
                if _is_map_style(source)
                else _from_stream(source, count, seed, image_key, batched=False)
            )
        elif _is_map_style(data):
            images = _from_items(data, count, seed, image_key)
        elif isinstance(data, Iterable):
            images = _from_stream(islice(data, 10 * count), count, seed, image_key, batched=None)
        else:
            raise TypeError(
                f"Cannot draw probe images from a {type(data).__name__}; give a tensor, a Dataset or a DataLoader."
            )
    return _checked(images)


def _checked(images: list[Tensor]) -> Tensor:
    shapes = sorted({tuple(image.shape) for image in images})
    if any(len(shape) != 3 for shape in shapes):
        raise ValueError(f"Probe items must be [C, H, W] images; got tensors of shape {shapes[0]}.")
    if len(shapes) > 1:
        raise ValueError(
            f"Probe images must share one size, got {shapes[:3]}. Draw the probe from a set with a fixed-size "
            "transform (e.g. the validation transform's CenterCrop)."
        )
    stacked = torch.stack(images).detach().cpu()
    if not torch.is_floating_point(stacked):
        raise TypeError(
            f"Probe images must be float tensors normalised as the model expects, got {stacked.dtype}. Add "
            "ToDtype(torch.float32, scale=True) and the normalisation to the transform."
        )
    if not torch.isfinite(stacked).all():
        raise ValueError("The probe images hold NaN or Inf values; check the data and its transforms.")
    return stacked
