"""Figure 4 of Zeiler & Fergus (2014): the evolution of a random subset of features through training.

Rebuilt from the files a run saved (``<run>/deconv/<name>/epoch_XXX.pt``, written by
:class:`~lightning_deconv.callback.DeconvCallback`), so no model is needed: one block per layer, rows =
features, columns = the epochs at which the callback fired, each cell the feature's strongest activation
over the probe set projected to pixel space and cropped to its receptive field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_deconv.analysis.settling import feature_marks
from lightning_deconv.paper.plotting import figure_parser, pyplot, save
from lightning_deconv.record import check_layers, find_firings, read_firings, saved_field
from lightning_deconv.render import evolution_grid

__all__ = ["figure4", "main"]


def figure4(
    run_dir: str | Path,
    output: str | Path,
    layers: Sequence[str] | None = None,
    dpi: int = 150,
    name: str | None = None,
) -> Path:
    """Draw the paper's Figure 4 from a run and save it to ``output`` (PNG, PDF, ... by extension).

    Args:
        run_dir: where the run saved its firings (see :func:`~lightning_deconv.record.find_firings`); unreadable
            files are skipped with a warning naming them.
        output: the figure's path.
        layers: the layers to show, in order (default: all that were tracked, shallowest first).
        dpi: resolution of raster outputs.
        name: the monitor to draw (``deconv/<name>``), when the run has several.

    Returns:
        The path written.

    Raises:
        RecordError: no readable firings, or layers that were not tracked.
    """
    plt = pyplot()

    paths = find_firings(run_dir, name)
    firings = read_firings(paths)
    epochs = [f["epoch"] for f in firings]
    names = list(layers or firings[-1]["layers"])
    check_layers(names, list(firings[-1]["layers"]), paths[0].parent)
    cell = max(int(max(f["layers"][n]["crops"].shape[-2:])) for f in firings for n in names if n in f["layers"])
    cell = max(cell, 48)
    blocks = []
    for name in names:
        saved = [f["layers"][name] for f in firings if name in f["layers"]]
        channels = saved[-1]["channels"].tolist()
        labels = [str(f["epoch"]) for f in firings if name in f["layers"]]
        marks = [feature_marks(s["value"], saved_field(s, "images")) for s in saved]
        rows = [f"#{c}" for c in channels]
        grid = evolution_grid([s["crops"] for s in saved], labels, rows, cell_size=cell, marks=marks)
        blocks.append(grid)
    # The paper's layout: the layers' blocks side by side, each with features down and epochs across.
    scale = 1 / 90  # inches per pixel of the grids
    widths = [b.shape[2] for b in blocks]
    height = max(b.shape[1] for b in blocks)
    fig, axes = plt.subplots(
        1,
        len(blocks),
        figsize=(sum(widths) * scale + 0.3 * len(blocks), height * scale + 1.0),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    for index, (ax, block, name) in enumerate(zip(axes[0], blocks, names, strict=True)):
        ax.imshow(block.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"Layer {index + 1}\n{name}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"Feature evolution during training (columns: epochs {', '.join(map(str, epochs))})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save(fig, output, dpi)


def main(argv: Sequence[str] | None = None) -> None:
    """``lightning-deconv figure4 RUN_DIR -o figure4.png``"""
    parser = figure_parser(
        "figure4",
        "Rebuild Zeiler & Fergus's Figure 4 (feature evolution) from a run's saved firings.",
    )
    parser.add_argument("--layers", nargs="+", help="layers to show (default: all tracked)")
    args = parser.parse_args(argv)
    path = figure4(args.run_dir, args.output, args.layers, args.dpi, args.name)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
