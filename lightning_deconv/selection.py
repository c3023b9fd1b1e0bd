"""Probe and feature selection: which features to watch, and where each one fires most strongly.

Zeiler & Fergus (2014, Sec. 4) follow a *randomly chosen subset* of each layer's feature maps and, for
each, the single strongest activation over a fixed set of probe images. ``choose_features`` draws that
subset reproducibly; ``find_maxima`` finds the strongest activations of every tracked feature of every
tracked layer in one forward pass over the probe set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_deconv.kernels import FastCPUOps
from lightning_deconv.layers import bound_forward, check_images, eval_mode, named_layers, resolve_layers, run_until

__all__ = [
    "Maxima",
    "Trace",
    "auto_layers",
    "check_channels",
    "choose_features",
    "find_maxima",
    "image_maxima",
    "pooling_switches",
    "resolve_features",
    "trace",
]


@dataclass(frozen=True)
class Maxima:
    """The strongest activation of each tracked channel of one layer over a probe set.

    Attributes:
        channels: ``[K]`` the tracked channels.
        value: ``[K]`` the activation's value.
        source: ``[K]`` index of the probe image that holds it.
        position: ``[K, 2]`` its (row, col) in the layer's output map.
        map_size: ``(H, W)`` of the layer's output map.
        switch: for a max-pooling layer, ``[K, 2]`` the (row, col) in the pooling's input map that each
            maximum was taken from (the paper's switch, as the pooling picked it); ``None`` otherwise.
        peaks: with ``find_maxima(..., summaries=True)``, ``[C]`` the maximum of *every* channel of the layer
            over the probe (``<= 0``: a dead feature).
        gram: with ``summaries=True``, ``[N, N]`` float64 Gram matrix of the layer's activations flattened per
            probe image (what linear CKA needs; see :mod:`lightning_deconv.analysis.settling`).
    """

    channels: Tensor
    value: Tensor
    source: Tensor
    position: Tensor
    map_size: tuple[int, int]
    switch: Tensor | None = None
    peaks: Tensor | None = None
    gram: Tensor | None = None

    def take(self, rows: Tensor | Sequence[int]) -> Maxima:
        """The maxima of ``rows`` only (e.g. one process's share of the features)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        switch = None if self.switch is None else self.switch[rows]
        return Maxima(
            self.channels[rows], self.value[rows], self.source[rows], self.position[rows], self.map_size, switch
        )


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
    if channels.numel() == 0:
        raise ValueError(f"No channels given for layer {name!r}; list at least one.")
    bad = channels[(channels < 0) | (channels >= num_channels)]
    if bad.numel():
        raise ValueError(
            f"Channels {bad.tolist()} are out of range for layer {name!r}, which has {num_channels} "
            f"channels (valid: 0..{num_channels - 1})."
        )


def image_maxima(name: str, activation: Tensor, channels: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel and image, the largest value over positions (first one wins ties), on the CPU.

    Returns:
        ``value [K, N]`` (half precision lifted to float32) and its ``position [K, N, 2]`` (row, col).
    """
    n, c, h, w = activation.shape
    check_channels(name, channels, c)
    maps = activation.detach()[:, channels.to(activation.device)].transpose(0, 1).reshape(len(channels), n, h * w)
    value, flat = maps.to(torch.promote_types(maps.dtype, torch.float32)).max(dim=2)
    flat = flat.cpu()
    return value.cpu(), torch.stack([flat // w, flat % w], dim=2)


def _strongest(name: str, activation: Tensor, channels: Tensor) -> Maxima:
    """Per channel, the largest value over images and positions (first one wins ties)."""
    value, position = image_maxima(name, activation, channels)
    best, source = value.max(dim=1)  # the first image wins ties, as each image's first position did
    rows = torch.arange(len(channels))
    return Maxima(channels, best.float(), source, position[rows, source], tuple(activation.shape[-2:]))


def pooling_switches(pool: nn.MaxPool2d, pool_input: Tensor, maxima: Maxima) -> Tensor:
    """``[K, 2]`` where in ``pool``'s input each maximum of its output came from, as ``pool`` itself picks it."""
    device = pool_input.device
    maps = pool_input.detach()[maxima.source.to(device), maxima.channels.to(device)].unsqueeze(1)
    _, index = F.max_pool2d(
        maps, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, return_indices=True
    )
    rows = torch.arange(len(maxima.channels))
    flat = index[rows, 0, maxima.position[:, 0], maxima.position[:, 1]].cpu()
    width = pool_input.shape[-1]
    return torch.stack([flat // width, flat % width], dim=1)


def _maxima_of(name: str, layer: nn.Module, output: Tensor, layer_input: Tensor, channels: Tensor) -> Maxima:
    """The strongest activations of ``layer``'s output, with their switches if it is a max-pooling."""
    found = _strongest(name, output, channels)
    if isinstance(layer, nn.MaxPool2d) and isinstance(layer_input, Tensor) and layer_input.dim() == 4:
        found = replace(found, switch=pooling_switches(layer, layer_input, found))
    return found


def _merge(best: Maxima, new: Maxima, offset: int) -> Maxima:
    better = new.value > best.value
    return Maxima(
        best.channels,
        torch.where(better, new.value, best.value),
        torch.where(better, new.source + offset, best.source),
        torch.where(better[:, None], new.position, best.position),
        best.map_size,
        None if best.switch is None else torch.where(better[:, None], new.switch, best.switch),
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


@torch.no_grad()
def find_maxima(
    model: nn.Module,
    images: Tensor,
    layers: Mapping[str | nn.Module, Sequence[int] | Tensor],
    batch_size: int | None = None,
    state: Mapping[str, Tensor] | None = None,
    summaries: bool = False,
) -> dict[str, Maxima]:
    """For each layer and each of its listed channels, the strongest activation over ``images``.

    One forward pass per batch of ``batch_size`` images (default: all at once) serves every layer, and it
    stops at the deepest one; on CPU it runs channels-last (:class:`~lightning_deconv.kernels.FastCPUOps`).
    For max-pooling layers it also records each maximum's switch. The model runs as it is (call
    ``model.eval()`` first for the paper's setting), with ``state`` replacing some of its tensors by name.
    With ``summaries``, the same pass also gives each layer's ``peaks`` and ``gram`` (see :class:`Maxima`).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> found = find_maxima(net, torch.rand(5, 3, 16, 16), {"1": [0, 7], "2": [3]})
        >>> found["1"].source.shape, found["2"].position.shape
        (torch.Size([2]), torch.Size([1, 2]))

    Raises:
        ValueError: unknown layer, empty or out-of-range channels, images that do not fit the model.
    """
    check_images(model, images)
    modules, wanted = resolve_features(model, layers)
    reference = next(model.parameters(), images)  # run on the model's device, in its precision
    forward = bound_forward(model, state)
    fast = FastCPUOps(reference.device)
    step = batch_size or len(images)
    best: dict[str, Maxima] = {}
    peaks: dict[str, list[Tensor]] = {name: [] for name in modules}
    flat: dict[str, list[Tensor]] = {name: [] for name in modules}

    def reduce(name: str, output: Tensor, layer_input: Tensor) -> Maxima:
        if summaries:  # here, before a later in-place op can change the output
            peaks[name].append(output.amax(dim=(0, 2, 3)).float().cpu())
            flat[name].append(output.flatten(1).double().cpu())
        return _maxima_of(name, modules[name], output, layer_input, wanted[name])

    for start in range(0, len(images), step):
        batch = fast.prepare(images[start : start + step].to(reference.device, reference.dtype))
        with fast:
            found = run_until(forward, batch, modules, reduce)
        best = found if not best else {name: _merge(best[name], found[name], start) for name in found}
    if summaries:
        for name, found in best.items():
            x = torch.cat(flat[name])
            best[name] = replace(found, peaks=torch.stack(peaks[name]).amax(dim=0), gram=x @ x.T)
    return best


@dataclass(frozen=True)
class Trace:
    """What one dry forward pass saw: modules in the order they first ran, and their 4-D output shapes."""

    order: list[str]
    shapes: dict[str, torch.Size]


@torch.no_grad()
def trace(model: nn.Module, image: Tensor) -> Trace:
    """Run ``model`` once on ``image`` (``[1, C, H, W]``), in eval mode, recording every module's output."""
    order: list[str] = []
    shapes: dict[str, torch.Size] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if name not in order:
                order.append(name)
                if isinstance(output, Tensor) and output.dim() == 4:
                    shapes[name] = output.shape

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in named_layers(model).items() if n]
    try:
        with eval_mode(model), torch.compiler.set_stance("force_eager"):
            model(image)
    except RuntimeError as error:
        raise ValueError(
            f"The model failed on probe images of shape {tuple(image.shape[1:])}: {error}. "
            "Give probe images in the shape and normalisation the model is trained on."
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return Trace(order, shapes)


_STAGE_END = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d)
_PASS_THROUGH = (nn.BatchNorm2d, nn.Dropout, nn.Identity, nn.LocalResponseNorm)


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def auto_layers(model: nn.Module, seen: Trace, max_stages: int = 6) -> list[str]:
    """The conv stages of ``model``: for each convolution, the last activation or pooling module that follows it.

    For ZFNet and AlexNet this gives the paper's layers 1 to 5 (e.g. ``pool1, pool2, relu3, relu4,
    pool5``). Nets with more than ``max_stages`` of them use the blocks of their trunk, found below any wrappers
    (``self.net``, ``self.backbone``): the stem (up to its pooling) and each block that contains convolutions
    (ResNet: ``layer1 ... layer4``); plain nets without blocks (VGG) keep their stages. Where that is still
    more than ``max_stages`` (MobileNet, EfficientNet, GoogLeNet, DenseNet, VGG), one layer per spatial
    resolution: the last block (or stage) before the maps shrink, a pooling closing the stage it pools.
    """
    modules = named_layers(model)
    leaves = [n for n in seen.order if n in modules and not list(modules[n].children())]
    stages: list[str] = []
    current: str | None = None
    for name in leaves:
        module = modules[name]
        if isinstance(module, nn.Conv2d):
            if current is not None:
                stages.append(current)
            current = name
        elif current is not None and isinstance(module, _STAGE_END) and name in seen.shapes:
            current = name
        elif current is not None and not isinstance(module, _PASS_THROUGH):
            stages.append(current)
            current = None
    if current is not None:
        stages.append(current)
    stages = list(dict.fromkeys(stages))
    if len(stages) <= max_stages:
        return stages
    blocks = _trunk_blocks(modules, seen)
    units = blocks if len(blocks) >= 2 else stages
    return units if len(units) <= max_stages else _last_per_resolution(units, modules, seen)


def _last_per_resolution(units: list[str], modules: dict[str, nn.Module], seen: Trace) -> list[str]:
    """The last of ``units`` at each spatial resolution, in order; a pooling unit belongs to the stage whose
    maps it pools (it closes it), every other unit to the resolution of its output."""
    groups: list[list[str]] = []
    stage = previous = None
    for name in units:
        output = tuple(seen.shapes[name][-2:])
        # a pooling unit works at its input's resolution: the previous unit's output
        here = previous if isinstance(modules[name], (nn.MaxPool2d, nn.AvgPool2d)) else output
        if not groups or here != stage:
            groups.append([])
        groups[-1].append(name)
        stage, previous = here, output
    return [group[-1] for group in groups]


def _trunk_blocks(modules: dict[str, nn.Module], seen: Trace) -> list[str]:
    """The stem and the conv blocks of the first module (from the top) with several conv-holding children."""
    trunk = ""
    while True:
        prefix = f"{trunk}." if trunk else ""
        children = [n for n in modules if n.startswith(prefix) and n.count(".") == prefix.count(".") and n != trunk]
        holding = [n for n in children if _has_conv(modules[n])]
        if len(holding) != 1:
            break
        trunk = holding[0]
    ran = [n for n in seen.order if n in children]  # in the order the forward pass ran them
    blocks: list[str] = []
    stem: str | None = None
    for name in ran:
        module = modules[name]
        if list(module.children()) and _has_conv(module):
            if stem is not None:
                blocks.append(stem)
                stem = None
            if name in seen.shapes:
                blocks.append(name)
        elif isinstance(module, nn.Conv2d) or (stem is not None and isinstance(module, _STAGE_END + _PASS_THROUGH)):
            stem = name if name in seen.shapes else stem
    return blocks
