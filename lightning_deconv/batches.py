"""Finding the images in what a user's dataset or loader yields.

Items and batches come as tensors, ``(image, target, ...)`` tuples or lists, or dicts such as
``{"image": ..., "label": ...}``. :func:`images_in` picks the image tensor out of any of them;
:func:`image_batches` streams ``[B, C, H, W]`` image batches out of a tensor, a ``Dataset`` (map-style or
iterable) or a ``DataLoader``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

__all__ = ["IMAGE_KEYS", "image_batches", "images_in"]

IMAGE_KEYS: tuple[str, ...] = ("image", "images", "img", "x", "input", "inputs", "pixel_values")


def images_in(item: Any, image_key: str | None = None) -> Tensor:
    """The image tensor of a dataset item or a batch: the item itself, the first element of a tuple or
    list, or the value under ``image_key`` (default: the first of :data:`IMAGE_KEYS` present) of a dict.

    Example::

        >>> images_in({"label": 3, "image": torch.zeros(3, 8, 8)}).shape
        torch.Size([3, 8, 8])

    Raises:
        ValueError: a dict without ``image_key`` (or any of :data:`IMAGE_KEYS`); the message lists its keys.
        TypeError: the image is not a tensor (e.g. a PIL image: add a ``ToImage()``/``ToTensor()`` transform).
    """
    if isinstance(item, Mapping):
        wanted = [image_key] if image_key is not None else [k for k in IMAGE_KEYS if k in item]
        if not wanted or wanted[0] not in item:
            keys = ", ".join(repr(k) for k in item)
            if image_key is not None:
                raise ValueError(f"The items have no key {image_key!r}; their keys are {keys}. Set `image_key` to one.")
            raise ValueError(
                f"Cannot tell which entry of the items is the image: their keys are {keys}, none of the usual "
                f"{', '.join(IMAGE_KEYS)}. Set `image_key` to the image's key."
            )
        item = item[wanted[0]]
    elif isinstance(item, (tuple, list)):
        if not item:
            raise ValueError("The items are empty tuples or lists; expected (image, ...).")
        item = item[0]
    if not isinstance(item, Tensor):
        raise TypeError(
            f"The images must be tensors, got {type(item).__name__}. Give the dataset a transform that makes "
            "tensors (torchvision's ToImage() + ToDtype(torch.float32, scale=True), or ToTensor())."
        )
    return item


def image_batches(
    data: Tensor | Dataset | DataLoader, batch_size: int = 64, image_key: str | None = None
) -> Iterator[Tensor]:
    """``[B, C, H, W]`` image batches of ``data``, in its order: a ``[N, C, H, W]`` tensor, a ``Dataset``
    (map-style in index order, or iterable) of items, or a ``DataLoader`` of batches (as it yields them)."""
    if isinstance(data, Tensor):
        yield from data.split(batch_size)
    elif isinstance(data, DataLoader):
        for batch in data:
            yield images_in(batch, image_key)
    elif isinstance(data, Dataset):
        items = iter(data) if isinstance(data, IterableDataset) else (data[i] for i in range(len(data)))
        chunk: list[Tensor] = []
        for item in items:
            chunk.append(images_in(item, image_key))
            if len(chunk) == batch_size:
                yield torch.stack(chunk)
                chunk = []
        if chunk:
            yield torch.stack(chunk)
    else:
        raise TypeError(f"Expected a Tensor, a Dataset or a DataLoader, got {type(data).__name__}.")
