"""One wording for every "pick one of these" refusal in the library."""
from __future__ import annotations

from collections.abc import Iterable


def choice_error(what: str, value: object, allowed: Iterable[str]) -> ValueError:
    """``unknown <what> <value>; allowed: a, b, c``."""
    return ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def check_choice(what: str, value: object, allowed: Iterable[str]) -> None:
    """Refuse ``value`` unless it is one of ``allowed`` (unhashable values are refused too)."""
    allowed = tuple(allowed)
    try:
        known = value in allowed
    except TypeError:
        known = False
    if not known:
        raise choice_error(what, value, allowed)
