"""Computing only the output channels a maxima pass reads, where the model's structure allows it.

The maxima pass stops at the deepest tracked layer. Where that layer ends a chain that starts at a convolution
and goes on through channel-wise modules only (ZFNet's conv5, relu5, pool5; VGG's last convolution and its
ReLU), every tracked map of the chain depends, channel by channel, on the same channels of the convolution's
output. So the convolution need only compute the tracked channels: ZFNet's conv5 computes 8 of its 256 for
8 tracked features, and the pass skips most of a layer's work. The other channels are left at zero; nothing
the pass reads is computed from them. The channels computed are the same sums over the same inputs and filters
(oneDNN's and cuDNN's kernels may order them differently, as they may for any batch size).

:func:`recording_chain` watches the plan's survey forward, :func:`narrowable` decides from it (once per model
structure), :func:`narrowed_conv2d` runs the narrowed convolution.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_deconv.layers import named_layers

__all__ = ["CHANNELWISE", "narrowable", "narrowed_conv2d", "recording_chain"]

# Modules whose output channel c depends on their input's channel c alone (in eval mode, where maxima passes run).
CHANNELWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SiLU,
    nn.GELU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.BatchNorm2d,
    nn.Dropout,
    nn.Identity,
)


@contextlib.contextmanager
def recording_chain(model: nn.Module) -> Iterator[dict[str, Any]]:
    """While active, ``{"calls": [(module, first input, output), ...], "runs": Counter}``: the module calls
    (every module's, containers' included, in the order they returned) since the last ``nn.Conv2d`` call, that
    one first, and how often each ``nn.Conv2d`` ran. Only the calls since the last convolution are held."""
    record: dict[str, Any] = {"calls": [], "runs": Counter()}

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        if isinstance(module, nn.Conv2d):
            record["runs"][module] += 1
            record["calls"] = []
        record["calls"].append((module, inputs[0] if inputs else None, output))

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def narrowable(
    model: nn.Module, record: dict[str, Any], layers: dict[str, nn.Module]
) -> tuple[str, tuple[str, ...]] | None:
    """The convolution a pass recorded by :func:`recording_chain` (one stopped at the deepest of ``layers``) may
    narrow, by name, with the names of the ``layers`` whose maps it feeds; ``None`` where it may not.

    It may where the pass ended in a chain from one ``nn.Conv2d`` call (ungrouped, run once in the pass, its weight
    used by no other module) through :data:`CHANNELWISE` modules only, each fed exactly the previous one's output
    and each run once.
    """
    calls = record["calls"]
    if not calls:
        return None
    conv = calls[0][0]
    chain = [module for module, _, _ in calls]
    if (
        type(conv) is not nn.Conv2d
        or conv.groups != 1
        or record["runs"][conv] != 1
        or len(set(map(id, chain))) != len(chain)
        or not all(type(module) in CHANNELWISE for module in chain[1:])
        or any(later is not earlier for (_, _, earlier), (_, later, _) in pairwise(calls))
        or sum(p is conv.weight for m in model.modules() for p in m.parameters(recurse=False)) != 1
    ):
        return None
    fed = tuple(name for name, module in layers.items() if any(module is m for m in chain))
    name = next(name for name, module in named_layers(model).items() if module is conv)
    return (name, fed) if fed else None


def narrowed_conv2d(
    input: Tensor, weight: Tensor, bias: Tensor | None, channels: Tensor, *conv: Any, memory_format: torch.memory_format
) -> Tensor:
    """``F.conv2d(input, weight, bias, *conv)`` (``*conv``: stride, padding, dilation; ungrouped) computing only
    the output ``channels``, the others zero, laid out as ``memory_format``."""
    part = F.conv2d(input, weight[channels], None if bias is None else bias[channels], *conv)
    n, _, height, width = part.shape
    out = torch.empty(n, len(weight), height, width, dtype=part.dtype, device=part.device, memory_format=memory_format)
    return out.zero_().index_copy_(1, channels, part)
