"""A listener that raises is logged; the others still hear (cluster/listeners.py)."""

from __future__ import annotations

import logging

from cluster.listeners import notify


def test_a_failing_listener_does_not_stop_the_others(caplog):
    heard = []

    def broken(item):
        raise KeyError("a metrics bug")

    with caplog.at_level(logging.ERROR):
        notify([heard.append, broken, heard.append], 7, "engine step")
    assert heard == [7, 7]
    assert "engine step listener failed" in caplog.text and "a metrics bug" in caplog.text
