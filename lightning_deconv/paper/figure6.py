"""Figure 6 of Zeiler & Fergus (2014): two networks' first-layer filters and second-layer features side by side.

The paper set AlexNet (11x11 first-layer filters at stride 4) beside its fix (7x7 at stride 2) to show the
symptoms it had seen: first-layer filters without mid frequencies, dead filters, and second-layer projections
with the stride's aliasing. Rebuilt from the files runs saved (``<run>/deconv/<name>/epoch_XXX.pt``, written by
:class:`~lightning_deconv.callback.DeconvCallback` with ``measures=True``), so no model is needed: per run, at
its last firing, the first-layer filters above, the projections of the second tracked layer's strongest
features below, and the Fig. 6 measures (:mod:`lightning_deconv.analysis.diagnosis`) printed under them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from lightning_deconv.analysis.spectrum import filter_spectrum
from lightning_deconv.paper.plotting import figure_parser, pyplot, save
from lightning_deconv.record import RecordError, check_layers, find_firings, read_firings
from lightning_deconv.render import filter_grid, projection_grid

__all__ = ["figure6", "last_firing", "main", "measures_text"]


def last_firing(run_dir: str | Path, name: str | None = None) -> dict[str, Any]:
    """The last readable firing file of a run (see :func:`~lightning_deconv.record.find_firings`), loaded.

    Raises:
        RecordError: no readable firings under ``run_dir``, or the last one holds no first-layer filters.
    """
    paths = find_firings(run_dir, name)
    firing = read_firings(paths)[-1]
    if not firing.get("filters"):
        raise RecordError(
            paths[-1].parent,
            f"its firing of epoch {firing['epoch']} holds no first-layer filters",
            "Train with DeconvCallback(measures=True) (the default), which saves them in every firing file",
        )
    return firing


def measures_text(firing: dict[str, Any], layer: str) -> str:
    """The Fig. 6 measures of a firing, as printed under its panels: the first layer's spectrum and largest
    filter RMS (computed from the saved filters), the dead shares and ``layer``'s aliasing (as logged)."""
    name, weight = firing["filters"]["name"], firing["filters"]["weight"]
    low, mid, high = filter_spectrum(weight).nanmean(dim=0).tolist()
    rms = weight.flatten(1).pow(2).mean(dim=1).sqrt().max().item()
    logged = firing.get("measures", {})
    first = next(iter(firing["layers"]))
    dead = [
        f"{n} {logged[f'deconv/{n}/dead']:.2f}" for n in dict.fromkeys([first, layer]) if f"deconv/{n}/dead" in logged
    ]
    alias = logged.get(f"deconv/{layer}/aliasing")
    kh, kw = weight.shape[-2:]
    return "\n".join(
        [
            f"{name}: {len(weight)} filters {kh}x{kw}, largest RMS {rms:.3f}",
            f"spectrum low {low:.2f} / mid {mid:.2f} / high {high:.2f}",
            f"dead: {', '.join(dead) or 'n/a'}",
            f"aliasing of {layer}: {'n/a' if alias is None else f'{alias:.4f}'}",
        ]
    )


def figure6(
    runs: Sequence[str | Path],
    output: str | Path,
    layer: str | None = None,
    features: int = 8,
    labels: Sequence[str] | None = None,
    cell: int = 48,
    dpi: int = 150,
    name: str | None = None,
) -> Path:
    """Draw the paper's Figure 6 for runs side by side and save it to ``output`` (PNG, PDF, ... by extension).

    Args:
        runs: the runs' log dirs (see :func:`~lightning_deconv.record.find_firings`), one column each.
        output: the figure's path.
        layer: the tracked layer whose projections to show (default: each run's second tracked layer).
        features: show the projections of at most this many features, strongest activation first.
        labels: column titles (default: the runs' paths).
        cell: every projection is drawn this many pixels wide, so that runs with other fields line up.
        dpi: resolution of raster outputs.
        name: the monitor to draw (``deconv/<name>``) in runs that have several.

    Returns:
        The path written.

    Raises:
        RecordError: a run without readable firings or filters, or without ``layer``.
        ValueError: as many labels as runs are needed.
    """
    plt = pyplot()

    firings = [last_firing(run, name) for run in runs]
    labels = list(labels or [str(run) for run in runs])
    if len(labels) != len(firings):
        raise ValueError(f"Got {len(labels)} labels for {len(firings)} runs.")
    fig, axes = plt.subplots(2, len(firings), figsize=(4.6 * len(firings), 9.0), squeeze=False)
    for column, (firing, label) in enumerate(zip(firings, labels, strict=True)):
        names = list(firing["layers"])
        shown = layer or names[min(1, len(names) - 1)]
        check_layers([shown], names, runs[column])
        saved = firing["layers"][shown]
        order = saved["value"].argsort(descending=True)[:features]
        crops = F.interpolate(saved["crops"][order].float(), size=(cell, cell), mode="nearest")
        top, bottom = axes[0][column], axes[1][column]
        top.imshow(filter_grid(firing["filters"]["weight"]).permute(1, 2, 0).numpy(), interpolation="nearest")
        top.set_title(f"{label}\nfirst-layer filters ({firing['filters']['name']})", fontsize=9)
        grid = projection_grid(crops, nrow=max(1, int(len(crops) ** 0.5 + 0.999)))
        bottom.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        bottom.set_title(f"{shown}: the {len(crops)} strongest features, after epoch {firing['epoch']}", fontsize=9)
        bottom.set_xlabel(measures_text(firing, shown), fontsize=8, family="monospace", loc="left")
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Fig. 6: first-layer filters and second-layer projections", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return save(fig, output, dpi)


def main(argv: Sequence[str] | None = None) -> None:
    """``lightning-deconv figure6 RUN_A RUN_B -o figure6.png``"""
    parser = figure_parser(
        "figure6",
        "Zeiler & Fergus's Figure 6 from runs' saved firings: first-layer filters, second-layer projections and "
        "the measures of each run, side by side.",
        run_help="a run's log dir (or a parent of several versions)",
    )
    parser.add_argument("more_runs", nargs="*", metavar="RUN", help="more runs to set beside it (e.g. RUN_B)")
    parser.add_argument("--layer", help="the tracked layer whose projections to show (default: the second)")
    parser.add_argument("--features", type=int, default=8, help="projections per run, strongest first")
    parser.add_argument("--labels", nargs="+", help="column titles (default: the runs' paths)")
    args = parser.parse_args(argv)
    path = figure6(
        [args.run_dir, *args.more_runs],
        args.output,
        args.layer,
        args.features,
        args.labels,
        dpi=args.dpi,
        name=args.name,
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
