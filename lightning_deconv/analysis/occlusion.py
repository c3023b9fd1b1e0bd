"""Occlusion sensitivity (Zeiler & Fergus 2014, Sec. 4.2 and Fig. 7).

A grey square slides over the image; at each of its positions the occluded image goes through the model,
and three maps record what changed: (b) the total activation of the feature map that is strongest on the
unoccluded image (in the paper: layer 5), (d) the probability of the correct class and (e) the most
probable class. If the model really locates the object, the probability drops where the object is
covered, not where the background is.

All occluded images (positions x images) run as batches of ``batch_size``, each built from its images with
one masked write; on CPU they run channels-last (:class:`~lightning_deconv.kernels.FastCPUOps`). A forward
that is only wanted for the feature map stops at that layer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from lightning_deconv.analysis.cones import Cones
from lightning_deconv.analysis.passes import check_targets, default_batch_size, probabilities, run_layers
from lightning_deconv.checks import check_int
from lightning_deconv.kernels import FastCPUOps
from lightning_deconv.layers import check_images, eval_mode, resolve_layers

__all__ = ["Occlusion", "occlusion"]


@dataclass(frozen=True)
class Occlusion:
    """The maps of an occlusion experiment: one value per position of the square, per image.

    Map cell ``[i, j]`` is the square with its top-left corner at pixel ``(i * stride, j * stride)``.

    Attributes:
        probability: ``[N, h, w]`` float32 softmax probability of ``targets`` (``None`` without ``classify``).
        label: ``[N, h, w]`` int64 most probable class (``None`` without ``classify``).
        feature: ``[N, h, w]`` float32 summed activation of ``channel`` of ``layer`` (``None`` without a layer).
        targets: ``[N]`` the class whose probability is mapped (``None`` without ``classify``).
        channel: ``[N]`` the channel of ``layer`` holding the largest single activation on each unoccluded
            image (``None`` without a layer).
        layer: the layer's name in ``model.named_modules()``, or ``None``.
        patch: side of the square in pixels.
        stride: step between positions in pixels.
        fill: the square's value in the model's input space.
    """

    probability: Tensor | None
    label: Tensor | None
    feature: Tensor | None
    targets: Tensor | None
    channel: Tensor | None
    layer: str | None
    patch: int
    stride: int
    fill: float

    def square(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` pixel box of the square at map cell ``[row, col]``."""
        top, left = row * self.stride, col * self.stride
        return top, left, top + self.patch, left + self.patch


