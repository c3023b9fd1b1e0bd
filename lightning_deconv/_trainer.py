"""What DeconvCallback needs from Lightning's Trainer, kept apart from what it does with it.

Where the user's data is (loaders passed to ``fit()``, a datamodule, the LightningModule's hooks), which model
to project (the LightningModule, or the network its steps call), DDP's collectives (rank 0's buffers, shares
gathered to rank 0, failures that travel in place of results so that no rank waits forever), and logging that
warns instead of stopping training.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lightning_deconv._compat import rank_zero_info, rank_zero_warn
from lightning_deconv.probe import untouched_rng


class Failure:
    """A rank's failed share of a firing: what went wrong, sent to rank 0 in place of results."""

    def __init__(self, cause: str, traceback: str) -> None:
        self.cause, self.traceback = cause, traceback


class FiringFailed(RuntimeError):
    def __init__(self, failures: list[Failure]) -> None:
        super().__init__("; ".join(f.cause for f in failures))
        self.failures = failures


def log_metrics(logger: Any, metrics: dict[str, float], epoch: int) -> None:
    try:
        logger.log_metrics(metrics, step=epoch)
    except Exception as error:  # a logging failure must never stop training
        rank_zero_warn(f"DeconvCallback could not log its scalars to {type(logger).__name__}: {error}")


class _ChildForward(nn.Module):
    """A LightningModule that defines no ``forward`` (its steps call ``self.net(x)``), seen as a model that calls
    that child: same modules, same names (the children's dict is shared, nothing is copied)."""

    def __init__(self, owner: nn.Module, child: str) -> None:
        super().__init__()
        self._modules = owner._modules
        self.training = owner.training
        self._child = child

    def forward(self, x: Tensor) -> Any:
        return self._modules[self._child](x)


def projected_model(pl_module: nn.Module) -> nn.Module:
    """``pl_module``, or for one without its own ``forward``, the model that calls its only conv-holding child."""
    if getattr(type(pl_module).forward, "__qualname__", "") != "LightningModule.forward":
        return pl_module
    holders = [
        name for name, child in pl_module.named_children() if any(isinstance(m, nn.Conv2d) for m in child.modules())
    ]
    if len(holders) != 1:
        raise ValueError(
            f"{type(pl_module).__name__} defines no forward(), and DeconvCallback cannot tell which of its children "
            f"is the network ({holders or 'none holds a Conv2d'}). Define forward(self, x) to run the network."
        )
    return _ChildForward(pl_module, holders[0])


def _first_loader(source: Any) -> Any:
    """The loader a Lightning data source defines (the first of a collection), or ``None``."""
    if not source.is_defined():
        return None
    loader = source.dataloader()
    while isinstance(loader, (list, tuple, Mapping)) and loader:
        loader = next(iter(loader.values())) if isinstance(loader, Mapping) else loader[0]
    return loader


def data_source(trainer: Any) -> Any:
    """Where ``probe=None`` draws from: the datamodule's ``probe_dataset()``, else the first validation loader,
    else the first training loader, wherever it is defined (``fit()``, a datamodule, the module's hooks)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "probe_dataset"):
        return datamodule.probe_dataset()
    # The loops' data sources know the loaders wherever they were given (fit(), datamodule, module hooks)
    # before the loops load them.
    for source in (trainer.fit_loop.epoch_loop.val_loop._data_source, trainer.fit_loop._data_source):
        loader = _first_loader(source)
        if loader is not None:
            return loader
    raise ValueError(
        "DeconvCallback(probe=None) found no data to draw the probe from: no validation or training loader is "
        "defined (in fit(), a datamodule or the LightningModule). Pass `probe=` a tensor of images, a Dataset or a "
        "DataLoader."
    )


def validation_data(trainer: Any) -> Any:
    """The validation set the top k are taken over: the first validation loader's dataset (or the loader)."""
    with untouched_rng():
        loader = _first_loader(trainer.fit_loop.epoch_loop.val_loop._data_source)
    if loader is None:
        raise ValueError("DeconvCallback(top_k=...) needs a validation loader to scan; none is defined.")
    return loader.dataset if isinstance(loader, DataLoader) and loader.dataset is not None else loader


