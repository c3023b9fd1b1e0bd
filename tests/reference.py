"""Independent reference implementations the engine is tested against.

Written from the paper's description, sharing no code with ``lightning_deconv``:

* ``explicit_deconvnet`` walks an ``nn.Sequential`` of Conv2d / ReLU / MaxPool2d by hand: a forward that
  records the max-pooling switches, then unpool (scatter-*add* to the switches, so overlapping windows
  sharing a switch add up), rectify, and ``conv_transpose2d`` with the same weights and the output size
  restored.
* ``swapped_relu_projection`` handles any graph: a deep copy of the model whose ``nn.ReLU`` modules are
  replaced by a module with a hand-written backward rule, differentiated with plain autograd.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def strongest(activations: Tensor, channel: int) -> tuple[int, int, int]:
    """(image, row, col) of the largest value of one channel, scanning images in order."""
    maps = activations[:, channel]
    flat = int(maps.flatten().argmax())
    h, w = maps.shape[-2:]
    return flat // (h * w), (flat % (h * w)) // w, flat % w


def _rectify(signal: Tensor, active: Tensor, rule: str, slope: float | Tensor = 0.0) -> Tensor:
    """ReLU (``slope`` 0) or leaky ReLU: ``active`` is the local slope f'(x) of the forward pass."""
    rectified = torch.where(signal > 0, signal, signal * slope)
    if rule == "deconvnet":
        return rectified
    if rule == "guided":
        return rectified * active
    return signal * active  # gradient


def explicit_deconvnet(
    net: nn.Sequential, image: Tensor, upto: int, channel: int, where: tuple[int, int] | None, rule: str
) -> tuple[Tensor, Tensor]:
    """Project from module ``net[upto]``'s output of one image; returns (projection, layer output).

    ReLU, ReLU6, LeakyReLU and PReLU get the rule's analogue: the deconvnet rectifies the signal with the
    activation's own shape (ReLU6: ReLU), guided backprop multiplies that by the local slope.

    ``where=None`` seeds with the channel's whole map, else the single activation at (row, col).
    """
    x = image
    tape = []
    for module in net[: upto + 1]:
        if isinstance(module, nn.Conv2d):
            tape.append(("conv", module, x.shape))
            x = F.conv2d(x, module.weight, module.bias, module.stride, module.padding, module.dilation)
        elif isinstance(module, nn.ReLU):
            tape.append(("relu", (x > 0).to(x.dtype), 0.0))
            x = x.clamp(min=0)
        elif isinstance(module, (nn.LeakyReLU, nn.PReLU)):
            slope = module.negative_slope if isinstance(module, nn.LeakyReLU) else module.weight.detach().view(-1, 1, 1)
            tape.append(("relu", torch.where(x > 0, torch.ones_like(x), slope * torch.ones_like(x)), slope))
            x = torch.where(x > 0, x, x * slope)
        elif isinstance(module, nn.ReLU6):
            tape.append(("relu", ((x > 0) & (x < 6)).to(x.dtype), 0.0))
            x = x.clamp(0, 6)
        elif isinstance(module, nn.MaxPool2d):
            y, switches = F.max_pool2d(
                x,
                module.kernel_size,
                module.stride,
                module.padding,
                ceil_mode=module.ceil_mode,
                return_indices=True,
            )
            tape.append(("pool", switches, x.shape))
            x = y
        else:
            raise TypeError(f"reference does not know {module}")
    seed = torch.zeros_like(x)
    if where is None:
        seed[0, channel] = x[0, channel]
    else:
        seed[0, channel, where[0], where[1]] = x[0, channel, where[0], where[1]]
    signal = seed
    for kind, item, in_shape in reversed(tape):
        if kind == "pool":  # unpool: every pooled value goes back to its switch, shared switches add up
            n, c = signal.shape[:2]
            unpooled = torch.zeros(n, c, in_shape[2] * in_shape[3], dtype=signal.dtype)
            unpooled.scatter_add_(2, item.flatten(2), signal.flatten(2))
            signal = unpooled.view(in_shape)
        elif kind == "relu":
            signal = _rectify(signal, item, rule, in_shape)
        else:  # transposed filtering with the same weights, restoring the input's size
            conv = item
            k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
            extra = [
                in_shape[2 + i] - ((signal.shape[2 + i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1)
                for i in range(2)
            ]
            signal = F.conv_transpose2d(signal, conv.weight, None, s, p, tuple(extra), 1, d)
    return signal, x


class RuleReLU(torch.autograd.Function):
    """ReLU whose backward applies a named rule; test-side, independent of the engine."""

    @staticmethod
    def forward(ctx, x, rule):
        ctx.rule = rule
        ctx.save_for_backward(x > 0)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, signal):
        (active,) = ctx.saved_tensors
        return _rectify(signal, active, ctx.rule), None


class RuleReLUModule(nn.Module):
    def __init__(self, rule: str) -> None:
        super().__init__()
        self.rule = rule

    def forward(self, x):
        return RuleReLU.apply(x, self.rule)


def swapped_relu_projection(
    model: nn.Module, image: Tensor, layer: str, channel: int, where: tuple[int, int], rule: str
) -> Tensor:
    """Projection of one activation through a copy of ``model`` whose ReLU modules carry ``rule``."""
    twin = copy.deepcopy(model).eval()
    for name, module in list(twin.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, RuleReLUModule(rule))
        del name
    captured = {}
    target = dict(twin.named_modules())[layer]
    handle = target.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    x = image.clone().requires_grad_(True)
    try:
        twin(x)
    finally:
        handle.remove()
    out = captured["out"]
    seed = torch.zeros_like(out)
    seed[0, channel, where[0], where[1]] = out[0, channel, where[0], where[1]].detach()
    (grad,) = torch.autograd.grad(out, x, seed)
    return grad
