"""Figure 7 of Zeiler & Fergus (2014): occlusion sensitivity, from a run's checkpoint and probe.

For a few probe images, one row each: (a) the image with the grey square drawn where it hurts the class
most, (b) the total activation of the layer-5 feature map that is strongest on the unoccluded image, as a
function of the square's position, (c) that feature's strongest activation projected to pixels with the
deconvnet, (d) the probability of the class (the top class of the unoccluded image) and (e) the most
probable class, as functions of the square's position. Each map cell is drawn at the centre of its square,
over the image's pixel coordinates.

The model (an :class:`~lightning_deconv.paper.classifier.ImageClassifier`'s ZFNet) and the probe images (as
:class:`~lightning_deconv.callback.DeconvCallback` stored them) come from ``<run>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_deconv.analysis.occlusion import Occlusion, occlusion
from lightning_deconv.engine import deconvolve
from lightning_deconv.paper.plotting import figure_parser, pyplot, save
from lightning_deconv.paper.runs import check_indices, class_name, load_run, pick_images
from lightning_deconv.render import normalize

__all__ = ["figure7", "main"]


def _show_map(ax: Any, values: Tensor, found: Occlusion, size: tuple[int, int], **style: Any) -> Any:
    """Draw a map with each cell centred on its square, in the image's pixel coordinates."""
    start = (found.patch - found.stride) / 2  # the first cell's edge: its square's centre minus half a step
    rows, cols = values.shape
    extent = (start, start + cols * found.stride, start + rows * found.stride, start)
    shown = ax.imshow(values.numpy(), extent=extent, interpolation="nearest", **style)
    ax.set_xlim(0, size[1])
    ax.set_ylim(size[0], 0)
    return shown


def figure7(
    run_dir: str | Path,
    output: str | Path,
    images: Sequence[int] | None = None,
    count: int = 3,
    layer: str = "features.pool5",
    patch: int | None = None,
    stride: int | None = None,
    fill: float = 0.0,
    dpi: int = 150,
) -> Path:
    """Draw the paper's Figure 7 for some probe images of a run and save it to ``output``.

    Args:
        run_dir: the run (see :func:`~lightning_deconv.paper.runs.load_run`).
        output: the figure's path (PNG, PDF, ... by extension).
        images: probe indices to show (default: ``count`` images of different predicted classes).
        count: how many images when ``images`` is not given.
        layer: the layer whose strongest feature map is tracked (the paper: layer 5).
        patch: side of the grey square (default: a quarter of the image side, 16 px at 64 px).
        stride: step of the square (default: a sixteenth of the image side, 4 px at 64 px).
        fill: the square's value in the model's input space (0: the mean grey).
        dpi: resolution of raster outputs.

    Returns:
        The path written.
    """
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    run = load_run(run_dir)
    chosen = list(images) if images is not None else pick_images(run.model, run.probe, count)
    check_indices(chosen, len(run.probe))
    probe = run.probe[chosen]
    size = tuple(probe.shape[-2:])
    patch = patch or max(1, min(size) // 4)
    stride = stride or max(1, min(size) // 16)
    found = occlusion(run.model, probe, layer, patch=patch, stride=stride, fill=fill)
    picture = normalize(probe, "minmax").permute(0, 2, 3, 1).numpy()
    palette = plt.get_cmap("tab20")
    classes = sorted(set(found.label.flatten().tolist()) | set(found.targets.tolist()))
    colours = ListedColormap([palette(k % 20) for k in range(max(classes) + 1)])

    fig, axes = plt.subplots(len(chosen), 5, figsize=(15, 3.0 * len(chosen)), squeeze=False)
    for row, (index, ax) in enumerate(zip(chosen, axes, strict=True)):
        target = int(found.targets[row])
        channel = int(found.channel[row])
        # (a) the square where it lowers the class's probability most
        top, left, _, _ = found.square(*divmod(int(found.probability[row].argmin()), found.probability.shape[2]))
        ax[0].imshow(picture[row])
        ax[0].add_patch(Rectangle((left - 0.5, top - 0.5), patch, patch, facecolor="0.5", edgecolor="k"))
        ax[0].set_title(f"(a) probe #{index}, top class: {class_name(run.classes, target)}", fontsize=9)
        shown = _show_map(ax[1], found.feature[row], found, size, cmap="viridis")
        fig.colorbar(shown, ax=ax[1], fraction=0.046)
        ax[1].set_title(f"(b) {layer} feature #{channel}: total activation", fontsize=9)
        # (c) the feature's strongest activation in this image, projected to pixels
        own = deconvolve(run.model, probe[row : row + 1], {layer: [channel]})[layer].images
        ax[2].imshow(normalize(own).permute(0, 2, 3, 1)[0].numpy())
        ax[2].set_title(f"(c) feature #{channel} projected (deconvnet)", fontsize=9)
        # p(class) on the paper's fixed 0-1 scale: a confident classifier's map is not stretched over noise
        shown = _show_map(ax[3], found.probability[row], found, size, cmap="jet", vmin=0.0, vmax=1.0)
        fig.colorbar(shown, ax=ax[3], fraction=0.046)
        ax[3].set_title(f"(d) p({class_name(run.classes, target)})", fontsize=9)
        _show_map(ax[4], found.label[row].float(), found, size, cmap=colours, vmin=-0.5, vmax=max(classes) + 0.5)
        present = sorted(set(found.label[row].flatten().tolist()))
        ax[4].legend(
            handles=[Patch(color=palette(k % 20), label=class_name(run.classes, k)) for k in present],
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
            frameon=False,
        )
        ax[4].set_title("(e) most probable class", fontsize=9)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(
        f"Occlusion sensitivity: {patch}x{patch} grey square, stride {stride} (maps drawn at the square's centre)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save(fig, output, dpi)


def main(argv: Sequence[str] | None = None) -> None:
    """``lightning-deconv figure7 RUN_DIR -o figure7.png``"""
    parser = figure_parser(
        "figure7",
        "Zeiler & Fergus's Figure 7 (occlusion sensitivity) from a run's checkpoint and probe images.",
        "the run's log dir (holding checkpoints/last.ckpt) or a .ckpt file",
        monitors=False,
    )
    parser.add_argument("--images", type=int, nargs="+", help="probe indices (default: varied predicted classes)")
    parser.add_argument("--count", type=int, default=3, help="how many images without --images")
    parser.add_argument("--layer", default="features.pool5", help="the layer whose strongest feature is tracked")
    parser.add_argument("--patch", type=int, help="side of the grey square (default: image side / 4)")
    parser.add_argument("--stride", type=int, help="step of the square (default: image side / 16)")
    parser.add_argument("--fill", type=float, default=0.0, help="the square's value in normalised input space")
    args = parser.parse_args(argv)
    path = figure7(
        args.run_dir, args.output, args.images, args.count, args.layer, args.patch, args.stride, args.fill, args.dpi
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
