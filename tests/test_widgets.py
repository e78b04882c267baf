"""The ipywidgets progress display on real maps, and the text fallbacks."""
from __future__ import annotations

import time

import pytest

import nbq
from conftest import NOTEBOOKS, execute_notebook, wait_until, widget_states
from nbq.notebook.widgets import ProgressWidget, widget_progress
from nbq.client.progress import FuturesProgress, TextBar


def square(x):
    return x * x


def fail_on_3(x):
    if x % 10 == 3:
        raise ValueError(f"bad {x}")
    return x


def test_widget_state_after_a_real_map(shared_client):
    res = shared_client.map(square, range(200), chunksize=10)
    w = widget_progress(res, display=False)
    res.result(timeout=30)
    wait_until(lambda: w.bar.bar_style == "success", what="the final draw")
    assert w.bar.value == 200 and w.bar.max == 200
    assert w.bar.description == "100%"
    assert "200 / 200 done" in w.text.value and "0 failed" in w.text.value
    assert "ETA" not in w.text.value and "elapsed" in w.text.value
    with pytest.raises(ValueError):         # detached once finished: nothing to remove
        res.remove_listener(w)
    assert "100%" in w.plain() and "200/200 done" in w.plain()
    bundle = w._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == w.box.model_id
    assert "200/200 done" in bundle["text/plain"]
    w.close()


def test_widget_turns_red_on_failures(shared_client):
    res = shared_client.map(fail_on_3, range(100), chunksize=7)
    w = widget_progress(res, display=False)
    wait_until(res.done, timeout=30, what="the map")
    wait_until(lambda: w.bar.value == 100, what="the final draw")
    assert w.bar.bar_style == "danger"
    assert "10 failed" in w.text.value and "100 / 100 done" in w.text.value
    assert "10 failed" in w.plain()
    w.close()


def test_widget_made_after_the_map_finished_shows_the_end(shared_client):
    res = shared_client.map(square, range(20))
    res.result(timeout=30)
    w = widget_progress(res, display=False)
    assert (w.bar.value, w.bar.bar_style, w.draws) == (20, "success", 1)
    w.close()


def test_throttle_for_a_100k_item_map(shared_client):
    t0 = time.monotonic()
    res = shared_client.map(square, range(100_000), chunksize=100)
    w = widget_progress(res, display=False)
    changes = []
    w.bar.observe(lambda ch: changes.append(ch["new"]), names="value")
    res.result(timeout=60)
    wait_until(lambda: w.bar.bar_style == "success", what="the final draw")
    elapsed = time.monotonic() - t0
    limit = elapsed * 10 + 4
    assert w.draws <= limit, (w.draws, elapsed)
    assert len(changes) <= limit
    assert changes[-1] == 100_000 and w.bar.value == 100_000
    print(f"100,000 items in {elapsed:.2f} s: {w.draws} draws, limit {limit:.0f}")
    w.close()


def test_a_pause_is_drawn_by_the_timer():
    """A call skipped by the throttle is drawn later even if no other call comes."""
    class Fake:  # a stand-in result whose counts the test controls
        id = "x"
        def __init__(self): self.c = {"done": 0, "failed": 0, "total": 10, "elapsed": 1.0, "rate": 0.0}
        def counts(self): return dict(self.c)
        def add_listener(self, fn): pass
        def remove_listener(self, fn): pass
    fake = Fake()
    w = ProgressWidget(fake)
    fake.c["done"] = 5
    w(fake)                           # within MIN_INTERVAL of the first draw: skipped now
    wait_until(lambda: w.bar.value == 5, timeout=2, what="the late draw")
    w.close()


def test_progress_of_a_list_of_futures(shared_client):
    futs = [shared_client.submit(fail_on_3, i) for i in range(12)]
    w = widget_progress(FuturesProgress(futs), display=False)
    wait_until(lambda: w.bar.value == 12, timeout=30, what="all futures")
    assert w.bar.bar_style == "danger" and "1 failed" in w.text.value
    w.close()


