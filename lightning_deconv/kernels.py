"""Faster CPU forms of the ops that dominate a firing, computing the same functions (to float rounding).

Profiling ZFNet's maxima pass and projections (forward and backward over small windows, batch 1 to 8)
showed three stock CPU kernels far off the convolutions' speed: max-pooling on NCHW maps (scalar code,
about 15x slower than on channels-last maps), local response normalisation (an ``avg_pool3d`` whose
backward costs as much as a convolution's) and the backward of a first-layer convolution over 3 input
channels (oneDNN's backward-data runs 5x slower than its forward). :class:`FastCPUOps` therefore runs a
pass channels-last and swaps in the two forms below; the tests hold each to the stock op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, autograd, nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from lightning_deconv.narrowing import narrowed_conv2d

__all__ = [
    "CPU_PASS_BYTES",
    "FastCPUOps",
    "FewChannelConv2d",
    "LocalResponseNorm",
    "local_response_norm",
    "one_thread",
    "per_pass",
    "plain_ops",
    "settle_heap",
]


# Most bytes of maps alive at once in one CPU pass. glibc's malloc keeps freed blocks below its mmap threshold
# (which it raises up to 32 MiB as blocks are freed) for the next request, but gives the top of its heap back
# when much of it lies free; what it maps or takes back afresh the kernel zero-fills page by page on first
# touch, on every pass. ZFNet at 224 px: a 32-image pass spent a third of its time in those page faults. Passes
# of 2 to 7 images took none alone, but between other work (the projections, the plain forward) those holding
# more than about 24 MiB at once took thousands a call again; those within it none.
CPU_PASS_BYTES = 24 * 2**20


# glibc's malloc serves a block from its heap once its size is below the mmap threshold, and gives the heap's top
# back to the kernel when more than twice that threshold lies free there. Both start low and rise only as blocks
# of up to 32 MiB that it mapped are freed: to 18 MiB in a process whose largest such block was ZFNet's conv1 map
# of 4 images. A firing frees more than 37 MiB at once between its passes, so the heap's top went back to the
# kernel and the next pass took it again, zero-filled page by page: 2,400 to 17,000 page faults in most calls on
# ZFNet (4,100 made relu4's projections 68 ms instead of 31). Freeing one untouched block just under 32 MiB, once,
# sets both to their ceilings (as any process that frees such a map does); the heap then keeps up to 62 MiB of
# freed top.
_HEAP_BLOCK_BYTES = 31 * 2**20
_heap_settled = False


def settle_heap() -> None:
    """Once per process, raise glibc's malloc thresholds to their ceilings by freeing one untouched 31 MiB block,
    so that a firing's passes reuse the heap their predecessors freed instead of page-faulting it in afresh
    (elsewhere a harmless allocation that is never touched)."""
    global _heap_settled
    if not _heap_settled:
        _heap_settled = True
        torch.empty(_HEAP_BLOCK_BYTES, dtype=torch.uint8)  # mapped, never touched, unmapped at once


def per_pass(count: int, item_bytes: int, device: torch.device | str, most: int | None = None) -> int:
    """How many of ``count`` items (images, windows) to run per pass: at most ``most``; on CPU also as many as
    keep ``item_bytes`` of maps per item within :data:`CPU_PASS_BYTES` (at least one)."""
    size = max(1, min(count, most or count))
    if torch.device(device).type == "cpu" and item_bytes > 0:
        size = min(size, max(1, CPU_PASS_BYTES // item_bytes))
    return size


def local_response_norm(input: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> Tensor:
    """``F.local_response_norm`` of a 4-D map, with the channel window summed as ``size`` shifted squares and
    the input's gradient written out (:class:`LocalResponseNorm`)."""
    return LocalResponseNorm.apply(input, size, alpha, beta, k)


def _window_sum(maps: Tensor, before: int, after: int) -> Tensor:
    """Per channel ``c``, the sum of ``maps``' channels ``c - before`` to ``c + after`` (zero outside)."""
    channels = maps.shape[1]
    total = maps.clone()
    for shift in range(1, min(before, channels - 1) + 1):
        total[:, shift:] += maps[:, : channels - shift]
    for shift in range(1, min(after, channels - 1) + 1):
        total[:, : channels - shift] += maps[:, shift:]
    return total


def _power(base: Tensor, beta: float) -> Tensor:
    """``base ** beta``; for the usual 0.75 by square roots, which CPUs take several times faster than ``pow``."""
    if beta == 0.75:
        root = base.sqrt()
        return root.mul_(root.sqrt())
    return base**beta


