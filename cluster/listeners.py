"""Telling listeners (metrics, tests) what happened, without letting them break what happened."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def notify(listeners: Iterable[Callable[[T], None]], item: T, what: str) -> None:
    """Call every listener with `item`; one that raises is logged and the others still hear of it
    (a metrics bug must never take the engine or its workers down)."""
    for listener in listeners:
        try:
            listener(item)
        except Exception:
            log.exception("%s listener failed", what)