class _Strided(IterableDataset):
    """Items ``rank, rank + world, ...`` of an iterable (one DDP rank's shard)."""

    def __init__(self, data: Iterable, rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def __iter__(self) -> Iterator:
        return islice(iter(self.data), self.rank, None, self.world)


def shard(data: Any, rank: int, world: int) -> Any:
    """Items ``rank, rank + world, ...`` of ``data``: local item ``j`` is global item ``j * world + rank``."""
    if world == 1:
        return data
    if isinstance(data, Tensor):
        return data[rank::world]
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        return Subset(data, range(rank, len(data), world))
    return _Strided(data, rank, world)


def same_on_every_rank(trainer: Any, probe: Tensor) -> Tensor:
    """Rank 0's probe on every rank (iterable datasets may yield other items on other ranks)."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        return trainer.strategy.broadcast(probe, src=0)
    return probe


def say(trainer: Any, message: str) -> None:
    """One line for the user, above the progress bar if there is one (rank 0 only)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and hasattr(bar, "print") and trainer.is_global_zero:
        bar.print(message)
    else:
        rank_zero_info(message)


def log_image(logger: Any, tag: str, image: Tensor, epoch: int) -> None:
    """Log through TensorBoard's ``add_image`` or a logger's ``log_image``; warn rather than crash."""
    try:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, image, global_step=epoch)
        elif hasattr(logger, "log_image"):
            logger.log_image(key=tag, images=[image], step=epoch)
    except Exception as error:  # a logging failure must never stop training
        rank_zero_warn(f"DeconvCallback could not log {tag!r} to {type(logger).__name__}: {error}")


def rank_zero_buffers(model: nn.Module, world: int) -> dict[str, Tensor] | None:
    """Under DDP, rank 0's buffers (BatchNorm statistics), which can differ on other ranks between forward
    passes; every rank projects with them, without changing its own copy."""
    if world == 1 or not torch.distributed.is_initialized():
        return None
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    for tensor in buffers.values():
        torch.distributed.broadcast(tensor, src=0)
    return buffers


def gather_to_zero(mine: Any, world: int) -> list[Any]:
    """Every rank's results, on rank 0 (other ranks get an empty list)."""
    if world == 1 or not torch.distributed.is_initialized():
        return [mine]
    gathered: list[Any] | None = [None] * world if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    return gathered or []


def fire_safely(
    trainer: Any,
    model: nn.Module,
    what: str,
    share: Callable[[int, int, dict[str, Tensor] | None], Any],
    finish: Callable[[list[Any]], None],
    strict: bool = False,
) -> None:
    r"""Run one firing on every rank without ever stopping training or hanging a collective.

    Every rank computes its ``share(rank, world, rank_zero_state)``; a rank that fails sends its failure to
    rank 0 in place of results, so every rank reaches the gather. Rank 0 alone then ``finish``\ es with all
    the shares. Any failure, on any rank, is one warning with its cause and traceback,
    and training goes on (``strict``: raised instead).
    """
    rank, world = trainer.global_rank, trainer.world_size
    state = rank_zero_buffers(model, world)
    try:
        mine: Any = share(rank, world, state)
    except Exception as error:  # a firing must never stop training
        if strict:
            raise
        mine = Failure(f"rank {rank}: {type(error).__name__}: {error}", traceback.format_exc())
    parts = gather_to_zero(mine, world)
    if not trainer.is_global_zero:
        return
    try:
        failures = [part for part in parts if isinstance(part, Failure)]
        if failures:
            raise FiringFailed(failures)
        finish(parts)
    except Exception as error:
        if strict:
            raise
        detail = "".join(f.traceback for f in getattr(error, "failures", [])) or traceback.format_exc()
        rank_zero_warn(
            f"DeconvCallback: the {what} failed and was skipped ({error}); training goes on and the next firing "
            f"tries again. Pass strict=True to raise instead.\n{detail}"
        )