def test_nbq_progress_outside_a_kernel_draws_a_text_bar(shared_client, capsys):
    futs = [shared_client.submit(square, i) for i in range(5)]
    bar = nbq.progress(futs)
    assert isinstance(bar, TextBar)
    err: list[str] = []
    wait_until(lambda: err.append(capsys.readouterr().err) or "5/5 done" in "".join(err),
               timeout=30, what="the text bar's last line")


def test_mapresult_text_fallback(shared_client):
    res = shared_client.map(fail_on_3, range(10))
    wait_until(res.done, timeout=30, what="the map")
    text = res._repr_mimebundle_()["text/plain"]
    assert res.id in text and "10/10 done" in text and "1 failed" in text


def test_displaying_a_mapresult_in_a_terminal_shell_shows_the_counts(shared_client):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    shell = InteractiveShell.instance()
    res = shared_client.map(square, range(10))
    res.result(timeout=30)
    shell.user_ns["res"] = res
    with capture_output() as cap:
        r = shell.run_cell("res")
    assert r.success
    assert any("10/10 done" in o.data.get("text/plain", "") for o in cap.outputs), cap.outputs


# -- the example notebook on a real kernel ---------------------------------------------

@pytest.mark.timeout(120)
def test_quickstart_notebook_runs_on_a_real_kernel(tmp_path):
    """nbclient runs notebooks/quickstart.ipynb top to bottom on the venv's ipykernel:
    no errors, the map's bar saved green at 2,000/2,000 (widget state and text/plain)."""
    nb = execute_notebook(NOTEBOOKS / "quickstart.ipynb", tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    bars = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    texts = [o.data["text/plain"] for o in bars]
    assert any("100% 2,000/2,000 done" in t for t in texts), texts
    assert any("50/50 done" in t for t in texts), texts
    assert any("7 failed" in t for t in texts), texts
    assert len(bars) == 3, texts          # each bar shown once
    states = widget_states(nb)
    progress = [s["state"] for s in states.values() if s["model_name"] == "IntProgressModel"]
    assert {(p["value"], p["max"], p["bar_style"]) for p in progress} >= {
        (2000, 2000, "success"), (50, 50, "success"), (49, 49, "danger")}, progress


class _ClosedWhileDrawn:
    """A cluster as the live view sees it, closed by another thread during its second draw."""

    def __init__(self) -> None:
        self._closed, self.draws = False, 0

    def _repr_html_(self) -> str:
        self.draws += 1
        html = "closed" if self._closed else "open"
        if self.draws == 2:
            self._closed = True  # close() ran while this table was being drawn
        return html


def test_a_cluster_table_closed_during_a_draw_is_redrawn_closed(monkeypatch):
    import weakref

    import ipywidgets

    from nbq.clusters import view
    monkeypatch.setattr(view, "INTERVAL", 0.01)
    cluster, widget = _ClosedWhileDrawn(), ipywidgets.HTML("first")
    view._redraw(weakref.ref(cluster), widget)  # returns after its last draw
    assert widget.value == "closed" and cluster.draws == 3


def test_closing_a_cluster_redraws_its_live_table_at_once(monkeypatch):
    """close() draws the table closed from its own thread (the closing cell's), not a second
    later from the view's thread (whose output a notebook run may have stopped recording)."""
    from ipywidgets.widgets.widget import _instances

    from nbq.clusters import view
    from nbq.clusters.base import Cluster
    monkeypatch.setattr(view, "INTERVAL", 3600)  # only close() can redraw it here
    cluster = Cluster()  # an embedded broker, no workers
    try:
        bundle = cluster._repr_mimebundle_()
        widget = _instances[bundle["application/vnd.jupyter.widget-view+json"]["model_id"]]
        assert "closed" not in widget.value
    finally:
        cluster.close()
    assert "<b>Cluster</b>" in widget.value and "closed" in widget.value, widget.value
