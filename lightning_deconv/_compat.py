"""Compatibility: one callback class for both Lightning packages.

Lightning ships the same Trainer twice, as ``lightning.pytorch`` and as the standalone
``pytorch_lightning``; each Trainer only accepts callbacks that subclass *its own* ``Callback``. A
callback built on :func:`callback_bases` subclasses every ``Callback`` that imports, so it works with
either Trainer, and with only one of the packages installed.
"""

from __future__ import annotations

__all__ = ["callback_bases", "override", "rank_zero_info", "rank_zero_warn"]

try:
    from typing_extensions import override
except ImportError:  # pragma: no cover - typing_extensions ships with torch and lightning

    def override(method):  # type: ignore[no-redef]
        return method


try:
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
except ImportError:  # pragma: no cover - only the standalone package is installed
    from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn  # type: ignore[no-redef]


def callback_bases() -> tuple[type, ...]:
    """The ``Callback`` base classes of the installed Lightning packages, ``lightning.pytorch``'s first.

    Raises:
        ImportError: if neither ``lightning`` nor ``pytorch_lightning`` is installed.

    Example::

        >>> class MyCallback(*callback_bases()):
        ...     pass
    """
    bases: list[type] = []
    try:
        from lightning.pytorch import Callback

        bases.append(Callback)
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback as StandaloneCallback

        bases.append(StandaloneCallback)
    except ImportError:
        pass
    if not bases:
        raise ImportError("Install `lightning` or `pytorch_lightning` to use the lightning-deconv callbacks.")
    return tuple(bases)
