"""The model's stages: one dry forward pass records the modules in the order they run, and the conv stages
the paper tracks (layers 1 to 5 of ZFNet and AlexNet) are found from it for any CNN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_deconv.layers import eval_mode, named_layers

__all__ = ["Trace", "auto_layers", "trace"]


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
