"""A cluster's display: an HTML table of its units (host, processes, state, active tasks,
memory), and in Jupyter the live view of view.py around it."""
from __future__ import annotations

import html
import weakref
from typing import TYPE_CHECKING, Callable

from ..client.status import dashboard_link

if TYPE_CHECKING:
    from .base import Cluster

#: cluster -> a draw(cluster) for each of its live tables (view.py), for show_closed
views: "weakref.WeakKeyDictionary[Cluster, list[Callable[[Cluster], None]]]" = \
    weakref.WeakKeyDictionary()


def show_closed(cluster: "Cluster") -> None:
    """Redraw a closing cluster's live tables from the thread closing it: the cell that closed
    it shows it closed at once, and a notebook saved then has it so."""
    for draw in views.pop(cluster, ()):
        draw(cluster)


def html_table(cluster: "Cluster") -> str:
    """The cluster's address, size, adapt range and a row per unit, as HTML."""
    rows = "".join(
        f"<tr><td>{html.escape(w['host'])}</td><td>{w['processes']}</td>"
        f"<td>{html.escape(w['state'])}</td><td>{w['active']}</td>"
        f"<td>{_size(w['memory'])}</td></tr>" for w in cluster.workers)
    adapter = cluster._adapter
    return (f"<b>{type(cluster).__name__}</b> {html.escape(cluster.address)}: "
            + ("closed" if cluster._closed
               else f"{cluster.processes} worker processes{dashboard_link(cluster.address)}")
            + (f", adapting {adapter.minimum}..{adapter.maximum}" if adapter else "")
            + "<table><tr><th>host</th><th>processes</th><th>state</th><th>active</th>"
              f"<th>memory</th></tr>{rows}</table>")


def bundle(cluster: "Cluster") -> dict:
    """The display bundle: in Jupyter, the table redraws every second while the cluster is
    open (view.py); the static table is there too, for a saved notebook."""
    table = cluster._repr_html_()
    try:
        from .view import live_view
    except ImportError:  # no ipywidgets: the table as it is now
        return {"text/html": table, "text/plain": repr(cluster)}
    return {**live_view(cluster, table), "text/html": table, "text/plain": repr(cluster)}


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
