r"""Filter RMS clipping: the renormalisation Zeiler & Fergus used to keep first-layer filters healthy.

Zeiler & Fergus (2014, Sec. 3 and 5) saw a few first-layer filters grow to dominate; the fix was to
"renormalize each filter in the convolutional layers whose RMS value exceeds a fixed radius of
:math:`10^{-1}` to this fixed radius". For a filter :math:`w_o` (one output channel, all its inputs and
taps) with :math:`\mathrm{RMS}(w_o) = \sqrt{\mathrm{mean}(w_o^2)}`, after every update

.. math::

    w_o \leftarrow w_o \cdot \min\left(1, \frac{r}{\mathrm{RMS}(w_o)}\right)

so a filter keeps its direction and only its scale is capped. Biases are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_deconv._compat import callback_bases, override

__all__ = ["FilterRMSClip", "clip_filter_rms"]


@torch.no_grad()
def clip_filter_rms(module: nn.Module, radius: float = 0.1) -> int:
    """Rescale, in place, every ``nn.Conv2d`` filter of ``module`` whose RMS exceeds ``radius`` to ``radius``.

    Args:
        module: the model; every ``nn.Conv2d`` in it (itself included) is clipped.
        radius: the largest RMS a filter may keep.

    Returns:
        The number of filters that were rescaled.

    Example::

        >>> conv = nn.Conv2d(3, 2, 3)
        >>> with torch.no_grad():
        ...     _ = conv.weight[0].fill_(1.0)  # RMS 1: rescaled
        ...     _ = conv.weight[1].fill_(0.05)  # RMS 0.05: untouched
        >>> clip_filter_rms(conv, radius=0.1)
        1
        >>> round(float(conv.weight[0].pow(2).mean().sqrt()), 6)
        0.1
    """
    clipped = 0
    for conv in module.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        weight = conv.weight
        rms = weight.flatten(1).pow(2).mean(dim=1).sqrt()
        over = rms > radius
        if over.any():
            # Only the offending filters are touched, so the others stay bit-for-bit what the optimiser made.
            weight[over] *= (radius / rms[over]).view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype)
            clipped += int(over.sum())
    return clipped


class FilterRMSClip(*callback_bases()):
    """Cap the RMS of every convolutional filter after each optimiser step (Zeiler & Fergus 2014, Sec. 3).

    Works with the ``lightning.pytorch`` and the ``pytorch_lightning`` Trainer alike.

    Args:
        radius: the largest RMS a filter may keep (the paper: ``0.1``).

    Raises:
        ValueError: if ``radius`` is not a positive finite number.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[FilterRMSClip(radius=0.1)], logger=False)
    """

    def __init__(self, radius: float = 0.1) -> None:
        super().__init__()
        if not isinstance(radius, (int, float)) or not 0 < radius < float("inf"):
            raise ValueError(f"`radius` must be a positive finite number (the paper: 0.1), got {radius!r}.")
        self.radius = float(radius)

    # `on_train_batch_end` runs after `optimizer.step()` has updated the weights. `on_before_zero_grad` would
    # be wrong: Lightning zeroes gradients inside the closure, after `training_step`'s forward pass and before
    # `backward`, so rescaling there would modify weights that autograd saved for the pending backward.
    @override
    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        clip_filter_rms(pl_module, self.radius)
