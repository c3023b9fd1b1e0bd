"""What every monitor shares: when it fires (:class:`Schedule`) and where its pictures and numbers go (:class:`Sink`).

The monitors (:class:`~lightning_deconv.callback.DeconvCallback` for Fig. 4,
:class:`~lightning_deconv.monitors.TopKMonitor` for Fig. 2, :class:`~lightning_deconv.monitors.OcclusionMonitor` for
Fig. 7) each do one thing; these small objects are the parts they have in common, so that each rule lives once:
epochs are counted from 1, a firing is due right after the epoch's last optimiser step, and a logging failure warns
instead of stopping training.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_deconv._compat import rank_zero_warn

__all__ = ["PAPER_EPOCHS", "Schedule", "Sink", "normalise_epochs"]

PAPER_EPOCHS: tuple[int, ...] = (1, 2, 5, 10, 20, 30, 40, 64)


def normalise_epochs(epochs: Sequence[int], label: str = "epochs") -> tuple[int, ...]:
    """Sorted, de-duplicated 1-based epochs; zero, negative or non-integer epochs are rejected."""
    bad = [e for e in epochs if isinstance(e, bool) or not isinstance(e, int) or e < 1]
    if isinstance(epochs, (str, bytes)) or bad:
        raise ValueError(
            f"`{label}` must be positive integers counted from 1 (epoch 1 = after the first pass); got {epochs!r}."
        )
    return tuple(sorted(set(epochs)))


@dataclass(frozen=True)
class Schedule:
    """When a monitor fires: after these 1-based training epochs, and once when training ends if ``at_end``
    and the last epoch was not one of them (so that short runs end with a final firing).

    Example::

        >>> schedule = Schedule((5, 1, 2, 2), at_end=True)
        >>> schedule.epochs, schedule.due(2, done=()), schedule.due(3, done=()), schedule.due_at_end(3, done={1, 2})
        ((1, 2, 5), True, False, True)
    """

    epochs: tuple[int, ...]
    at_end: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", normalise_epochs(self.epochs))
        if not self.epochs and not self.at_end:
            raise ValueError("Nothing would ever fire: give some `epochs` or set `fire_at_end=True`.")

    def due(self, epoch: int, done: Container[int]) -> bool:
        """Whether to fire after ``epoch`` (1-based), given the epochs already fired or tried."""
        return epoch in self.epochs and epoch not in done

    def due_at_end(self, completed: int, done: Container[int]) -> bool:
        """Whether to fire when training ends after ``completed`` epochs."""
        return self.at_end and completed > 0 and completed not in done


def completed_epochs(trainer: Any) -> int:
    """How many training epochs are complete (a resumed run counts its checkpoint's)."""
    return trainer.fit_loop.epoch_progress.current.completed


def last_batch(trainer: Any, batch_idx: int) -> bool:
    """Whether ``batch_idx`` is the epoch's last training batch: a firing then sees the epoch's last optimiser step
    and comes before validation and before any checkpoint of the epoch, so a resumed run never misses one."""
    return batch_idx + 1 == trainer.num_training_batches


class Sink:
    """Where a monitor's pictures and numbers go: every logger of the trainer, each with the epoch as its step.

    TensorBoard gets images (``add_image``), scalars, histograms and the custom-scalars layout; other loggers get
    what they support (``log_metrics``, ``log_image``). A logger that fails is one warning, never a stopped run.
    """

    def __init__(self, trainer: Any) -> None:
        self.loggers = list(trainer.loggers)

    def _each(self, what: str, call: Any) -> None:
        for logger in self.loggers:
            try:
                call(logger, getattr(logger, "experiment", None))
            except Exception as error:  # a logging failure must never stop training
                rank_zero_warn(f"lightning-deconv could not log {what} to {type(logger).__name__}: {error}")

    def images(self, images: dict[str, Tensor], epoch: int) -> None:
        """Log ``{tag: [3, H, W] picture}``."""

        for tag, image in images.items():

            def log(logger: Any, experiment: Any, tag: str = tag, image: Tensor = image) -> None:
                if hasattr(experiment, "add_image"):
                    experiment.add_image(tag, image, global_step=epoch)
                elif hasattr(logger, "log_image"):
                    logger.log_image(key=tag, images=[image], step=epoch)

            self._each(repr(tag), log)

    def scalars(self, values: dict[str, float], epoch: int) -> None:
        """Log ``{tag: number}``."""
        self._each("its scalars", lambda logger, _: logger.log_metrics(values, step=epoch))

    def histogram(self, tag: str, values: Tensor, epoch: int) -> None:
        """Log a histogram where the logger can (TensorBoard)."""

        def log(_: Any, experiment: Any) -> None:
            if hasattr(experiment, "add_histogram"):
                experiment.add_histogram(tag, values, global_step=epoch)

        self._each(repr(tag), log)

    def layout(self, charts: dict[str, str]) -> None:
        """TensorBoard's custom-scalars layout: ``{chart title: tag}``, one chart per measure, one line per layer."""
        layout = {"deconv": {title: ["Multiline", [rf"deconv/.*/{tag}$"]] for title, tag in charts.items()}}

        def log(_: Any, experiment: Any) -> None:
            if hasattr(experiment, "add_custom_scalars"):
                experiment.add_custom_scalars(layout)

        self._each("the TensorBoard layout", log)


class Scheduled:
    """The Lightning hooks that make a monitor fire: right after each epoch's last training batch (or at the
    epoch's end, for loaders without a length), and when training ends. A monitor defines :meth:`fire_due` and
    :meth:`fire_at_end`; a resumed run whose checkpoint is already at the end skips training, so its end firing,
    if a kill cut it short last time, is made at fit end."""

    watch: Any

    def fire_due(self, trainer: Any, epoch: int) -> None:
        raise NotImplementedError

    def fire_at_end(self, trainer: Any, completed: int) -> None:
        raise NotImplementedError

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._training_ran = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if last_batch(trainer, batch_idx):
            self.fire_due(trainer, trainer.current_epoch + 1)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.fire_due(trainer, trainer.current_epoch + 1)  # loaders without a length

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._training_ran = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.fire_at_end(trainer, completed_epochs(trainer))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if not getattr(self, "_training_ran", True):
            self.fire_at_end(trainer, completed_epochs(trainer))
        self.watch.release()
