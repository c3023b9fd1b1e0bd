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


# A fresh process: a pass making and freeing two 20 MiB maps, three times; the faults of the third are printed.
_PASSES = """
import resource, sys, torch
from lightning_deconv.kernels import FastCPUOps
FastCPUOps(sys.argv[1])
def one_pass():
    first, second = torch.ones(5 * 2**20), torch.ones(5 * 2**20)
    del first, second
one_pass(); one_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_pass()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds")
def test_cpu_passes_reuse_the_heap_their_predecessors_freed():
    """Once CPU ops are made, glibc keeps the 40 MiB a pass frees for the next; before, it gave it back to the
    kernel, to be page-faulted in afresh by every pass (10,000 faults here; ops for the 'meta' device leave malloc
    as it was)."""

    def faults(device: str) -> int:
        run = subprocess.run([sys.executable, "-c", _PASSES, device], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    unsettled = faults("meta")
    if unsettled < 5000:
        pytest.skip(f"this malloc keeps the freed heap anyway ({unsettled} faults a pass)")
    assert faults("cpu") < 500
