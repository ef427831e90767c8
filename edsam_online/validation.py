"""The range checks that config dataclasses share, so that every one words its error alike
(``"<field> must be >= <minimum>, got <value>"``, which ``load_config`` prefixes with the
group: ``trainer.steps: must be >= 1, got 0``)."""

from __future__ import annotations

import math


def require_at_least(obj: object, minimum: float, *names: str) -> None:
    """Raise ValueError for the first of ``obj``'s fields ``names`` below ``minimum``."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


def require_at_most(obj: object, maximum: float, *names: str) -> None:
    """Raise ValueError for the first of ``obj``'s fields ``names`` above ``maximum``."""
    for name in names:
        value = getattr(obj, name)
        if value > maximum:
            raise ValueError(f"{name} must be <= {maximum}, got {value}")


def require_positive(obj: object, *names: str) -> None:
    """Raise ValueError for the first of ``obj``'s fields ``names`` that is not a finite number > 0."""
    for name in names:
        value = getattr(obj, name)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
