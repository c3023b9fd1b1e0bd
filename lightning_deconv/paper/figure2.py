"""Figure 2 of Zeiler & Fergus (2014): the top 9 activations of a random subset of features in each layer.

Rebuilt from the files a run saved (``<run>/deconv/<name>/top9_epoch_XXX.pt``, see
:func:`~lightning_deconv.analysis.top_k_files.save_top_k`), so no model is needed: one block per layer; per
feature, the projections of its 9 strongest activations over the validation set (one per image, strongest
first, row by row) beside the image patches they came from.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from lightning_deconv.analysis.top_k_files import SavedTopK, load_top_k
from lightning_deconv.paper.plotting import figure_parser, pyplot, save
from lightning_deconv.record import RecordError, check_layers, find_firings
from lightning_deconv.render import top_k_grid

__all__ = ["figure2", "find_top_k", "main"]

_GAP = 6  # white pixels between features, as top_k_grid draws them


def find_top_k(run_dir: str | Path, name: str | None = None) -> dict[int, Path]:
    """The top-k files of a run's monitor, ``{epoch: path}`` in epoch order (``run_dir`` and ``name`` as for
    :func:`~lightning_deconv.record.find_firings`).

    Raises:
        RecordError: no ``top*_epoch_*.pt`` under ``run_dir``.
    """
    files = find_firings(run_dir, name, "top*_epoch_*.pt")
    by_epoch = {int(re.search(r"_epoch_(\d+)\.pt$", path.name).group(1)): path for path in files}
    return dict(sorted(by_epoch.items()))


def _newest_readable(files: dict[int, Path]) -> SavedTopK:
    """The newest top-k file that can be read; each unreadable one is skipped with a warning naming it."""
    for epoch in sorted(files, reverse=True):
        try:
            return load_top_k(files[epoch])
        except RecordError as error:
            warnings.warn(f"lightning-deconv: skipped {error}", stacklevel=3)
    raise RecordError(
        next(iter(files.values())).parent, "none of its top-k files could be read", "Point at another run"
    )


def figure2(
    run_dir: str | Path,
    output: str | Path,
    layers: Sequence[str] | None = None,
    epoch: int | None = None,
    features: int | None = None,
    cell: int = 64,
    dpi: int = 150,
    name: str | None = None,
) -> Path:
    """Draw the paper's Figure 2 from a run and save it to ``output`` (PNG, PDF, ... by extension).

    Args:
        run_dir: where the run saved its top-k files (see :func:`find_top_k`).
        output: the figure's path.
        layers: the layers to show, in order (default: all, shallowest first).
        epoch: the firing to show (default: the last).
        features: show at most this many features per layer (default: all saved).
        cell: every projection and patch is drawn this many pixels wide, so that the layers line up.
        dpi: resolution of raster outputs.
        name: the monitor to draw (``deconv/<name>``), when the run has several.

    Returns:
        The path written.

    Raises:
        RecordError: no readable top-k file under ``run_dir``, an epoch without a file, or layers that were not
            saved.
    """
    plt = pyplot()

    files = find_top_k(run_dir, name)
    if epoch is not None and epoch not in files:
        raise RecordError(run_dir, f"has no top-k file for epoch {epoch}", f"Choose among epochs {list(files)}")
    saved = _newest_readable(files if epoch is None else {epoch: files[epoch]})
    names = list(layers or saved.top)
    check_layers(names, list(saved.top), files.get(saved.epoch, run_dir))
    count = features or max(len(t.channels) for t in saved.top.values())
    blocks = [top_k_grid(saved.crops[n][:count], saved.patches[n][:count], cell_size=cell, gap=_GAP) for n in names]
    scale = 1 / 90  # inches per pixel of the grids
    widths = [b.shape[2] for b in blocks]
    height = max(b.shape[1] for b in blocks)
    fig, axes = plt.subplots(
        1,
        len(blocks),
        figsize=(sum(widths) * scale + 0.6 * len(blocks), height * scale + 1.2),
        gridspec_kw={"width_ratios": widths},
        squeeze=False,
    )
    for index, (ax, block, name) in enumerate(zip(axes[0], blocks, names, strict=True)):
        channels = saved.top[name].channels[:count].tolist()
        step = (block.shape[1] - _GAP) / len(channels)  # one feature's block and the gap below it
        ax.imshow(block.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_anchor("N")  # layers with fewer features stay level with the others at the top
        ax.set_title(f"Layer {index + 1}\n{name}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([_GAP + (i + 0.5) * step - _GAP / 2 for i in range(len(channels))], [f"#{c}" for c in channels])
        ax.tick_params(length=0, labelsize=8)
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle(
        f"Top {saved.top[names[0]].k} activations per feature after epoch {saved.epoch}: "
        "projections (left) and the image patches they come from (right)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save(fig, output, dpi)


def main(argv: Sequence[str] | None = None) -> None:
    """``lightning-deconv figure2 RUN_DIR -o figure2.png``"""
    parser = figure_parser(
        "figure2",
        "Rebuild Zeiler & Fergus's Figure 2 (top 9 activations per feature) from a run's saved files.",
    )
    parser.add_argument("--layers", nargs="+", help="layers to show (default: all saved)")
    parser.add_argument("--epoch", type=int, help="the firing to show (default: the last)")
    parser.add_argument("--features", type=int, help="at most this many features per layer (default: all)")
    parser.add_argument("--cell", type=int, default=64, help="pixels per projection and patch")
    args = parser.parse_args(argv)
    path = figure2(args.run_dir, args.output, args.layers, args.epoch, args.features, args.cell, args.dpi, args.name)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
