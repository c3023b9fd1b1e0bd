"""Feature selection: which features of which layers to watch.

Zeiler & Fergus (2014, Sec. 4) follow a *randomly chosen subset* of each layer's feature maps;
``choose_features`` draws that subset reproducibly, and ``resolve_features`` turns ``{layer: channels}`` into
modules and channel tensors, failing clearly on unknown layers or empty channels. Where each feature fires
most strongly is :mod:`lightning_deconv.maxima`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_deconv.layers import resolve_layers

__all__ = ["check_channels", "choose_features", "resolve_features"]


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


def check_channels(name: str, channels: Tensor, num_channels: int) -> None:
    """Fail clearly on empty channels or channels out of ``0..num_channels - 1``."""
    if channels.numel() == 0:
        raise ValueError(f"No channels given for layer {name!r}; list at least one.")
    if int(channels.min()) >= 0 and int(channels.max()) < num_channels:  # two reductions: it runs every batch
        return
    bad = channels[(channels < 0) | (channels >= num_channels)]
    if bad.numel():
        raise ValueError(
            f"Channels {bad.tolist()} are out of range for layer {name!r}, which has {num_channels} "
            f"channels (valid: 0..{num_channels - 1})."
        )


def resolve_features(
    model: nn.Module, layers: Mapping[str | nn.Module, Sequence[int] | Tensor]
) -> tuple[dict[str, nn.Module], dict[str, Tensor]]:
    """``{name: module}`` and ``{name: channels}`` of ``{layer: channels}``, failing on unknown or empty."""
    modules = resolve_layers(model, layers)
    wanted = {
        name: torch.as_tensor(list(c) if not isinstance(c, Tensor) else c, dtype=torch.long).flatten()
        for name, c in zip(modules, layers.values(), strict=True)
    }
    for name, channels in wanted.items():
        if channels.numel() == 0:
            raise ValueError(f"No channels given for layer {name!r}; list at least one.")
    return modules, wanted