def occlusion(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module | None = None,
    *,
    patch: int,
    stride: int,
    fill: float = 0.0,
    targets: Sequence[int] | Tensor | None = None,
    batch_size: int | None = None,
    classify: bool = True,
    incremental: bool = True,
) -> Occlusion:
    """Slide a ``patch`` x ``patch`` square of ``fill`` over each image and map the model's response.

    The square's top-left corner visits ``0, stride, 2 * stride, ...`` along each axis while the square fits,
    so the maps are ``h = (H - patch) // stride + 1`` by ``w = (W - patch) // stride + 1``. The model runs in
    eval mode without gradients; its weights, train/eval modes and the global RNG are left as they were.

    Args:
        model: a classifier: ``model(images)`` gives logits ``[N, classes]``.
        images: ``[N, C, H, W]`` images as the model expects them (normalised).
        layer: with a layer (name in ``model.named_modules()`` or module, 4-D output), also map the summed
            activation of its channel holding the largest single activation on the unoccluded image.
        patch: side of the square in pixels.
        stride: step between the square's positions in pixels.
        fill: the square's pixel value in the model's input space (0 is the mean grey of normalised inputs).
        targets: ``[N]`` classes whose probability to map (default: each unoccluded image's top class).
        batch_size: occluded images per forward pass (default:
            :func:`~lightning_deconv.analysis.passes.default_batch_size`).
        classify: map ``probability`` and ``label``; with ``classify=False`` (and a ``layer``) each forward
            stops at ``layer``.
        incremental: compute each occluded pass only inside the square's cone, from the unoccluded pass's
            maps, as far as the cone can be traced (:mod:`~lightning_deconv.analysis.cones`); ``False`` runs
            every occluded image through the whole model. Both give the same maps (to float rounding).

    Returns:
        An :class:`Occlusion`; its tensors are on the model's device.

    Raises:
        ValueError: ``patch`` or ``stride`` below 1, a square larger than the images, images that are not
            ``[N, C, H, W]``, targets of the wrong length or out of range, a layer whose output is not 4-D, a
            model whose output is not ``[N, classes]``, or nothing to compute.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
        >>> maps = occlusion(net, torch.rand(2, 3, 20, 24), "1", patch=8, stride=4)
        >>> maps.probability.shape, maps.label.shape, maps.feature.shape
        (torch.Size([2, 4, 5]), torch.Size([2, 4, 5]), torch.Size([2, 4, 5]))
    """
    check_images(model, images)
    height, width = images.shape[-2:]
    _check_square(patch, stride, height, width)
    check_int(batch_size, "batch_size", optional=True)
    if not classify and layer is None:
        raise ValueError("Nothing to compute: with `classify=False`, give a `layer` whose feature map to track.")
    if not classify and targets is not None:
        raise ValueError("`targets` select the class probability to map; they need `classify=True`.")
    modules = resolve_layers(model, [layer]) if layer is not None else {}
    name = next(iter(modules), None)
    reference = next(model.parameters(), images)
    rows, cols = (height - patch) // stride + 1, (width - patch) // stride + 1
    n, positions = len(images), rows * cols

    with torch.no_grad(), eval_mode(model):
        fast = FastCPUOps(reference.device)  # one for all batches: it lays the filters out once
        x = fast.prepare(images.detach().to(reference.device, reference.dtype))
        with fast, Cones.recording(model, x) if incremental else contextlib.nullcontext() as cones:
            peaks, logits = run_layers(model, x, modules, _channel_peaks, classify)
        channel = peaks[name].argmax(dim=1) if name is not None else None
        target = check_targets(targets, logits, n) if classify else None
        plan = (
            _plan(model, cones, modules, peaks, logits if classify else None, patch, stride, fast)
            if incremental
            else None
        )

        probability, label, feature = [], [], []
        grid = torch.arange(max(height, width), device=x.device)
        batch_size = batch_size or (plan.batch_size if plan is not None else default_batch_size(images))
        for flat in torch.arange(n * positions, device=x.device).split(batch_size):
            image, position = flat // positions, flat % positions
            total = partial(_channel_total, channel[image]) if channel is not None else _feature_map
            if plan is not None:
                sums, out = plan.run(image, position // cols, position % cols, fill, channel, total, classify)
            else:
                top, left = (position // cols) * stride, (position % cols) * stride
                # One masked write puts every square into its copy of the image (copies keep channels-last).
                in_rows = (grid[:height] >= top[:, None]) & (grid[:height] < top[:, None] + patch)
                in_cols = (grid[:width] >= left[:, None]) & (grid[:width] < left[:, None] + patch)
                batch = x[image].masked_fill_(in_rows[:, None, :, None] & in_cols[:, None, None, :], fill)
                with fast:
                    sums, out = run_layers(model, batch, modules, total, classify)
            if name is not None:
                feature.append(sums[name])
            if classify:
                probability.append(probabilities(out).gather(1, target[image, None])[:, 0])
                label.append(out.argmax(dim=1))

    def as_maps(parts: list[Tensor], dtype: torch.dtype) -> Tensor | None:
        return torch.cat(parts).to(dtype).reshape(n, rows, cols) if parts else None

    return Occlusion(
        probability=as_maps(probability, torch.float32),
        label=as_maps(label, torch.int64),
        feature=as_maps(feature, torch.float32),
        targets=target,
        channel=channel,
        layer=name,
        patch=patch,
        stride=stride,
        fill=float(fill),
    )


@dataclass
class _Incremental:
    """Occluded passes on cones up to chain layer ``switch``, then the model's own forward from there."""

    model: nn.Module
    cones: Cones
    axes: list
    switch: int
    patch: int
    stride: int
    tracked: int | None  # chain index of the tracked layer, where it lies below the switch
    name: str | None
    later: dict[str, nn.Module]  # the tracked layer, where it lies past the switch
    fast: FastCPUOps
    groups: list[tuple[Tensor, list]]  # per axis: the group of each row (column) of positions, their extents
    batch_size: int  # occluded images per batch
    inner: int  # occluded images per batch of cones

    def blank(self, count: int) -> Tensor:
        """Input for the forward past the switch: none of it is read (checked), so NaN, to show if it were."""
        images = self.cones.images
        return torch.full((1, *images.shape[1:]), float("nan"), dtype=images.dtype, device=images.device).expand(
            count, -1, -1, -1
        )

    def run(
        self,
        image: Tensor,
        row: Tensor,
        col: Tensor,
        fill: float,
        channel: Tensor | None,
        total: Callable[[str, Tensor], Tensor],
        classify: bool,
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """What :func:`run_layers` gives for the occluded images (image, map cell) of one batch."""
        (row_group, row_extents), (col_group, col_extents) = self.groups
        key = row_group[row] * len(col_extents) + col_group[col]
        maps, feature = None, None
        with self.fast:
            groups = [members for group in key.unique() for members in (key == group).nonzero()[:, 0].split(self.inner)]
            for members in groups:
                tracked = (self.tracked, channel[image[members]]) if self.tracked is not None else None
                number = int(key[members[0]])
                extents = (row_extents[number // len(col_extents)], col_extents[number % len(col_extents)])
                part, total_part = self.cones.occluded(
                    image[members],
                    row[members],
                    col[members],
                    extents,
                    self.patch,
                    self.stride,
                    fill,
                    self.axes,
                    self.switch,
                    tracked,
                )
                if maps is None:
                    maps = part.new_empty((len(image), *part.shape[1:])).contiguous(memory_format=torch.channels_last)
                    feature = part.new_empty(len(image)) if total_part is not None else None
                maps[members] = part
                if feature is not None:
                    feature[members] = total_part
            sums, out = {}, None
            if classify or self.later:
                with self.cones.answering(self.switch, [maps]):
                    sums, out = run_layers(self.model, self.blank(len(image)), self.later, total, classify)
        if feature is not None:
            sums[self.name] = feature
        return sums, out


def _plan(
    model: nn.Module,
    cones: Cones,
    modules: dict[str, nn.Module],
    peaks: dict[str, Tensor],
    logits: Tensor | None,
    patch: int,
    stride: int,
    fast: FastCPUOps,
) -> _Incremental | None:
    """The incremental plan for one square and stride, or ``None`` (with a warning) where no cone can be traced
    or the model's forward past the switch reads more than the chain's output."""
    name = next(iter(modules), None)
    index = next((i for i, layer in enumerate(cones.layers) if name and layer.module is modules[name]), None)
    axes = cones.axes(patch, stride)
    switch = cones.switch(axes, last=index if logits is None else None)
    if switch == 0:
        warnings.warn(
            f"occlusion runs every occluded image through the whole model: the square's cone cannot be traced "
            f"from the input, since {cones.stop}. Results are exact; only slower.",
            stacklevel=3,
        )
        return None
    tracked = index if index is not None and index < switch else None
    later = {} if tracked is not None else modules
    groups, sizes = cones.groups(axes, switch), cones.batch_sizes(axes, switch)
    plan = _Incremental(model, cones, axes, switch, patch, stride, tracked, name, later, fast, groups, *sizes)
    if logits is not None or later:
        # The forward past the switch, fed the unoccluded maps there and a NaN image, must give the unoccluded pass.
        try:
            with fast, cones.answering(switch, [cones.maps[switch - 1].clone()]):
                check, out = run_layers(model, plan.blank(len(cones.images)), later, _channel_peaks, logits is not None)
            same = all(_close(check[k], peaks[k]) for k in check) and (out is None or _close(out, logits))
        except (RuntimeError, ValueError):
            same = False
        if not same:
            warnings.warn(
                "occlusion runs every occluded image through the whole model: its forward past the traced "
                f"layers ({cones.layers[switch - 1].module}) reads more than their output (a skip connection or "
                "a reused input?). Results are exact; only slower.",
                stacklevel=3,
            )
            return None
    cones.prepare(switch)
    return plan


def _close(got: Tensor, want: Tensor) -> bool:
    return bool(torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())))


def _check_square(patch: int, stride: int, height: int, width: int) -> None:
    for value, label in ((patch, "patch"), (stride, "stride")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{label}` must be a whole number of pixels >= 1, got {value!r}.")
    if patch > min(height, width):
        raise ValueError(
            f"The {patch}x{patch} square does not fit in {height}x{width} images; use a patch of at most "
            f"{min(height, width)} pixels."
        )


def _feature_map(name: str, activation: Tensor) -> Tensor:
    if activation.dim() != 4:
        raise ValueError(
            f"Layer {name!r} outputs {tuple(activation.shape)}, not a 4-D [N, C, H, W] feature map. Choose a "
            "convolutional stage (a conv, ReLU or pooling module)."
        )
    return activation


def _channel_peaks(name: str, activation: Tensor) -> Tensor:
    """``[N, C]`` each channel's largest single activation."""
    return _feature_map(name, activation).amax(dim=(2, 3))


def _channel_total(channels: Tensor, name: str, activation: Tensor) -> Tensor:
    """``[N]`` the summed map of ``channels[k]`` in row ``k``."""
    rows = torch.arange(len(channels), device=activation.device)
    return _feature_map(name, activation)[rows, channels].sum(dim=(1, 2))
