"""Shared fixtures (probe images, a ZFNet-shaped net); the helpers they use live in helpers.py."""

from __future__ import annotations

import pytest
import torch
from helpers import zf_shaped
from torch import nn


@pytest.fixture
def zf_net() -> nn.Sequential:
    torch.manual_seed(0)
    return zf_shaped().double()


@pytest.fixture
def probe() -> torch.Tensor:
    return torch.randn(5, 3, 97, 91, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# Scripts run in subprocesses by the DDP tests (Lightning relaunches them): never import them here.
collect_ignore = ["ddp_fit.py", "ddp_cases.py", "kill_fit.py"]
