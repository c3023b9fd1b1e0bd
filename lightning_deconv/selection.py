"""Probe and feature selection: which features to watch, and where each one fires most strongly.

Zeiler & Fergus (2014, Sec. 4) follow a *randomly chosen subset* of each layer's feature maps and, for
each, the single strongest activation over a fixed set of probe images. ``choose_features`` draws that
subset reproducibly; ``find_maxima`` finds the strongest activations of every tracked feature of every
tracked layer in one forward pass over the probe set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_deconv.layers import check_images, resolve_layers, run_until

__all__ = ["Maxima", "choose_features", "find_maxima"]


@dataclass(frozen=True)
class Maxima:
    """The strongest activation of each tracked channel of one layer over a probe set.

    Attributes:
        channels: ``[K]`` the tracked channels.
        value: ``[K]`` the activation's value.
        source: ``[K]`` index of the probe image that holds it.
        position: ``[K, 2]`` its (row, col) in the layer's output map.
        map_size: ``(H, W)`` of the layer's output map.
    """

    channels: Tensor
    value: Tensor
    source: Tensor
    position: Tensor
    map_size: tuple[int, int]


def choose_features(num_channels: int, count: int, seed: int) -> list[int]:
    """A sorted, seeded random subset of ``count`` channels out of ``num_channels``.

    Example::

        >>> choose_features(96, 4, seed=0) == choose_features(96, 4, seed=0)
        True
    """
    if count > num_channels:
        raise ValueError(f"Cannot track {count} features of a layer that has only {num_channels} channels.")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_channels, generator=generator)[:count].tolist())


def _check_channels(name: str, channels: Tensor, num_channels: int) -> None:
    if channels.numel() == 0:
        raise ValueError(f"No channels given for layer {name!r}; list at least one.")
    bad = channels[(channels < 0) | (channels >= num_channels)]
    if bad.numel():
        raise ValueError(
            f"Channels {bad.tolist()} are out of range for layer {name!r}, which has {num_channels} "
            f"channels (valid: 0..{num_channels - 1})."
        )


def _strongest(name: str, activation: Tensor, channels: Tensor) -> Maxima:
    """Per channel, the largest value over images and positions (first one wins ties)."""
    _, c, h, w = activation.shape
    _check_channels(name, channels, c)
    maps = activation.detach()[:, channels.to(activation.device)].transpose(0, 1).reshape(len(channels), -1)
    value, flat = maps.float().max(dim=1)
    flat = flat.cpu()
    position = torch.stack([(flat % (h * w)) // w, flat % w], dim=1)
    return Maxima(channels, value.cpu(), flat // (h * w), position, (h, w))


def _merge(best: Maxima, new: Maxima, offset: int) -> Maxima:
    better = new.value > best.value
    return Maxima(
        best.channels,
        torch.where(better, new.value, best.value),
        torch.where(better, new.source + offset, best.source),
        torch.where(better[:, None], new.position, best.position),
        best.map_size,
    )


@torch.no_grad()
def find_maxima(
    model: nn.Module,
    images: Tensor,
    layers: Mapping[str | nn.Module, Sequence[int] | Tensor],
    batch_size: int | None = None,
) -> dict[str, Maxima]:
    """For each layer and each of its listed channels, the strongest activation over ``images``.

    One forward pass per batch of ``batch_size`` images (default: all at once) serves every layer, and it
    stops at the deepest one. The model runs as it is (call ``model.eval()`` first for the paper's setting).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> found = find_maxima(net, torch.rand(5, 3, 16, 16), {"1": [0, 7], "2": [3]})
        >>> found["1"].source.shape, found["2"].position.shape
        (torch.Size([2]), torch.Size([1, 2]))

    Raises:
        ValueError: unknown layer, empty or out-of-range channels, images that do not fit the model.
    """
    check_images(model, images)
    modules = resolve_layers(model, layers)
    wanted = {
        name: torch.as_tensor(list(c) if not isinstance(c, Tensor) else c, dtype=torch.long).flatten()
        for name, c in zip(modules, layers.values(), strict=True)
    }
    for name, channels in wanted.items():
        if channels.numel() == 0:
            raise ValueError(f"No channels given for layer {name!r}; list at least one.")
    reference = next(model.parameters(), images)  # run on the model's device, in its precision
    step = batch_size or len(images)
    best: dict[str, Maxima] = {}
    for start in range(0, len(images), step):
        batch = images[start : start + step].to(reference.device, reference.dtype)
        found = run_until(model, batch, modules, lambda name, act: _strongest(name, act, wanted[name]))
        best = found if not best else {name: _merge(best[name], found[name], start) for name in found}
    return best
