"""What the figure commands share: a headless pyplot, saving a figure, and their common arguments."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["figure_parser", "pyplot", "save"]

RUN_HELP = "the run's log dir (or a parent of several versions)"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, output: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``output`` (PNG, PDF, ... by extension), making its folder, and close it."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=dpi)
    pyplot().close(fig)
    return output


def figure_parser(
    name: str, description: str, run_help: str = RUN_HELP, monitors: bool = True
) -> argparse.ArgumentParser:
    """The parser of ``lightning-deconv NAME RUN_DIR -o NAME.png --dpi N [--name MONITOR]``; add the figure's own
    arguments. ``--debug`` is the command line's own (it shows tracebacks)."""
    parser = argparse.ArgumentParser(prog=f"lightning-deconv {name}", description=description)
    parser.add_argument("run_dir", help=run_help)
    parser.add_argument("-o", "--output", default=f"{name}.png", help="where to write the figure")
    parser.add_argument("--dpi", type=int, default=150)
    if monitors:
        parser.add_argument("--name", help="the monitor to draw, deconv/<NAME>, when a run has several")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser
