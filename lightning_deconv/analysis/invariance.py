"""Feature invariance (Zeiler & Fergus 2014, Sec. 4.4 and Fig. 5).

Images are translated vertically, scaled and rotated by a range of amounts; for each amount the paper
plots the Euclidean distance between the feature vectors of the original and the transformed image, at a
low layer (1) and a high one (7), and the probability of the true class. Small transformations change the
first layer a lot and the top layers little, and the output is stable to translation and scaling but not to
rotation (except for rotationally symmetric objects).

A layer's feature vector is its whole output for one image, flattened, so fully connected layers (the
paper's layer 7) and convolutional maps alike can be compared. Every transformed image of every amount runs
in batches; distances are reduced as each layer runs, so no feature vector is kept beyond its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from lightning_deconv.analysis.passes import check_targets, default_batch_size, probabilities, run_layers
from lightning_deconv.checks import check_int
from lightning_deconv.kernels import FastCPUOps
from lightning_deconv.layers import check_images, eval_mode, resolve_layers

__all__ = ["TRANSFORMS", "Invariance", "invariance", "transform_images"]

Transform = Literal["translate", "scale", "rotate"]
TRANSFORMS: tuple[str, ...] = ("translate", "scale", "rotate")
_IDENTITY = {"translate": 0.0, "scale": 1.0, "rotate": 0.0}


@dataclass(frozen=True)
class Invariance:
    """How features and the output change as images are transformed by growing amounts.

    Attributes:
        transform: ``"translate"`` (vertical, pixels), ``"scale"`` (factor) or ``"rotate"`` (degrees).
        amounts: ``[A]`` float32, the amounts, in the order given.
        distance: per layer name, ``[N, A]`` float32 Euclidean distance between the layer's output for the
            original image and for the transformed one (each flattened to a vector).
        probability: ``[N, A]`` float32 softmax probability of ``targets`` on the transformed images.
        targets: ``[N]`` the class whose probability is tracked.
    """

    transform: str
    amounts: Tensor
    distance: dict[str, Tensor]
    probability: Tensor
    targets: Tensor


def transform_images(images: Tensor, transform: Transform, amount: float, fill: float = 0.0) -> Tensor:
    """``images`` ``[N, C, H, W]`` translated, scaled or rotated by ``amount``, same size, uncovered pixels ``fill``.

    ``"translate"`` moves the images down by ``amount`` pixels (up if negative; whole pixels, so that the
    shift is exact), ``"scale"`` zooms by the factor ``amount`` about the centre, ``"rotate"`` turns them
    clockwise by ``amount`` degrees about the centre (both bilinear, as ``TF.affine`` does). The identity
    amount (0, 1, 0) returns ``images`` themselves.

    Example::

        >>> moved = transform_images(torch.arange(9.0).view(1, 1, 3, 3), "translate", 1)
        >>> moved[0, 0].tolist()
        [[0.0, 0.0, 0.0], [0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]

    Raises:
        ValueError: an unknown transform, or a scale factor that is not positive.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"Unknown transform {transform!r}; choose one of {TRANSFORMS}.")
    amount = float(amount)
    if transform == "scale" and amount <= 0:
        raise ValueError(f"Scale factors must be positive, got {amount}.")
    if amount == _IDENTITY[transform]:
        return images
    nearest, bilinear = TF.InterpolationMode.NEAREST, TF.InterpolationMode.BILINEAR
    shift, scale, angle = [0, round(amount)], 1.0, 0.0
    if transform != "translate":
        shift = [0, 0]
        scale, angle = (amount, 0.0) if transform == "scale" else (1.0, amount)
    return TF.affine(
        images,
        angle=angle,
        translate=shift,
        scale=scale,
        shear=[0.0, 0.0],
        interpolation=nearest if transform == "translate" else bilinear,
        fill=fill,
    )


