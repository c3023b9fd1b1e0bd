"""The faster CPU forms against the stock PyTorch ops they stand in for: values and input gradients."""

from __future__ import annotations

import copy
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import zf_shaped
from torch import nn

from lightning_deconv.kernels import FastCPUOps, FewChannelConv2d, local_response_norm, one_thread
from lightning_deconv.paper.models import ZFNet


def _value_and_grad(fn, x: torch.Tensor, signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x, signal)
    return out.detach(), grad


@pytest.mark.parametrize(
    "size, alpha, beta, k", [(5, 1e-4, 0.75, 2.0), (4, 1e-2, 0.5, 1.0), (1, 0.3, 1.2, 0.5), (9, 0.2, 0.75, 1.0)]
)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_local_response_norm_equals_stock(size, alpha, beta, k, layout):
    """With and without its gradient (the maxima pass takes the lean form), windows wider than the channels too."""
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(2, 7, 5, 6, generator=gen, dtype=torch.float64).contiguous(memory_format=layout)
    signal = torch.randn(2, 7, 5, 6, generator=gen, dtype=torch.float64)
    want = _value_and_grad(lambda t: F.local_response_norm(t, size, alpha, beta, k), x, signal)
    got = _value_and_grad(lambda t: local_response_norm(t, size, alpha, beta, k), x, signal)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    before = x.clone()
    with torch.no_grad():
        lean = local_response_norm(x, size, alpha, beta, k)
    torch.testing.assert_close(lean, want[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(x, before)  # the lean form writes over its own maps only


@pytest.mark.parametrize(
    "stride, padding, dilation, side, kernel",
    [
        (2, 1, 1, 31, (5, 4)),
        (2, 1, 1, 32, (5, 4)),
        (1, 0, 1, 17, (5, 4)),
        (3, 2, 1, 29, (5, 4)),
        (2, (1, 3), 2, 30, (5, 4)),
        ((1, 2), 0, (2, 1), 23, (5, 4)),
        (2, 3, 1, 40, (7, 7)),  # ZFNet's conv1 shape, channels-last below
        (2, 0, 1, 15, (1, 1)),  # fewer taps than the stride: some phases take none
        ((3, 1), (0, 2), 1, 26, (3, 2)),
    ],
)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_few_channel_conv_equals_stock(stride, padding, dilation, side, kernel, layout):
    """Odd sizes leave the last input pixels outside every window; their gradient must be zero there too."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 3, *kernel, generator=gen, dtype=torch.float64).contiguous(memory_format=layout)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 3, side, side + 3, generator=gen, dtype=torch.float64).contiguous(memory_format=layout)
    out_shape = F.conv2d(x, weight, bias, stride, padding, dilation).shape
    signal = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    want = _value_and_grad(lambda t: F.conv2d(t, weight, bias, stride, padding, dilation), x, signal)
    got = _value_and_grad(lambda t: FewChannelConv2d.apply(t, weight, bias, stride, padding, dilation), x, signal)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("net", ["zf_shaped", "ZFNet"])
def test_fast_ops_leave_results_and_model_unchanged(net):
    """A whole net (LRN, a 3-channel first conv, max-pooling) gives the stock outputs and gradients, and its
    own weights keep their values and layout."""
    torch.manual_seed(0)
    model = (zf_shaped() if net == "zf_shaped" else ZFNet(num_classes=5, width=0.25, input_size=67)).double().eval()
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # the stock and fast passes must see the same input
    before = copy.deepcopy(model.state_dict())
    images = torch.randn(3, 3, 67, 67, dtype=torch.float64)
    signal = torch.randn_like(model(images))
    want = _value_and_grad(model, images, signal)
    fast = FastCPUOps("cpu")
    with fast:
        got = _value_and_grad(lambda x: model(fast.prepare(x)), images, signal)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]) and tensor.is_contiguous(), name


def test_fast_ops_pass_other_devices_through():
    ops = FastCPUOps("meta")
    x = torch.empty(2, 3, 8, 8, device="meta")
    assert ops.prepare(x) is x
    with ops:
        out = F.conv2d(x, torch.empty(4, 3, 3, 3, device="meta"))
    assert out.shape == (2, 4, 6, 6) and not ops._filters


def test_fast_ops_take_keyword_arguments():
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    with FastCPUOps("cpu"):
        conv = F.conv2d(input=x, weight=weight, stride=2)
        lrn = F.local_response_norm(input=conv, size=3)
    torch.testing.assert_close(conv, F.conv2d(x, weight, stride=2))
    torch.testing.assert_close(lrn, F.local_response_norm(conv, 3))


def test_one_thread_runs_cpu_work_on_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread("cpu"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread(torch.device("cpu")):
            raise RuntimeError("restored on errors too")
        assert torch.get_num_threads() == 2
        with one_thread("meta"):  # other devices: the CPU thread count is not theirs to change
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# A fresh process whose largest freed map so far is 8 MiB (so glibc gives back a free heap top of over 16 MiB) holds
# fourteen 4 MiB blocks at once, as a pass holds its maps, frees them (the last first, each joining the top of the
# heap) and prints the heap's size (glibc's `mallinfo2().arena`) before and after. The blocks come from malloc
# itself, as PyTorch's CPU tensors do, with nothing else allocated between them.
_PASS = """
import ctypes, sys, torch
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
torch.empty(8 * 2**20, dtype=torch.uint8)
from lightning_deconv.kernels import FastCPUOps
FastCPUOps(sys.argv[1])
blocks = [libc.malloc(4 * 2**20) for _ in range(14)]
grown = libc.mallinfo2().arena
for block in reversed(blocks):
    libc.free(block)
print(grown, libc.mallinfo2().arena)
"""


def _glibc() -> tuple[int, ...]:
    """glibc's version here, ``()`` for another C library."""
    name, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")) if name == "glibc" else ()


@pytest.mark.skipif(_glibc() < (2, 33), reason="glibc's malloc thresholds, read with mallinfo2 (glibc 2.33)")
def test_cpu_passes_keep_the_heap_they_free():
    """Once CPU ops are made, the 56 MiB a pass frees stay with the process for the next pass; before, glibc gave
    them back to the kernel, to be page-faulted in afresh (ops for the 'meta' device leave malloc as it was)."""

    def heap(device: str) -> tuple[int, int]:
        run = subprocess.run([sys.executable, "-c", _PASS, device], capture_output=True, text=True, check=True)
        grown, after = map(int, run.stdout.split()[-2:])
        return grown, after

    grown, after = heap("meta")
    if after == grown:
        pytest.skip("glibc kept this process's freed heap anyway (its thresholds were already high)")
    grown, after = heap("cpu")
    assert after == grown
