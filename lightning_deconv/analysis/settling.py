r"""Measuring what Figure 4 shows: when each layer settles, which features are dead, how much features move.

Zeiler & Fergus (2014, Sec. 4.2) read off Figure 4 that lower layers converge within a few epochs and upper
layers only after 40-50. These measures put numbers on it, from what a firing already computes:

* **Layer settling**: the linear CKA (Kornblith et al., ICML 2019) between a layer's activations on the
  probe at two firings. With :math:`K = X X^\top` and :math:`L = Y Y^\top` the Gram matrices of the flattened
  activations of the same :math:`N` inputs and :math:`H = I - \tfrac{1}{N} 1 1^\top`,

  .. math::

      \mathrm{CKA}(X, Y) = \frac{\langle HKH, HLH \rangle_F}{\lVert HKH \rVert_F \, \lVert HLH \rVert_F}

  1 for the same representation up to rotation and isotropic scaling. Only the :math:`N \times N` Gram
  matrix needs keeping per firing, so CKA to any later firing can be drawn at the end.
* **Dead features** (the paper's Fig. 6 diagnosis): the share of a layer's channels whose maximum over the
  probe is at most 0: they never fire, and project to nothing.
* **Feature drift**: between successive firings, the mean :math:`1 - \cos` of each tracked feature's
  projection and the share of features whose strongest probe image changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["cka_from_grams", "dead_share", "drift", "feature_marks", "gram", "linear_cka", "settling_curves"]


def gram(activations: Tensor) -> Tensor:
    """``[N, N]`` float64 Gram matrix of ``activations [N, ...]`` flattened per input."""
    flat = activations.detach().flatten(1).double()
    return flat @ flat.T


def _centred(k: Tensor) -> Tensor:
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def cka_from_grams(k: Tensor, l: Tensor) -> float:  # noqa: E741 - the paper's names
    """Linear CKA of two representations of the same inputs, given their Gram matrices ``[N, N]``.

    Returns NaN when either representation is constant over the inputs (CKA is undefined there).
    """
    if k.shape != l.shape or k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"Need two square Gram matrices of the same N inputs, got {tuple(k.shape)}, {tuple(l.shape)}.")
    kc, lc = _centred(k.double()), _centred(l.double())
    denominator = kc.norm() * lc.norm()
    return float((kc * lc).sum() / denominator) if denominator > 0 else float("nan")


def linear_cka(a: Tensor, b: Tensor) -> float:
    """Linear CKA between two representations ``a [N, ...]`` and ``b [N, ...]`` of the same ``N`` inputs.

    Example::

        >>> x = torch.randn(20, 8, 3, 3)
        >>> round(linear_cka(x, 2 * x), 6), linear_cka(x, torch.randn(20, 5)) < 1
        (1.0, True)

    Raises:
        ValueError: ``a`` and ``b`` hold different numbers of inputs.
    """
    if len(a) != len(b):
        raise ValueError(f"CKA compares representations of the same inputs: got {len(a)} and {len(b)} of them.")
    return cka_from_grams(gram(a), gram(b))


def dead_share(peaks: Tensor) -> float:
    """The share of channels whose maximum over the probe (``peaks [C]``) is at most 0."""
    return float((peaks <= 0).double().mean())


def feature_marks(value: Tensor, projections: Tensor) -> list[str | None]:
    """Per tracked feature, how a grid marks it: ``"NaN"`` (non-finite activation or projection: diverged
    weights), ``"dead"`` (its strongest activation on the probe is at most 0: nothing to project) or ``None``."""
    finite = torch.isfinite(value) & torch.isfinite(projections).flatten(1).all(dim=1)
    return [
        "NaN" if not ok else "dead" if v <= 0 else None for ok, v in zip(finite.tolist(), value.tolist(), strict=True)
    ]


def drift(before: Tensor, after: Tensor, sources_before: Tensor, sources_after: Tensor) -> tuple[float, float]:
    """``(mean 1 - cosine, share of changed strongest images)`` of the same features at two firings.

    ``before``/``after`` are ``[K, ...]`` projections (or crops of one size) of the ``K`` tracked features; a
    feature whose projection is zero at either firing counts as fully changed (cosine 0).
    """
    x, y = before.flatten(1).double(), after.flatten(1).double()
    cosine = torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-30)
    return float((1 - cosine).mean()), float((sources_before != sources_after).double().mean())


def settling_curves(grams: Mapping[int, Mapping[str, Tensor]], to: int | None = None) -> dict[str, dict[int, float]]:
    """Per layer, CKA of every firing's representation to that of firing ``to`` (default: the last).

    ``grams[epoch][layer]`` is the layer's Gram matrix on the probe at that firing.
    """
    epochs: Sequence[int] = sorted(grams)
    if not epochs:
        return {}
    last = grams[epochs[-1] if to is None else to]
    return {
        layer: {e: cka_from_grams(grams[e][layer], reference) for e in epochs if layer in grams[e]}
        for layer, reference in last.items()
    }
