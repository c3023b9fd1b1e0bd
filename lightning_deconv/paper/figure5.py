"""Figure 5 of Zeiler & Fergus (2014): invariance to vertical translation, scale and rotation, from a run.

One row per transformation. Columns: an example image transformed by a few of the amounts; the Euclidean
distance between the feature vectors of the original and the transformed images at layer 1 and at layer 7
(the paper's second and third columns); the probability of the class (here the top class of the
untransformed image: the probe stores no labels). One line per image.

Model and probe images come from the run's checkpoint (see :func:`~lightning_deconv.paper.runs.load_run`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_deconv.analysis.invariance import TRANSFORMS, invariance, transform_images
from lightning_deconv.paper.plotting import figure_parser, pyplot, save
from lightning_deconv.paper.runs import check_indices, class_name, load_run, pick_images
from lightning_deconv.render import normalize

__all__ = ["default_amounts", "figure5", "main"]

_PAPER_LAYERS = {"features.pool1": "Layer 1 (features.pool1)", "classifier.relu7": "Layer 7 (classifier.relu7)"}
_TITLES = {"translate": "Vertical translation (pixels)", "scale": "Scale (factor)", "rotate": "Rotation (degrees)"}


def default_amounts(size: int) -> dict[str, list[float]]:
    """The paper's ranges for images ``size`` pixels high: vertical shifts of up to a quarter of the image
    (60 px at 224 px), scale factors 0.6 to 1.8, rotations 0 to 360 degrees in steps of 10."""
    reach, step = max(1, size // 4), max(1, size // 32)
    return {
        "translate": [float(t) for t in range(-reach, reach + 1, step)],
        "scale": [round(0.6 + 0.1 * k, 2) for k in range(13)],
        "rotate": [float(a) for a in range(0, 361, 10)],
    }


def figure5(
    run_dir: str | Path,
    output: str | Path,
    images: Sequence[int] | None = None,
    count: int = 5,
    layers: Sequence[str] = ("features.pool1", "classifier.relu7"),
    amounts: dict[str, Sequence[float]] | None = None,
    fill: float = 0.0,
    dpi: int = 150,
) -> Path:
    """Draw the paper's Figure 5 for some probe images of a run and save it to ``output``.

    Args:
        run_dir: the run (see :func:`~lightning_deconv.paper.runs.load_run`).
        output: the figure's path (PNG, PDF, ... by extension).
        images: probe indices (default: ``count`` images of different predicted classes).
        count: how many images when ``images`` is not given (the paper: 5).
        layers: the low and the high layer whose feature vectors are compared (the paper: layers 1 and 7).
        amounts: per transform, the amounts (default: :func:`default_amounts`).
        fill: the value of uncovered pixels in the model's input space (0: the mean grey).
        dpi: resolution of raster outputs.

    Returns:
        The path written.
    """
    plt = pyplot()

    run = load_run(run_dir)
    chosen = list(images) if images is not None else pick_images(run.model, run.probe, count)
    check_indices(chosen, len(run.probe))
    probe = run.probe[chosen]
    ranges = {**default_amounts(probe.shape[-2]), **(amounts or {})}

    fig, axes = plt.subplots(
        len(TRANSFORMS), 2 + len(layers), figsize=(4.2 * (2 + len(layers)), 3.2 * len(TRANSFORMS)), squeeze=False
    )
    for ax, transform in zip(axes, TRANSFORMS, strict=True):
        steps = list(ranges[transform])
        found = invariance(run.model, probe, list(layers), transform=transform, amounts=steps, fill=fill)
        # Example strip: the first image at five of the amounts, evenly spread.
        shown = [steps[round(k * (len(steps) - 1) / 4)] for k in range(5)] if len(steps) >= 5 else steps
        strip = torch.cat([transform_images(probe[:1], transform, a, fill) for a in shown])
        strip = normalize(strip, "minmax")
        width = strip.shape[-1]
        ax[0].imshow(torch.cat(list(strip), dim=2).permute(1, 2, 0).numpy())
        ax[0].set_xticks([width * (k + 0.5) for k in range(len(shown))], [f"{a:g}" for a in shown], fontsize=8)
        ax[0].set_yticks([])
        ax[0].set_title(_TITLES[transform], fontsize=10)
        curves = [(found.distance[name], f"{_PAPER_LAYERS.get(name, name)}: distance") for name in layers]
        curves.append((found.probability, "P(top class of the original)"))
        for panel, (values, title) in zip(ax[1:], curves, strict=True):
            for row, index in enumerate(chosen):
                label = f"#{index} {class_name(run.classes, int(found.targets[row]))}"
                panel.plot(found.amounts.numpy(), values[row].numpy(), marker=".", markersize=3, label=label)
            panel.set_title(title, fontsize=9)
            panel.set_xlabel(_TITLES[transform], fontsize=8)
            panel.tick_params(labelsize=8)
        ax[-1].set_ylim(-0.02, 1.02)
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle("Invariance: feature distances to the original and class probability", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save(fig, output, dpi)


def main(argv: Sequence[str] | None = None) -> None:
    """``lightning-deconv figure5 RUN_DIR -o figure5.png``"""
    parser = figure_parser(
        "figure5",
        "Zeiler & Fergus's Figure 5 (invariance to translation, scale, rotation) from a run.",
        "the run's log dir (holding checkpoints/last.ckpt) or a .ckpt file",
        monitors=False,
    )
    parser.add_argument("--images", type=int, nargs="+", help="probe indices (default: varied predicted classes)")
    parser.add_argument("--count", type=int, default=5, help="how many images without --images")
    parser.add_argument(
        "--layers", nargs=2, default=["features.pool1", "classifier.relu7"], help="the low and the high layer"
    )
    for transform in TRANSFORMS:
        parser.add_argument(f"--{transform}", type=float, nargs="+", help=f"amounts of {transform} (default: paper's)")
    parser.add_argument("--fill", type=float, default=0.0, help="uncovered pixels' value in normalised input space")
    args = parser.parse_args(argv)
    amounts = {t: getattr(args, t) for t in TRANSFORMS if getattr(args, t)}
    path = figure5(args.run_dir, args.output, args.images, args.count, args.layers, amounts, args.fill, args.dpi)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
