"""Planning a projection: what is derived once from the model, per layer, as one frozen :class:`LayerPlan`.

One forward pass of a seeded random image traces every tracked layer's receptive field
(:func:`~lightning_deconv.geometry.tracing`), keeps its map (its input, where projections start at the
switch), records the activations the model calls (:class:`~lightning_deconv.rules.ActivationSurvey`) and who
fed whom along plain Conv2d/ReLU stretches (:mod:`lightning_deconv.tails`). Then each field is checked on the
model itself (:func:`~lightning_deconv.geometry.exact_on_windows`): where it is exact, projections run on
receptive-field windows and are cropped to the field; elsewhere on whole images, cropped to their support.
What that pass learns depends on the model's structure and the input size only, so it is kept with the model
(:func:`survey`) and reused for as long as the structure stays the same.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_deconv import kernels
from lightning_deconv.geometry import ReceptiveField, exact_on_windows, input_field, tracing
from lightning_deconv.layers import bound_forward, model_device, projection_state, run_until, working_dtype
from lightning_deconv.narrowing import narrowable, recording_chain
from lightning_deconv.rules import ActivationSurvey
from lightning_deconv.selection import check_channels
from lightning_deconv.tails import Tail, find_tail, recording_links

__all__ = ["Crop", "LayerPlan", "Mode", "Rule", "Survey", "plan_layers", "structure", "survey"]

Rule = Literal["deconvnet", "guided", "gradient"]
Mode = Literal["max", "map"]
Crop = Literal["receptive_field", "support", "none"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """How one layer's projections run, derived once from the model.

    Attributes:
        name: the layer's name in ``model.named_modules()`` (without ``torch.compile``'s ``_orig_mod.``).
        module: the layer itself.
        channels: ``[F]`` its tracked channels.
        field: its receptive field where projecting on receptive-field windows is exact, else ``None``.
        windows: the field the projections' windows are cut with (that of the pooling's input for a layer that
            starts at the switch), or ``None``: whole images.
        starts_at_switch: a max-pooling layer projected in ``"max"`` mode from its switches: unpooling sends the
            seed to its switch and nowhere else, so the projection starts there, in the pooling's input, where
            that pays for the switches the maxima pass must then keep (see :func:`_starts_at_switch`); the
            others run through the pooling.
        tail: the plain Conv2d/ReLU stretch the deconvnet goes down without its forward pass, or ``None``.
        crop: how crops are cut: to the exact ``"receptive_field"``, to the projection's ``"support"``, or
            not at all (``"none"``).
    """

    name: str
    module: nn.Module
    channels: Tensor
    field: ReceptiveField | None
    windows: ReceptiveField | None
    starts_at_switch: bool
    tail: Tail | None
    crop: Crop


def structure(model: nn.Module) -> tuple:
    """What a plan depends on: the modules' names and types and the parameters' shapes."""
    return tuple((name, type(m).__name__) for name, m in model.named_modules()) + tuple(
        (name, tuple(p.shape)) for name, p in model.named_parameters()
    )


def plan_layers(
    model: nn.Module,
    modules: dict[str, nn.Module],
    channels: dict[str, Tensor],
    input_size: tuple[int, ...],
    *,
    rule: Rule,
    mode: Mode,
    crop: Crop,
    windows: bool,
) -> tuple[dict[str, LayerPlan], list[str], Survey]:
    """The plan of every layer, the activations the model calls on the way to them, and the model's
    :class:`Survey` they were made from.

    Warns once for the layers projected on whole images (their traced field is not exact) and once for smooth
    activations the rule does not cover.

    Raises:
        ValueError: a layer whose map is not 4-D, out-of-range channels, an input size the model does not accept.
    """
    # Max-pooling layers may start at their switches; which do is decided from the survey (_starts_at_switch).
    pools = {name: mode == "max" and isinstance(module, nn.MaxPool2d) for name, module in modules.items()}
    tails = {
        name: find_tail(model, name, pools[name]) if rule == "deconvnet" and mode == "max" else None for name in modules
    }
    found = survey(model, modules, pools, tails, input_size)
    for name in modules:
        check_channels(name, channels[name], found.channels[name])
    activations = _report_activations(found.rectifiers, found.smooth, rule)
    starts = {name: pools[name] and _starts_at_switch(name, modules[name], found, input_size) for name in modules}
    exact = {name: found.exact_at_input[name] if starts[name] else found.exact[name] for name in modules}
    inexact = [name for name in modules if not exact[name]]
    if inexact:
        warnings.warn(
            f"Projecting {', '.join(map(repr, inexact))} on whole images and cropping to the projections' "
            "support: the receptive field traced through the model's modules is not exact there (a "
            "functional or unknown resampling on the path). Results stay exact; only slower.",
            stacklevel=3,
        )
    plans = {}
    for name in modules:
        traced = found.fields[name]
        used = input_field(traced, modules[name]) if traced is not None and starts[name] else traced
        plans[name] = LayerPlan(
            name=name,
            module=modules[name],
            channels=channels[name],
            field=traced if exact[name] else None,
            windows=used if exact[name] and windows else None,
            starts_at_switch=starts[name],
            tail=tails[name] if found.chains[name] else None,
            crop="support" if crop == "receptive_field" and not exact[name] else crop,
        )
    return plans, activations, found


def _starts_at_switch(name: str, pool: nn.Module, found: Survey, input_size: tuple[int, ...]) -> bool:
    """Whether a max-pooling layer's projections start at their switches rather than run through the pooling.

    Starting at the switch projects on the smaller window of the pooling input's field, but the maxima pass must
    then copy the pooling's input (for the switches), every image's. Where a tail goes down from the switch
    without a forward pass, always. Elsewhere only where a row's window, run through the pooling, would grow by
    more bytes of maps than the pooling's input holds per image: a deep pooling's small maps (ZFNet's pool5 under
    the guided rule) start at the switch, a first one's large maps (ZFNet's pool1: 4.6 MB an image against a
    window 11 px wide instead of 7) run through the pooling.
    """
    if found.chains[name]:
        return True
    field = found.fields[name]
    if field is None or not found.exact[name]:
        return True  # through the pooling would be whole images
    if not found.exact_at_input[name]:
        return False
    height, width = input_size[1:]
    inner = input_field(field, pool)
    grown = min(field.size[0], height) * min(field.size[1], width) - min(inner.size[0], height) * min(
        inner.size[1], width
    )
    return found.input_bytes[name] <= (found.kept_bytes + found.grad_bytes) * grown // (height * width)


@dataclass(frozen=True)
class Survey:
    """What one forward pass of a seeded random image, and the window passes it implies, tells of a model.

    It depends on the model's structure and the input size, not on the weights, so it is kept with the model
    (weakly: it holds no module) and made again only when the structure changes (see :func:`survey`).

    Attributes:
        structure: the model's :func:`structure` when surveyed.
        fields: per layer, the traced receptive field of its output (``None``: not traceable).
        exact: per layer, whether projecting on its receptive-field windows reproduces the whole-image pass.
        exact_at_input: per layer that may start at its switch, the same for its input's field (projections
            that start at the switch); ``False`` for the others.
        input_bytes: per layer that may start at its switch, the bytes of its input map per image (what the
            maxima pass copies for the switches); 0 for the others.
        chains: per layer, whether the model runs the layer's plain tail as one chain (``False`` if none).
        channels: per layer, the channels of its map.
        rectifiers, smooth: the activations the model calls on the way (display names).
        pass_bytes: per image, the most bytes of maps alive at once at any module on the way to the deepest
            layer: its input and its output (one map where it works in place).
        kept_bytes: per image, the bytes of every map the modules on the way make (what a pass that keeps them
            for its backward holds).
        grad_bytes: per image, the most bytes of gradients alive at once in a backward pass on the way: a
            module's output's and its input's (two maps where it works in place, which its backward does not).
        narrowable: the convolution the maxima pass may narrow to the tracked channels of the layers it feeds
            (:mod:`lightning_deconv.narrowing`), by name, with those layers' names; ``None`` if none.
    """

    structure: tuple
    fields: dict[str, ReceptiveField | None]
    exact: dict[str, bool]
    exact_at_input: dict[str, bool]
    input_bytes: dict[str, int]
    chains: dict[str, bool]
    channels: dict[str, int]
    rectifiers: frozenset[str]
    smooth: frozenset[str]
    pass_bytes: int
    kept_bytes: int
    grad_bytes: int
    narrowable: tuple[str, tuple[str, ...]] | None


# Surveys by model, then by what they were asked; a model's entry goes with the model.
_SURVEYS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Survey]] = weakref.WeakKeyDictionary()
_SURVEYS_PER_MODEL = 8


def survey(
    model: nn.Module,
    modules: dict[str, nn.Module],
    starts: dict[str, bool],
    tails: dict[str, Tail | None],
    input_size: tuple[int, ...],
) -> Survey:
    """The :class:`Survey` of ``model`` for these layers at ``input_size``: the one made before for the same
    question while the model's structure is unchanged (so repeated :func:`~lightning_deconv.engine.deconvolve`
    calls do not trace again), else a new one."""
    reference = next(model.parameters(), torch.empty(0))
    key = (
        tuple(input_size),
        str(reference.device),
        working_dtype(model),
        tuple((name, starts[name], tails[name] is not None) for name in modules),
    )
    shape = structure(model)
    kept = _SURVEYS.setdefault(model, {})
    found = kept.pop(key, None)
    if found is None or found.structure != shape:
        found = _survey(model, modules, starts, tails, input_size, shape)
    kept[key] = found  # the most recent last
    while len(kept) > _SURVEYS_PER_MODEL:
        del kept[next(iter(kept))]
    return found


def _survey(
    model: nn.Module,
    modules: dict[str, nn.Module],
    starts: dict[str, bool],
    tails: dict[str, Tail | None],
    input_size: tuple[int, ...],
    shape: tuple,
) -> Survey:
    consumers = {name: modules[name] if starts[name] else None for name in modules}
    linked = [m for name, t in tails.items() if t for m in (t.entry, *t.modules, consumers[name]) if m is not None]
    image = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    image = image.to(model_device(model), working_dtype(model))
    forward = bound_forward(model, float32=True)
    fast = kernels.FastCPUOps(image.device)
    image = fast.prepare(image)
    activations = ActivationSurvey()
    try:
        # One image and a few windows: small maps, run on one thread (see kernels.one_thread).
        with projection_state(model), torch.no_grad(), kernels.one_thread(image.device), fast, activations:
            with (
                tracing(model, image) as tracer,
                recording_links(linked) as links,
                _map_bytes(model) as sizes,
                recording_chain(model) as chain,
            ):

                def capture(name: str, output: Tensor, layer_input: Tensor) -> tuple:
                    if starts[name] and (not isinstance(layer_input, Tensor) or layer_input.dim() != 4):
                        raise ValueError(f"Layer {name!r} takes {type(layer_input).__name__}, not a 4-D feature map.")
                    # Copies: later in-place ops must not reach them.
                    inputs = layer_input.detach().clone() if starts[name] else None
                    return tracer.field_of(output), output.detach().clone(), inputs

                whole = run_until(forward, image, modules, capture)
            traced = {name: field for name, (field, _, _) in whole.items()}
            exact, exact_at_input, input_bytes = {}, dict.fromkeys(modules, False), dict.fromkeys(modules, 0)
            for name, (field, output, inputs) in whole.items():
                layer = (name, modules[name])
                exact[name] = field is not None and exact_on_windows(
                    forward, image, layer, field, output, False, fast.prepare
                )
                if inputs is not None:
                    used = input_field(field, modules[name]) if field is not None else None
                    exact_at_input[name] = used is not None and exact_on_windows(
                        forward, image, layer, used, inputs, True, fast.prepare
                    )
                    input_bytes[name] = inputs[0].numel() * inputs.element_size()
    except ValueError as error:
        raise ValueError(f"{error} (input size {tuple(input_size)})") from error
    return Survey(
        structure=shape,
        fields=traced,
        exact=exact,
        exact_at_input=exact_at_input,
        input_bytes=input_bytes,
        chains={name: tail is not None and tail.ran_as_chain(links, consumers[name]) for name, tail in tails.items()},
        channels={name: int(output.shape[1]) for name, (_, output, _) in whole.items()},
        rectifiers=frozenset(activations.rectifiers),
        smooth=frozenset(activations.smooth),
        pass_bytes=sizes["at_once"],
        kept_bytes=sizes["kept"],
        grad_bytes=sizes["grads"],
        narrowable=narrowable(model, chain, modules),
    )


@contextlib.contextmanager
def _map_bytes(model: nn.Module) -> Iterator[dict[str, int]]:
    """While active, ``{"at_once": bytes, "kept": bytes, "grads": bytes}`` of the leaf modules' maps so far: the
    most alive at once at one module (its first input and its output, one map where it works in place), all the new
    maps, and the most a module's backward holds at once (its output's and its input's gradients)."""
    sizes = {"at_once": 0, "kept": 0, "grads": 0}
    made: set[int] = set()

    def record(module: nn.Module, inputs: tuple, output: object) -> None:
        if not isinstance(output, Tensor):
            return
        size = output.numel() * output.element_size()
        if output.untyped_storage().data_ptr() not in made:
            made.add(output.untyped_storage().data_ptr())
            sizes["kept"] += size
        first = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
        first_size = 0 if first is None else first.numel() * first.element_size()
        sizes["grads"] = max(sizes["grads"], size + first_size)
        if first is not None and first.untyped_storage().data_ptr() != output.untyped_storage().data_ptr():
            size += first_size
        sizes["at_once"] = max(sizes["at_once"], size)

    handles = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        yield sizes
    finally:
        for handle in handles:
            handle.remove()


def _report_activations(rectifiers: frozenset[str], smooth: frozenset[str], rule: str) -> list[str]:
    if smooth and rule != "gradient":
        warnings.warn(
            f"The model calls {', '.join(sorted(smooth))} on the way to the tracked layers. The {rule} rule "
            "is defined for ReLU-like activations (ReLU, LeakyReLU, PReLU, ReLU6); the signal passes the "
            "others with their ordinary gradient.",
            stacklevel=4,
        )
    others = sorted(rectifiers - {"ReLU"})
    if others and rule != "gradient":
        log.info("%s: projected with the %s rule's analogue (see lightning_deconv.rules).", others, rule)
    return sorted(rectifiers | smooth)
