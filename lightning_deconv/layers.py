"""Finding layers by name and running a model only as far as the layers it needs.

Every other module works on "layers": modules of the model, named as in ``model.named_modules()``, whose
output is the 4-D activation ``[N, C, H, W]`` being studied. ``run_until`` runs the forward pass with a
forward hook on each requested layer and stops it (by raising from the last hook) as soon as all of them
have produced their output, so nothing past the deepest requested layer is computed.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "bound_forward",
    "check_images",
    "eval_mode",
    "layer_name",
    "model_device",
    "named_layers",
    "projection_state",
    "resolve_layers",
    "run_until",
    "uncompiled",
    "working_dtype",
]

_COMPILED = "_orig_mod"  # where torch.compile's OptimizedModule keeps the module it wraps


class _StopForward(Exception):
    """Raised by the last layer hook to end the forward pass early."""


def uncompiled(model: nn.Module) -> nn.Module:
    """The module that a model compiled with ``torch.compile`` wraps (the model itself if it is not compiled)."""
    return getattr(model, _COMPILED, model) if type(model).__name__ == "OptimizedModule" else model


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``model.named_modules()`` as the user wrote the model: modules compiled with ``torch.compile``
    (anywhere in it) appear under their own names, without the ``_orig_mod.`` their wrapper adds."""
    layers: dict[str, nn.Module] = {}
    for name, module in uncompiled(model).named_modules():
        if type(module).__name__ == "OptimizedModule":
            continue  # its wrapped module comes next, under the same name once cleaned
        parts = [part for part in name.split(".") if part != _COMPILED]
        layers[".".join(parts)] = module
    return layers


def layer_name(model: nn.Module, layer: str | nn.Module) -> str:
    """The name of ``layer`` (a name or a submodule) in ``model``, as :func:`named_layers` gives it.

    Raises:
        ValueError: if the name is unknown (the message lists the nearest valid names) or the module is not
            part of ``model``.
    """
    names = named_layers(model)
    if isinstance(layer, nn.Module):
        for name, module in names.items():
            if module is uncompiled(layer):
                return name
        raise ValueError(f"The module {type(layer).__name__} is not a submodule of {type(model).__name__}.")
    if not isinstance(layer, str):
        raise TypeError(f"`layer` must be a module name (str) or an nn.Module, got {type(layer).__name__}.")
    if layer in names:
        return layer
    valid = [n for n in names if n]
    nearest = difflib.get_close_matches(layer, valid, n=5, cutoff=0.4) or valid[:10]
    raise ValueError(
        f"Unknown layer {layer!r} in {type(model).__name__}. Nearest valid names: {', '.join(nearest)}. "
        "Layer names are those of `model.named_modules()`."
    )


def resolve_layers(model: nn.Module, layers: Iterable[str | nn.Module]) -> dict[str, nn.Module]:
    """Map each requested layer (name or module) to ``{name: module}``, validating every name."""
    modules = named_layers(model)
    resolved: dict[str, nn.Module] = {}
    for layer in layers:
        name = layer_name(model, layer)
        resolved[name] = modules[name]
    return resolved


def run_until(
    model: nn.Module | Callable[[Tensor], Any],
    images: Tensor,
    layers: Mapping[str, nn.Module],
    on_output: Callable[[str, Tensor, Any], Any],
    at_input: bool = False,
    spatial: bool = True,
) -> dict[str, Any]:
    """Run ``model(images)`` until every layer in ``layers`` has produced its output, then stop.

    ``on_output(name, activation, layer_input)`` is called inside each layer's forward hook, at the moment
    the layer runs, with the layer's output and its first input, and its result is returned under ``name``.
    Reducing there (rather than keeping the activation) matters: a later in-place ReLU would otherwise
    overwrite an earlier layer's output. If a module runs several times in one forward pass, its first call
    counts. With ``at_input``, the hook runs just before each layer instead and ``activation`` is the
    layer's first input (``layer_input`` is ``None``); the deepest layer itself never runs. With
    ``spatial=False`` a layer's output may be any tensor (e.g. a fully connected layer's ``[N, F]``).

    Raises:
        ValueError: a layer's output is not a tensor (with ``spatial``: not a 4-D one), or a layer never ran
            in the forward pass.
    """
    results: dict[str, Any] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any = None) -> None:
            if name in results:
                return
            activation, layer_input = (inputs[0], None) if at_input else (output, inputs[0] if inputs else None)
            if not isinstance(activation, Tensor) or (spatial and activation.dim() != 4):
                shape = tuple(activation.shape) if isinstance(activation, Tensor) else type(activation).__name__
                raise ValueError(
                    f"Layer {name!r} ({type(module).__name__}) {'takes' if at_input else 'outputs'} {shape}, "
                    "not a 4-D [N, C, H, W] feature map. Choose a convolutional stage (a conv, ReLU or pooling "
                    "module)."
                )
            results[name] = on_output(name, activation, layer_input)
            if len(results) == len(layers):
                raise _StopForward

        return hook

    register = "register_forward_pre_hook" if at_input else "register_forward_hook"
    handles = [getattr(module, register)(hook_for(name)) for name, module in layers.items()]
    try:
        model(images)
    except _StopForward:
        pass
    except RuntimeError as error:
        raise ValueError(
            f"The model failed on input of shape {tuple(images.shape)}: {error}. Check that the images "
            "have the channel count and a size the model accepts."
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in results]
    if missing:
        raise ValueError(f"Layers {missing} never ran in the model's forward pass; pick layers it uses.")
    return results


def first_conv_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first ``nn.Conv2d`` registered in ``model`` (``None`` if it has none)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def check_images(model: nn.Module, images: Tensor) -> None:
    """Fail clearly when ``images`` cannot be a batch of input images for ``model``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"`images` must be a Tensor [N, C, H, W], got {type(images).__name__}.")
    if images.dim() != 4:
        raise ValueError(f"`images` must be 4-D [N, C, H, W], got shape {tuple(images.shape)}.")
    if images.shape[0] == 0:
        raise ValueError("`images` is empty: give at least one probe image.")
    if not torch.is_floating_point(images):
        raise TypeError(f"`images` must be floating point (normalised pixels), got {images.dtype}.")
    expected = first_conv_in_channels(model)
    if expected is not None and images.shape[1] != expected:
        raise ValueError(
            f"`images` have {images.shape[1]} channels but the model's first convolution expects "
            f"{expected}. Pass images shaped [N, {expected}, H, W]."
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, then give every submodule back its own train/eval flag.

    Eval mode keeps monitoring side-effect free: BatchNorm uses (and does not update) its running
    statistics and dropout draws no random numbers.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def bound_forward(
    model: nn.Module, state: Mapping[str, Tensor] | None = None, float32: bool = False
) -> Callable[[Tensor], Any]:
    """``model``'s forward, optionally with some parameters/buffers replaced and low precision lifted.

    Args:
        state: tensors to use instead of the model's own, by name (e.g. rank 0's BatchNorm statistics under
            DDP); the model itself is not modified.
        float32: run a half or bfloat16 model with float32 copies of its floating tensors.
    """
    replaced = dict(state or {})
    if float32:
        own = {**dict(model.named_parameters()), **dict(model.named_buffers()), **replaced}
        replaced.update(
            {name: t.detach().float() for name, t in own.items() if t.dtype in (torch.float16, torch.bfloat16)}
        )
    if not replaced:
        return model
    return lambda x: functional_call(model, replaced, (x,))


def working_dtype(model: nn.Module) -> torch.dtype:
    """The dtype projections run in: float64 for a float64 model, else float32."""
    param = next(model.parameters(), None)
    return torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


@contextlib.contextmanager
def projection_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on (even under ``no_grad``/``inference_mode``), no autocast, and compiled code run
    eagerly (so that hooks and the rule see every op), then everything restored."""
    with (
        eval_mode(model),
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(model_device(model).type, enabled=False),
        torch.compiler.set_stance("force_eager"),
    ):
        yield