def invariance(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[str | nn.Module],
    *,
    transform: Transform,
    amounts: Sequence[float] | Tensor,
    targets: Sequence[int] | Tensor | None = None,
    fill: float = 0.0,
    batch_size: int | None = None,
) -> Invariance:
    """Feature distances and class probability of ``images`` transformed by each of ``amounts``.

    The model runs in eval mode without gradients; its weights, train/eval modes and the global RNG are left
    as they were. The identity amount gives distance 0 and the original image's probability exactly.

    Args:
        model: a classifier: ``model(images)`` gives logits ``[N, classes]``.
        images: ``[N, C, H, W]`` images as the model expects them (normalised).
        layers: names in ``model.named_modules()`` (or modules) whose outputs, of any shape, are compared.
        transform: ``"translate"`` (vertical, pixels), ``"scale"`` (factor) or ``"rotate"`` (degrees); see
            :func:`transform_images`.
        amounts: ``[A]`` amounts of the transform.
        targets: ``[N]`` classes whose probability to track (default: each original image's top class).
        fill: the pixel value of uncovered areas in the model's input space (0 is the mean grey of normalised
            inputs).
        batch_size: transformed images per forward pass (default: as
            :func:`~lightning_deconv.analysis.occlusion.occlusion`).

    Returns:
        An :class:`Invariance`; its tensors are on the model's device.

    Raises:
        ValueError: an unknown transform or layer, no layers or amounts, a scale factor that is not
            positive, images that are not ``[N, C, H, W]``, targets of the wrong length or out of range, or a
            model whose output is not ``[N, classes]``.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
        >>> found = invariance(net, torch.rand(2, 3, 16, 16), ["1", "4"], transform="rotate", amounts=[0, 10, 20])
        >>> found.distance["4"].shape, found.probability.shape, found.distance["1"][:, 0].tolist()
        (torch.Size([2, 3]), torch.Size([2, 3]), [0.0, 0.0])
    """
    check_images(model, images)
    if transform not in TRANSFORMS:
        raise ValueError(f"Unknown transform {transform!r}; choose one of {TRANSFORMS}.")
    steps = torch.as_tensor(amounts, dtype=torch.float64).flatten()
    if steps.numel() == 0:
        raise ValueError("Give at least one amount of the transform.")
    if transform == "scale" and (steps <= 0).any():
        raise ValueError(f"Scale factors must be positive, got {steps.tolist()}.")
    if not layers:
        raise ValueError("Give at least one layer whose features to compare.")
    check_int(batch_size, "batch_size", optional=True)
    modules = resolve_layers(model, layers)
    reference = next(model.parameters(), images)
    n = len(images)
    moved = [a for a, amount in enumerate(steps.tolist()) if amount != _IDENTITY[transform]]

    with torch.no_grad(), eval_mode(model):
        fast = FastCPUOps(reference.device)
        x = images.detach().to(reference.device, reference.dtype)
        with fast:
            original, logits = run_layers(model, fast.prepare(x), modules, _vector, classify=True)
        target = check_targets(targets, logits, n)
        # Identity amounts keep the original's values exactly (a recomputation could differ by rounding).
        distance = {name: logits.new_zeros(n, len(steps)) for name in modules}
        probability = probabilities(logits).gather(1, target[:, None]).expand(-1, len(steps)).clone()
        pairs = torch.cartesian_prod(torch.tensor(moved, dtype=torch.long), torch.arange(n)).view(-1, 2)
        for chunk in pairs.split(batch_size or default_batch_size(images)) if moved else ():
            column, image = chunk[:, 0].to(x.device), chunk[:, 1].to(x.device)
            batch = torch.cat(
                [
                    transform_images(x[image[column == a]], transform, steps[a].item(), fill)
                    for a in column.unique_consecutive().tolist()
                ]
            )
            sources = {name: vectors[image] for name, vectors in original.items()}
            with fast:
                found, out = run_layers(model, fast.prepare(batch), modules, partial(_distance, sources), True)
            for name, d in found.items():
                distance[name][image, column] = d.to(distance[name].dtype)
            probability[image, column] = probabilities(out).gather(1, target[image, None])[:, 0]
    return Invariance(
        transform=transform,
        amounts=steps.float(),
        distance={name: d.float() for name, d in distance.items()},
        probability=probability.float(),
        targets=target,
    )


def _vector(name: str, activation: Tensor) -> Tensor:
    """Each image's output as one vector (a copy: a later in-place ReLU may overwrite the output)."""
    return activation.flatten(1).clone()


def _distance(sources: dict[str, Tensor], name: str, activation: Tensor) -> Tensor:
    """``[B]`` Euclidean distance of each row's vector from its original image's."""
    return torch.linalg.vector_norm(activation.flatten(1) - sources[name], dim=1)
