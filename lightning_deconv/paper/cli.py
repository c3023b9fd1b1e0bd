"""Command line: ``lightning-deconv fit|validate|test --config configs/NAME.yaml``, the figures and ``demo``.

Training goes through Lightning's ``LightningCLI``, so every argument of the model, the data module, the
trainer and its callbacks (``DeconvCallback`` included) can be set in YAML or on the command line. The data
module's class count and input size are linked into the model. ``figure4`` rebuilds the paper's Figure 4
from a finished run; ``demo`` trains ``configs/demo.yaml`` on the embedded photographs and draws the figures.
"""

from __future__ import annotations

import importlib
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from lightning_deconv.paper.classifier import ImageClassifier

__all__ = ["DeconvCLI", "main"]

CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped in the package (a clone links configs/ here)
PAPER_EXTRA = ("matplotlib", "jsonargparse", "skimage", "sklearn", "torchmetrics")


class DeconvCLI(LightningCLI):
    """``LightningCLI`` for an :class:`ImageClassifier` and any ``LightningDataModule``."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            ImageClassifier,
            LightningDataModule,
            subclass_mode_data=True,
            args=list(args) if args is not None else None,
            run=run,
            save_config_kwargs={"overwrite": True},
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.init_args.input_size", "model.input_size")


def demo(argv: Sequence[str] = ()) -> None:
    """Train ``configs/demo.yaml`` (offline, CPU-sized) and draw the paper's figures from the run."""
    from lightning_deconv.paper.figure2 import figure2
    from lightning_deconv.paper.figure4 import figure4
    from lightning_deconv.paper.figure5 import figure5
    from lightning_deconv.paper.figure7 import figure7
    from lightning_deconv.paper.settling import settling_figure

    config = CONFIGS / "demo.yaml"
    start = time.perf_counter()
    cli = DeconvCLI(["fit", "--config", str(config), *argv])
    log_dir = cli.trainer.log_dir
    written = [
        figure4(log_dir, "figure4.png"),
        settling_figure(log_dir, "settling.png"),
        figure2(log_dir, "figure2.png"),
        figure7(log_dir, "figure7.png"),
        figure5(log_dir, "figure5.png"),
    ]
    minutes = (time.perf_counter() - start) / 60
    print(f"Demo done in {minutes:.1f} min. Figures: {', '.join(str(p) for p in written)}. Run: {log_dir}")


# ``lightning-deconv NAME ...`` runs the ``main(argv)`` of one of these modules; anything else is LightningCLI.
FIGURES = {
    "figure2": "lightning_deconv.paper.figure2",
    "figure4": "lightning_deconv.paper.figure4",
    "settling": "lightning_deconv.paper.settling",
    "figure5": "lightning_deconv.paper.figure5",
    "figure6": "lightning_deconv.paper.figure6",
    "figure7": "lightning_deconv.paper.figure7",
}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-deconv`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["demo"]:
            demo(args[1:])
        elif args[:1] and args[0] in FIGURES:
            _figure(args[0], args[1:])
        else:
            DeconvCLI(args)
    except ModuleNotFoundError as error:
        missing = next((name for name in PAPER_EXTRA if name in (error.name or str(error))), None)
        if missing is None:
            raise
        raise SystemExit(
            f"lightning-deconv: the paper's experiment needs {missing}, which the library alone does not install. "
            "Install it with: pip install 'lightning-deconv[paper]'"
        ) from None


def _figure(name: str, args: list[str]) -> None:
    """Run a figure command: a bad file or argument is one line on stderr and exit status 1, no traceback
    (``--debug`` shows it); a skipped file is one line too."""
    debug = "--debug" in args
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            importlib.import_module(FIGURES[name]).main(args)
        except (ValueError, OSError) as error:  # RecordError is a ValueError
            if debug:
                raise
            raise SystemExit(f"lightning-deconv: {error}") from None


def _one_line_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    print(str(message), file=sys.stderr)


if __name__ == "__main__":
    main()
