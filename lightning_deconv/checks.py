"""Argument checks shared by the public functions and the callback: one message for one mistake."""

from __future__ import annotations

from typing import Any

__all__ = ["check_int"]


def check_int(value: Any, label: str, minimum: int | None = 1, optional: bool = False) -> None:
    """Fail clearly unless ``value`` is an integer (not a bool) of at least ``minimum`` (or ``None``, if
    ``optional``).

    Raises:
        TypeError: not an integer, e.g. ``"`batch_size` must be an integer, got str '4'."``
        ValueError: too small, e.g. ``"`batch_size` must be at least 1, got 0."``

    Example::

        >>> check_int(3, "k")
        >>> check_int(0, "k")
        Traceback (most recent call last):
        ...
        ValueError: `k` must be at least 1, got 0.
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{label}` must be an integer, got {type(value).__name__} {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{label}` must be at least {minimum}, got {value}.")