class LocalResponseNorm(autograd.Function):
    r"""Local response normalisation of a 4-D map, :math:`y_c = x_c / d_c^\beta` with
    :math:`d_c = k + \frac{\alpha}{n} \sum_{j \in W(c)} x_j^2` over the ``n`` channels :math:`W(c)` around
    :math:`c` (``F.local_response_norm``'s window), and its input gradient in closed form:

    .. math:: \frac{\partial L}{\partial x_i} = \frac{g_i}{d_i^\beta}
        - \frac{2 \alpha \beta}{n}\, x_i \sum_{c:\, i \in W(c)} \frac{g_c\, x_c}{d_c^{\beta + 1}}

    Autograd through the shifted squares would allocate a zeroed map for every shift's backward; this is a
    handful of passes over the map. No gradient reaches ``size``, ``alpha``, ``beta`` or ``k``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
        scale = _window_sum(x * x, size // 2, (size - 1) // 2).mul_(alpha / size).add_(k)
        denominator = _power(scale, beta)
        if not ctx.needs_input_grad[0]:  # e.g. the maxima pass: no map is kept, the last one is written over
            return torch.div(x, denominator, out=denominator)
        ctx.save_for_backward(x, scale, denominator)
        ctx.size, ctx.factor = size, 2 * alpha * beta / size
        return x / denominator

    @staticmethod
    def backward(ctx: Any, signal: Tensor) -> tuple[Tensor | None, ...]:
        x, scale, denominator = ctx.saved_tensors
        spread = _window_sum(signal * x / (denominator * scale), (ctx.size - 1) // 2, ctx.size // 2)
        return signal / denominator - ctx.factor * x * spread, None, None, None, None


class FewChannelConv2d(autograd.Function):
    """``F.conv2d`` (``groups=1``, numeric padding) whose backward gives the input's gradient only.

    The backward is the transposed filtering done as one forward convolution (:func:`transposed_by_phases`),
    which on CPU beats the stock backward when the filters see few input channels, as a network's first layer
    does: there oneDNN's backward-data kernel runs 4 to 5x slower than the forward one. Dilated filters take
    a matrix product and ``F.fold`` (col2im) instead. No gradient reaches the weights or the bias: a
    projection never asks for them.
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
        if _pair(dilation) == (1, 1):
            grad = transposed_by_phases(signal, weight, size, _pair(stride), _pair(padding))
        else:
            n, c, h, w = signal.shape
            columns = weight.reshape(c, -1).t() @ signal.reshape(n, c, h * w)
            grad = F.fold(columns, size, tuple(weight.shape[-2:]), dilation=dilation, padding=padding, stride=stride)
        return grad, None, None, None, None, None


