"""Faster CPU forms of the ops that dominate a firing, computing the same functions (to float rounding).

Profiling ZFNet's maxima pass and projections (forward and backward over small windows, batch 1 to 8)
showed three stock CPU kernels far off the convolutions' speed: max-pooling on NCHW maps (scalar code,
about 15x slower than on channels-last maps), local response normalisation (an ``avg_pool3d`` whose
backward costs as much as a convolution's) and the backward of a first-layer convolution over 3 input
channels (oneDNN's backward-data runs 5x slower than its forward). :class:`FastCPUOps` therefore runs a
pass channels-last and swaps in the two forms below; the tests hold each to the stock op.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, autograd
from torch.overrides import TorchFunctionMode

__all__ = ["FastCPUOps", "FewChannelConv2d", "local_response_norm"]


def local_response_norm(input: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> Tensor:
    """``F.local_response_norm`` of a 4-D map, with the channel window summed as ``size`` shifted squares."""
    channels = input.shape[1]
    squares = F.pad(input * input, (0, 0, 0, 0, size // 2, (size - 1) // 2))
    window = squares[:, :channels]
    for shift in range(1, size):
        window = window + squares[:, shift : shift + channels]
    return input / (window * (alpha / size) + k) ** beta


class FewChannelConv2d(autograd.Function):
    """``F.conv2d`` (``groups=1``, numeric padding) whose backward gives the input's gradient only.

    The backward is the transposed filtering written as one matrix product and ``F.fold`` (col2im), which on
    CPU beats the stock backward when the filters see few input channels, as a network's first layer does.
    No gradient reaches the weights or the bias: a projection never asks for them.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any
    ) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(x.shape[-2:]), stride, padding, dilation)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, signal: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        (weight,) = ctx.saved_tensors
        size, stride, padding, dilation = ctx.geometry
        n, c, h, w = signal.shape
        columns = weight.reshape(c, -1).t() @ signal.reshape(n, c, h * w)
        grad = F.fold(columns, size, tuple(weight.shape[-2:]), dilation=dilation, padding=padding, stride=stride)
        return grad, None, None, None, None, None


class FastCPUOps(TorchFunctionMode):
    """While active, run the model's ops on ``device`` in their faster CPU forms; elsewhere, pass them through.

    Inputs go channels-last (:meth:`prepare`), each convolution's filters are laid out channels-last once
    per instance (rather than converted at every call, as a channels-last input with NCHW filters would
    be), convolutions over at most 4 input channels use :class:`FewChannelConv2d` and 4-D local response
    normalisation :func:`local_response_norm`. One instance serves several batches and holds its filter
    copies until it is dropped. Other devices keep their stock kernels (cuDNN has none of these problems).
    """

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.enabled = torch.device(device).type == "cpu"
        self._filters: dict[int, tuple[Tensor, Tensor]] = {}  # id(weight) -> (weight, channels-last copy)

    def prepare(self, images: Tensor) -> Tensor:
        """``images`` in the layout this pass runs in."""
        return images.contiguous(memory_format=torch.channels_last) if self.enabled else images

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled and func is F.conv2d:
            return self._conv2d(*args, **kwargs)
        if self.enabled and func is F.local_response_norm and (args[0] if args else kwargs["input"]).dim() == 4:
            return local_response_norm(*args, **kwargs)
        return func(*args, **kwargs)

    def _conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # F.conv2d's names
        if id(weight) not in self._filters:  # the weight is kept too, so that its id is not reused meanwhile
            self._filters[id(weight)] = (weight, weight.detach().contiguous(memory_format=torch.channels_last))
        filters = self._filters[id(weight)][1]
        if groups == 1 and weight.shape[1] <= 4 and not isinstance(padding, str):
            return FewChannelConv2d.apply(input, filters, bias, stride, padding, dilation)
        return F.conv2d(input, filters, bias, stride, padding, dilation, groups)
