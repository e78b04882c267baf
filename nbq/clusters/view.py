"""A cluster's live display: an ipywidgets HTML table redrawn every second while it is open.

The drawing thread holds the cluster weakly and ends when the cluster closes (after a
last draw saying so) or is collected; close() itself draws it closed first (table.show_closed).  This module imports ipywidgets; nothing imports
it until a cluster is displayed.
"""
from __future__ import annotations

import logging
import threading
import weakref

import ipywidgets

from .table import views

log = logging.getLogger("nbq.cluster")

INTERVAL = 1.0


def live_view(cluster, table: str) -> dict:
    """The widget's display bundle, its table first drawn as ``table``."""
    widget = ipywidgets.HTML(table)
    views.setdefault(cluster, []).append(lambda c: _draw(c, widget))
    threading.Thread(target=_redraw, args=(weakref.ref(cluster), widget),
                     name="nbq-cluster-view", daemon=True).start()
    return widget._repr_mimebundle_()


def _redraw(ref: "weakref.ref", widget: ipywidgets.HTML) -> None:
    stop = threading.Event()
    while not stop.wait(INTERVAL):
        cluster = ref()
        if cluster is None:
            return
        closed = cluster._closed  # read before drawing: the last draw shows it closed
        _draw(cluster, widget)
        if closed:
            return
        del cluster


def _draw(cluster, widget: ipywidgets.HTML) -> None:
    try:
        widget.value = cluster._repr_html_()
    except Exception:  # a broker busy or gone: the next draw tries again
        log.debug("could not redraw the cluster's table", exc_info=True)