def transposed_by_phases(
    signal: Tensor, weight: Tensor, size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> Tensor:
    r"""The transposed filtering of ``signal`` ``[N, O, h, w]`` by the filters ``weight`` ``[O, C, kh, kw]`` of a
    convolution with ``stride`` and ``padding``: the gradient, ``[N, C, *size]``, of its input of ``size``.

    Each output pixel :math:`Y = s q + r - p` takes only the filter taps :math:`\kappa = s d + r` (one phase
    :math:`r` of the stride) against the signal at :math:`q - d`. So every phase is an ordinary correlation of
    the signal with a :math:`\lceil k / s \rceil`-tap slice of the filters, and all :math:`s_y s_x` phases run as
    one forward convolution with :math:`C s_y s_x` output channels, whose outputs are then interleaved (a pixel
    shuffle): the forward kernels' speed for the transposed direction, with no scattering.
    """
    n, o, h, w = signal.shape
    (sy, sx), (kh, kw) = stride, weight.shape[-2:]
    ty, tx = -(-kh // sy), -(-kw // sx)  # taps per phase
    channels = weight.shape[1]
    # Tap kappa = s * j + r; the correlation runs over t = taps - 1 - j.
    taps = F.pad(weight, (0, tx * sx - kw, 0, ty * sy - kh)).view(o, channels, ty, sy, tx, sx).flip(2, 4)
    phases = taps.permute(1, 3, 5, 0, 2, 4).reshape(channels * sy * sx, o, ty, tx)
    qy, qx = -(-(size[0] + padding[0]) // sy), -(-(size[1] + padding[1]) // sx)  # outputs each phase gives
    # The correlation pads taps - 1 before the signal and needs q - h after it: the convolution's own padding
    # does both where that is enough (it is for a convolution's own backward, but for odd sizes).
    beyond = (max(0, qx - w - tx + 1), max(0, qy - h - ty + 1))
    if any(beyond):
        signal = F.pad(signal, (0, beyond[0], 0, beyond[1]))
    filters = phases.to(signal.dtype).contiguous(memory_format=_layout(signal))
    phased = F.conv2d(signal, filters, padding=(ty - 1, tx - 1))
    phased = phased[..., :qy, :qx].reshape(n, channels, sy, sx, qy, qx)
    grad = phased.permute(0, 1, 4, 2, 5, 3).reshape(n, channels, qy * sy, qx * sx)
    return grad[..., padding[0] : padding[0] + size[0], padding[1] : padding[1] + size[1]]


def _layout(tensor: Tensor) -> torch.memory_format:
    return torch.channels_last if tensor.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class FastCPUOps(TorchFunctionMode):
    """While active, run the model's ops on ``device`` in their faster CPU forms; elsewhere, pass them through.

    Inputs go channels-last (:meth:`prepare`), each convolution's filters are laid out channels-last once
    per instance (rather than converted at every call, as a channels-last input with NCHW filters would
    be), convolutions over at most 4 input channels use :class:`FewChannelConv2d` and 4-D local response
    normalisation :func:`local_response_norm`. One instance serves several batches and holds its filter
    copies until it is dropped. Other devices keep their stock kernels (cuDNN has none of these problems).
    While :meth:`narrowed` (on any device), one convolution computes only the output channels a pass reads.
    """

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.enabled = torch.device(device).type == "cpu"
        if self.enabled:
            settle_heap()
        self._filters: dict[int, tuple[Tensor, Tensor]] = {}  # id(weight) -> (weight, channels-last copy)
        self._narrowed: tuple[nn.Conv2d, Tensor] | None = None

    def prepare(self, images: Tensor) -> Tensor:
        """``images`` in the layout this pass runs in."""
        return images.contiguous(memory_format=torch.channels_last) if self.enabled else images

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and (self.enabled or self._narrowed is not None):
            return self._conv2d(*args, **kwargs)
        if self.enabled and func is F.local_response_norm and (args[0] if args else kwargs["input"]).dim() == 4:
            return local_response_norm(*args, **kwargs)
        return func(*args, **kwargs)

    def filters(self, weight: Tensor) -> Tensor:
        """``weight`` detached, laid out as this pass's convolutions take it (on CPU channels-last, copied once
        per instance)."""
        if not self.enabled:
            return weight.detach()
        if id(weight) not in self._filters:  # the weight is kept too, so that its id is not reused meanwhile
            with torch.inference_mode(False):  # a copy made for a pass under inference mode serves a backward too
                self._filters[id(weight)] = (weight, weight.detach().contiguous(memory_format=torch.channels_last))
        return self._filters[id(weight)][1]

    @contextlib.contextmanager
    def narrowed(self, narrowing: tuple[nn.Conv2d, Tensor] | None) -> Iterator[None]:
        """While active (on any device), with ``narrowing`` ``(conv, channels)``, ``conv`` computes only its output
        ``channels``, the others zero (:mod:`lightning_deconv.narrowing`); ``None``: every convolution all of them."""
        conv, channels = narrowing or (None, None)
        self._narrowed = None if conv is None else (conv, channels.to(conv.weight.device))
        try:
            yield
        finally:
            self._narrowed = None

    def _conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # F.conv2d's names
        if self._narrowed is not None and weight is self._narrowed[0].weight:
            layout = torch.channels_last if self.enabled else torch.contiguous_format
            filters = self.filters(weight)  # laid out whole: the projections' tails take it too
            return narrowed_conv2d(
                input, filters, bias, self._narrowed[1], stride, padding, dilation, memory_format=layout
            )
        if not self.enabled:
            return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        filters = self.filters(weight)
        if groups == 1 and weight.shape[1] <= 4 and not isinstance(padding, str):
            return FewChannelConv2d.apply(input, filters, bias, stride, padding, dilation)
        return F.conv2d(input, filters, bias, stride, padding, dilation, groups)


@contextlib.contextmanager
def one_thread(device: torch.device | str) -> Iterator[None]:
    """While active, CPU ops on ``device`` run on one thread; the thread count is restored afterwards.

    For passes of small maps (the plan's one image and few windows, the top-k bookkeeping on a few channels):
    each op over PyTorch's grain size opens a parallel region, and waiting for the other threads costs more
    than it saves there; on two cores shared with other jobs a waiting thread may not run for a whole time
    slice, which made the plan 15x slower on two threads than on one (1.25 s against 0.08 s). The
    projections' batches are larger and keep every thread: on a lightly loaded machine two threads made them
    faster, only under heavy load did one thread win.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def plain_ops() -> Iterator[None]:
    """While active, torch ops skip every ``TorchFunctionMode`` (:class:`FastCPUOps`, the projection rules).

    For the bookkeeping a forward hook does between a pass's layers (maxima, switches): dozens of small ops, each
    of which would otherwise make a round trip through the modes' Python handlers (half their time).
    """
    with torch._C.DisableTorchFunction():
        yield
