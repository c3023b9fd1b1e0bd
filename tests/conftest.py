"""Shared fixtures: tiny nets shaped like the paper's, and probe images."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def zf_shaped(inplace: bool = True, width: int = 8) -> nn.Sequential:
    """ZFNet's stem in miniature: 7x7 stride-2 conv, overlapping 3x3 stride-2 pooling, 5x5 stride-2 conv,
    three 3x3 convs, padding and odd sizes; in-place ReLUs by default."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 7, stride=2, padding=1),  # 0
        nn.ReLU(inplace=inplace),  # 1
        nn.MaxPool2d(3, stride=2, padding=1),  # 2
        nn.Conv2d(w, 2 * w, 5, stride=2),  # 3
        nn.ReLU(inplace=inplace),  # 4
        nn.MaxPool2d(3, stride=2, ceil_mode=True),  # 5
        nn.Conv2d(2 * w, 3 * w, 3, padding=1),  # 6
        nn.ReLU(inplace=inplace),  # 7
        nn.Conv2d(3 * w, 3 * w, 3, padding=1),  # 8
        nn.ReLU(inplace=inplace),  # 9
        nn.Conv2d(3 * w, 2 * w, 3, padding=1),  # 10
        nn.ReLU(inplace=inplace),  # 11
        nn.MaxPool2d(3, stride=2),  # 12
    )


@pytest.fixture
def zf_net() -> nn.Sequential:
    torch.manual_seed(0)
    return zf_shaped().double()


@pytest.fixture
def probe() -> torch.Tensor:
    return torch.randn(5, 3, 97, 91, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# Scripts run in subprocesses by the DDP tests (Lightning relaunches them): never import them here.
collect_ignore = ["ddp_fit.py", "ddp_cases.py", "kill_fit.py"]
