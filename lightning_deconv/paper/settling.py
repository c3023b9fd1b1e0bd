"""The settling panel beside Figure 4: each layer's linear CKA to its last firing, against the epoch.

Zeiler & Fergus (2014, Sec. 4.2) say lower layers converge within a few epochs and upper layers only after
40-50. This draws the measured version from the files a run saved (the Gram matrix of each layer's
activations on the probe at each firing), no model needed: a layer has settled once its curve stays near 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_deconv.analysis.settling import settling_curves
from lightning_deconv.paper.plotting import figure_parser, pyplot, save
from lightning_deconv.record import RecordError, find_firings, read_firings

__all__ = ["main", "settled_at", "settling_figure", "settling_from_run"]


def settling_from_run(run_dir: str | Path, name: str | None = None) -> dict[str, dict[int, float]]:
    """Per layer, ``{epoch: CKA to the last firing}`` from a run's ``deconv/<name>/epoch_XXX.pt`` files
    (unreadable ones skipped with a warning).

    Raises:
        RecordError: no readable firings under ``run_dir``, or the run was trained with ``measures=False`` (no
            Gram matrices saved).
    """
    grams: dict[int, dict[str, torch.Tensor]] = {}
    for firing in read_firings(find_firings(run_dir, name)):
        saved = {layer: data.get("gram") for layer, data in firing["layers"].items()}
        grams[firing["epoch"]] = {layer: g for layer, g in saved.items() if g is not None}
    if not any(grams.values()):
        raise RecordError(run_dir, "its firings hold no Gram matrices", "Train with DeconvCallback(measures=True)")
    return settling_curves(grams)


def settled_at(curve: dict[int, float], threshold: float = 0.9) -> int | None:
    """The first epoch from which the curve stays at or above ``threshold`` (``None`` if it never does)."""
    epochs = sorted(curve)
    for index, epoch in enumerate(epochs):
        if all(curve[e] >= threshold for e in epochs[index:]):
            return epoch
    return None


def settling_figure(
    run_dir: str | Path, output: str | Path, threshold: float = 0.9, dpi: int = 150, name: str | None = None
) -> Path:
    """Draw CKA to the last firing against the epoch, one line per layer, and save it to ``output``."""
    plt = pyplot()

    curves = settling_from_run(run_dir, name)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for index, (layer, curve) in enumerate(curves.items()):
        epochs = sorted(curve)
        when = settled_at(curve, threshold)
        label = f"layer {index + 1} ({layer}): settled at epoch {when}" if when else f"layer {index + 1} ({layer})"
        ax.plot(epochs, [curve[e] for e in epochs], marker="o", label=label)
    ax.axhline(threshold, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("linear CKA to the last firing")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
    ax.set_title("When each layer settles (activations on the probe)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save(fig, output, dpi)


def main(argv: Sequence[str] | None = None) -> None:
    """``lightning-deconv settling RUN_DIR -o settling.png``"""
    parser = figure_parser(
        "settling",
        "Plot each layer's linear CKA to its last firing against the epoch, from a run's files.",
    )
    parser.add_argument("--threshold", type=float, default=0.9, help="CKA that counts as settled")
    args = parser.parse_args(argv)
    path = settling_figure(args.run_dir, args.output, args.threshold, args.dpi, args.name)
    for layer, curve in settling_from_run(args.run_dir, args.name).items():
        when = settled_at(curve, args.threshold)
        print(f"{layer}: settled (CKA to the last firing >= {args.threshold}) at epoch {when}")
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
