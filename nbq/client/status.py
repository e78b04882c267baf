"""A broker's workers and queues as text and HTML: %nbq status and the Client's rich repr."""
from __future__ import annotations

import html
import os
from urllib.parse import urlencode

from ..transport import is_memory

#: The dashboard's path under the Jupyter server (base_url included), set by nbq.jupyter_ext
#: in the server's environment and so in the kernels it starts.
DASHBOARD_ENV = "NBQ_DASHBOARD_URL"


def dashboard_link(address: str) -> str:
    """An HTML link to the dashboard of the broker at address inside Jupyter, when this runs
    in a kernel of a Jupyter server with nbq's extension (else '')."""
    base = os.environ.get(DASHBOARD_ENV)
    if not base or is_memory(address):
        return ""
    url = f"{base}?{urlencode({'broker': address})}"
    return f' <a href="{html.escape(url)}" target="_blank" class="nbq-dashboard">dashboard</a>'


def status_bundle(address: str, st: dict, workers_only: bool = False) -> dict:
    """text/plain and text/html of a broker's info reply (Client.status())."""
    rows = [(w["id"], w["host"], w["pid"], w["concurrency"], w["active"],
             ",".join(w.get("queues", []))) for w in st["workers"]]
    head = ("worker", "host", "pid", "processes", "active", "queues")
    lines = [f"nbq broker {address}: {len(rows)} workers"]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for r in [head, *rows]:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>"
                    for r in rows)
    table = ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead>"
             f"<tbody>{cells}</tbody></table>")
    title = f"<b>nbq broker</b> <code>{html.escape(address)}</code>{dashboard_link(address)}"
    if not workers_only:
        queues = st.get("queues", {})
        lines.append("queues: " + (", ".join(f"{q}={n}" for q, n in queues.items()) or "none")
                     + f"; tasks {st.get('tasks', 0)}, results stored {st.get('results', 0)}")
        table += ("<p>queues: " + (", ".join(f"{html.escape(q)}: {n}" for q, n in queues.items())
                                   or "none")
                  + f"; tasks {st.get('tasks', 0)}, results stored {st.get('results', 0)}</p>")
    return {"text/plain": "\n".join(lines), "text/html": f"{title}{table}"}
