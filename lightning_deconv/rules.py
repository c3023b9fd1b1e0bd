r"""Projection rules: what the backward pass does at each ReLU-like activation.

Zeiler & Fergus's deconvnet passes the signal :math:`R` coming down through a ReLU :math:`y = \max(x, 0)`
by rectifying the signal itself; guided backprop (Springenberg et al. 2014) also keeps the forward mask;
the gradient (Simonyan et al. 2013) keeps only the mask:

.. math::

    \text{deconvnet:}\quad R_x = \max(R_y, 0) \qquad
    \text{guided:}\quad R_x = \max(R_y, 0)\,[x > 0] \qquad
    \text{gradient:}\quad R_x = R_y\,[x > 0]

The other piecewise-linear rectifiers get the natural analogue: the deconvnet applies the activation's own
rectifier to the signal, guided backprop multiplies that by the local slope :math:`f'(x)`:

* ``LeakyReLU(a)`` and ``PReLU(a)``: deconvnet :math:`R_x = \mathrm{leaky}_a(R_y)`, guided
  :math:`\mathrm{leaky}_a(R_y)\, f'(x)` with :math:`f'(x) \in \{1, a\}`.
* ``ReLU6``: deconvnet :math:`\max(R_y, 0)` (the cap at 6 bounds activations, not signals), guided
  :math:`\max(R_y, 0)\,[0 < x < 6]`.

Smooth activations (SiLU, GELU, ELU, Mish, ...) have no such rule; they are passed with their ordinary
gradient, and :class:`ActivationSurvey` finds them so that the caller can say so. The rule is swapped in with a
``TorchFunctionMode`` for the projection pass only: it catches module and functional calls alike
(``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``, ``relu_``, ``nn.LeakyReLU``, ``F.leaky_relu``,
``nn.PReLU``, ``nn.ReLU6``, ...), in place or not, and never touches the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["RULES", "ActivationSurvey", "relu_rule"]

RULES: tuple[str, ...] = ("deconvnet", "guided", "gradient")

_RELUS = {F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_}
_LEAKY = {F.leaky_relu, *([torch._C._nn.leaky_relu_] if hasattr(torch._C._nn, "leaky_relu_") else [])}
_PRELU = {F.prelu, torch.prelu}
_CAPPED = {F.relu6, F.hardtanh}  # ReLU6 is `F.hardtanh(x, 0, 6)`; other hardtanh ranges are not rectifiers
_SMOOTH = {
    F.silu: "SiLU",
    F.gelu: "GELU",
    F.elu: "ELU",
    F.celu: "CELU",
    F.selu: "SELU",
    F.mish: "Mish",
    F.softplus: "Softplus",
    F.hardswish: "Hardswish",
    F.hardsigmoid: "Hardsigmoid",
    torch.sigmoid: "Sigmoid",
    torch.tanh: "Tanh",
    F.tanh: "Tanh",
    F.sigmoid: "Sigmoid",
}


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _rectifier(func: Callable, args: tuple, kwargs: dict) -> tuple[str, Any, bool] | None:
    """``(kind, parameter, inplace)`` of a ReLU-like call, or ``None`` for any other function."""
    inplace = bool(_arg(args, kwargs, 1, "inplace", False)) if func in (F.relu,) else False
    if func in _RELUS:
        return "relu", None, inplace or func in (torch.relu_, torch.Tensor.relu_)
    if func in _LEAKY:
        inplace = func is not F.leaky_relu or bool(_arg(args, kwargs, 2, "inplace", False))
        return "leaky", float(_arg(args, kwargs, 1, "negative_slope", 0.01)), inplace
    if func in _PRELU:
        return "prelu", _arg(args, kwargs, 1, "weight", None), False
    if func is F.relu6:
        return "relu6", 6.0, bool(_arg(args, kwargs, 1, "inplace", False))
    if func is F.hardtanh and float(_arg(args, kwargs, 1, "min_val", -1.0)) == 0.0:
        return "relu6", float(_arg(args, kwargs, 2, "max_val", 1.0)), bool(_arg(args, kwargs, 3, "inplace", False))
    return None


def _leaky(signal: Tensor, slope: Tensor | float) -> Tensor:
    return torch.where(signal > 0, signal, signal * slope)


def _prelu_slope(weight: Tensor, x: Tensor) -> Tensor:
    """PReLU's weight shaped to broadcast over ``x`` (one slope, or one per channel of dim 1)."""
    return weight.reshape(-1, *([1] * (x.dim() - 2))) if weight.numel() > 1 else weight.reshape(())


class _RuleActivation(torch.autograd.Function):
    """A ReLU-like activation: the stock forward; the deconvnet or guided-backprop rule backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kind: str, parameter: Any, guided: bool, inplace: bool) -> Tensor:
        slope = parameter if kind != "prelu" else _prelu_slope(parameter.detach(), x)
        local = None
        if guided:  # f'(x), taken before an in-place forward overwrites x
            if kind == "relu6":
                local = ((x > 0) & (x < slope)).to(x.dtype)
            else:
                local = torch.where(x > 0, torch.ones_like(x), torch.zeros_like(x) + (0 if kind == "relu" else slope))
        if kind == "relu":
            out = x.clamp_(min=0) if inplace else x.clamp(min=0)
        elif kind == "relu6":
            out = x.clamp_(0, slope) if inplace else x.clamp(0, slope)
        else:
            out = _leaky(x, slope)
            if inplace:
                out = x.copy_(out)
        if inplace:
            ctx.mark_dirty(x)
        ctx.kind, ctx.slope = kind, (slope if kind in ("leaky", "prelu") else 0.0)
        ctx.save_for_backward(local)
        return out

    @staticmethod
    def backward(ctx: Any, signal: Tensor) -> tuple[Tensor | None, ...]:
        (local,) = ctx.saved_tensors
        rectified = signal.clamp(min=0) if ctx.kind in ("relu", "relu6") else _leaky(signal, ctx.slope)
        if local is not None:
            rectified = rectified * local
        return rectified, None, None, None, None


class _Rule(TorchFunctionMode):
    """Routes every ReLU-like call made while active through ``_RuleActivation``."""

    def __init__(self, guided: bool) -> None:
        super().__init__()
        self.guided = guided

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = _rectifier(func, args, kwargs)
        if found is None:
            return func(*args, **kwargs)
        kind, parameter, inplace = found
        x = args[0] if args else kwargs["input"]
        return _RuleActivation.apply(x, kind, parameter, self.guided, inplace)


def relu_rule(rule: str) -> contextlib.AbstractContextManager:
    """A context in which ReLU-like activations project with ``rule`` (the gradient needs no swap)."""
    return contextlib.nullcontext() if rule == "gradient" else _Rule(guided=rule == "guided")


_NAMES = {"relu": "ReLU", "leaky": "LeakyReLU", "prelu": "PReLU", "relu6": "ReLU6"}


class ActivationSurvey(TorchFunctionMode):
    """While active, records which activations the model calls: ``rectifiers`` (handled by the rules) and
    ``smooth`` (passed with their plain gradient), as display names."""

    def __init__(self) -> None:
        super().__init__()
        self.rectifiers: set[str] = set()
        self.smooth: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = _rectifier(func, args, kwargs)
        if found is not None:
            self.rectifiers.add(_NAMES[found[0]])
        elif func in _SMOOTH:
            self.smooth.add(_SMOOTH[func])
        elif func is F.hardtanh:
            self.smooth.add("Hardtanh")
        return func(*args, **kwargs)
