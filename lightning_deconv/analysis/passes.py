"""Forward passes of a classifier shared by the occlusion (Fig. 7) and invariance (Fig. 5) experiments: one
pass that reduces some layers' outputs as they run and keeps the logits, the class probabilities, the target
classes, and the default batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_deconv.layers import run_until

__all__ = ["check_targets", "default_batch_size", "probabilities", "run_layers"]

_OUTPUT = "<output>"  # the model's output, recorded as one more "layer" (no module can have this name)


def default_batch_size(images: Tensor) -> int:
    """Images per forward pass by default: about 4M input values (256 images of 3x64x64, 27 of 3x224x224),
    which bounds the activations' memory and is past the size where CPU throughput stops growing."""
    return max(1, min(256, 2**22 // images[0].numel()))


def run_layers(
    model: nn.Module | Callable[[Tensor], Any],
    images: Tensor,
    layers: Mapping[str, nn.Module],
    reduce: Callable[[str, Tensor], Tensor],
    classify: bool,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """One forward pass: ``reduce(name, output)`` of each layer as it runs, and the logits if ``classify``.

    Without ``classify`` the pass stops at the deepest layer (:func:`~lightning_deconv.layers.run_until`).
    With it, the model's output is recorded as one more layer, so the same hook runner sees the whole
    forward. Layers may have outputs of any shape; ``reduce`` checks what it needs.

    Returns:
        ``({name: reduced}, logits [N, classes] or None)``.

    Raises:
        ValueError: the model fails on ``images`` or does not give ``[N, classes]`` logits.
    """
    if not classify:
        return run_until(model, images, layers, lambda name, out, _: reduce(name, out), spatial=False), None
    output = nn.Identity()
    results = run_until(
        lambda x: output(model(x)),
        images,
        {**layers, _OUTPUT: output},
        lambda name, out, _: out if name == _OUTPUT else reduce(name, out),
        spatial=False,
    )
    logits = results.pop(_OUTPUT)
    if logits.dim() != 2 or logits.shape[0] != len(images):
        raise ValueError(
            f"The model gives output of shape {tuple(logits.shape)} for {len(images)} images; class "
            "probabilities need logits [N, classes]. Pass a classifier (or `classify=False` for feature maps only)."
        )
    return results, logits


def probabilities(logits: Tensor) -> Tensor:
    """Softmax over classes, in at least float32 (half-precision logits would round it)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=1)


def check_targets(targets: Sequence[int] | Tensor | None, logits: Tensor, n: int) -> Tensor:
    """``[n]`` int64 classes on the logits' device: ``targets`` checked, or the top class of each image."""
    if targets is None:
        return logits.argmax(dim=1)
    wanted = torch.as_tensor(targets).flatten()
    classes = logits.shape[1]
    if wanted.numel() != n or (torch.is_floating_point(wanted) and not (wanted == wanted.round()).all()):
        raise ValueError(f"Give one whole-number target class per image: {n} of them, got {wanted.tolist()}.")
    wanted = wanted.long()
    bad = wanted[(wanted < 0) | (wanted >= classes)]
    if bad.numel():
        raise ValueError(f"Targets {bad.tolist()} are out of range: the model has {classes} classes, 0..{classes - 1}.")
    return wanted.to(logits.device)
