"""%load_ext nbq, %nbq and %%remote on a real InteractiveShell against real workers."""
from __future__ import annotations

import base64
import os
import sys
import threading

import pytest

import nbq
from conftest import NOTEBOOKS, execute_notebook, wait_until

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from nbq.notebook.cellnames import analyze
from nbq.notebook.magics import RemoteCellError


@pytest.fixture
def shell(shared_client):
    """The IPython shell with the extension loaded and the shared client as its default."""
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "nbq")
    magics = sh.magics_manager.registry["NbqMagics"]
    magics.client = shared_client
    saved = dict(sh.user_ns)
    yield sh
    magics.client = None
    for name in set(sh.user_ns) - set(saved):
        del sh.user_ns[name]


def run(sh, cell: str):
    with capture_output() as cap:
        r = sh.run_cell(cell)
    return r, cap


# -- the AST pass -------------------------------------------------------------------

def test_analyze_handles_scopes():
    reads, assigns, imports = analyze(
        "import numpy as np\n"
        "from os import path as p\n"
        "ys = [x * k for x in xs if x > lo]\n"
        "def f(a, b=default):\n"
        "    global counter\n"
        "    counter = a + offset\n"
        "    return [b for b in range(a)]\n"
        "g = lambda q: q + shift\n"
        "total += 1\n"
        "class C(Base):\n"
        "    attr = cls_src\n"
        "    def m(self):\n"
        "        return self\n"
        "try:\n    pass\nexcept Exception as err:\n    pass\n")
    assert {"xs", "lo", "k", "default", "offset", "shift", "total", "Base", "cls_src"} <= reads
    assert not {"x", "a", "b", "q", "self"} & reads
    assert {"np", "p", "ys", "f", "g", "counter", "total", "C", "err"} <= assigns
    assert not {"x", "a", "q", "attr", "m"} & assigns
    assert imports == {"np", "p"}


# -- %%remote -------------------------------------------------------------------------

def test_namespace_round_trip(shell):
    import json
    shell.user_ns.update(a=5, scale=3, mod=json)
    r, cap = run(shell, "%%remote\n"
                        "import math\n"
                        "ys = [a * i for i in range(4)]\n"
                        "def f(x):\n"
                        "    return x * scale\n"
                        "z = f(a) + math.floor(2.5)\n"
                        "s = mod.dumps({'a': a})\n"
                        "a = a + 1\n")
    assert r.success, (r.error_in_exec, cap.stdout, cap.stderr)
    ns = shell.user_ns
    assert ns["ys"] == [0, 5, 10, 15] and ns["z"] == 17 and ns["s"] == '{"a": 5}'
    assert ns["a"] == 6 and ns["scale"] == 3
    assert ns["math"].floor(1.5) == 1     # the cell's import, brought back by name
    assert ns["f"](2) == 6                # a function defined remotely works here


def test_stdout_and_stderr_appear_in_order(shell):
    r, cap = run(shell, "%%remote\nimport sys\nprint('one')\nprint('two', file=sys.stderr)\n"
                        "print('three')\n")
    assert r.success
    assert cap.stdout == "one\nthree\n" and cap.stderr == "two\n"


#: The end of a cell that waits (10 s at most) for the file `go`, then says whether it came.
WAIT_FOR_GO = ("import os, time\nt0 = time.monotonic()\n"
               "while not os.path.exists(go) and time.monotonic() - t0 < 10:\n"
               "    time.sleep(0.01)\n"
               "print('released' if os.path.exists(go) else 'not streamed')\n")


def run_streaming(sh, cell: str, first: str, go):
    """Run a cell ending in WAIT_FOR_GO, creating go only once `first` has reached this
    process's stdout: the cell prints 'released' only if its output streamed."""
    sh.user_ns["go"] = str(go)
    with capture_output() as cap:
        def release():
            try:
                wait_until(lambda: first in cap.stdout, timeout=15, what="streamed output")
            finally:
                if first in cap.stdout:
                    go.touch()
        t = threading.Thread(target=release)
        t.start()
        r = sh.run_cell(cell)
        t.join()
    return r, cap


def test_output_streams_while_the_cell_runs(shell, tmp_path):
    r, cap = run_streaming(shell, "%%remote\nprint('first')\n" + WAIT_FOR_GO, "first",
                           tmp_path / "go")
    assert r.success
    assert cap.stdout == "first\nreleased\n"


def test_a_matplotlib_figure_comes_back_as_png_and_output_keeps_streaming(shell, tmp_path):
    """display(fig) and a figure as the last expression give image/png bundles (Agg on the
    worker); the print after display(fig) still streams."""
    cell = ("%%remote\nimport matplotlib\nmatplotlib.use('Agg')\n"
            "import matplotlib.pyplot as plt\n"
            "fig, ax = plt.subplots(figsize=(3, 2))\nax.plot([1, 3, 2])\n"
            "display(fig)\nprint('after the figure')\n" + WAIT_FOR_GO + "fig\n")
    r, cap = run_streaming(shell, cell, "after the figure", tmp_path / "go")
    assert r.success, cap.stderr
    assert cap.stdout == "after the figure\nreleased\n"
    assert len(cap.outputs) == 2
    for out in cap.outputs:
        assert base64.b64decode(out.data["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
        assert "Figure size 300x200" in out.data["text/plain"]


def test_display_and_last_expression_are_rich(shell):
    import pandas as pd
    shell.user_ns["pd"] = pd
    r, cap = run(shell, "%%remote\n"
                        "df = pd.DataFrame({'x': [1, 2], 'y': ['a', 'b']})\n"
                        "display(df.head(1))\n"
                        "from IPython.display import display as d2, HTML\n"
                        "d2(HTML('<b>bold</b>'))\n"
                        "df.describe()\n")
    assert r.success, cap.stderr
    kinds = [o.data for o in cap.outputs]
    assert len(kinds) == 3
    assert "<table" in kinds[0]["text/html"] and "text/plain" in kinds[0]
    assert kinds[1]["text/html"] == "<b>bold</b>"
    assert "count" in kinds[2]["text/html"] and "mean" in kinds[2]["text/plain"]
    assert list(shell.user_ns["df"]["x"]) == [1, 2]


def test_remote_exception_fails_the_cell_with_the_remote_traceback(shell):
    r, cap = run(shell, "%%remote\n"
                        "print('before')\n"
                        "def g(v):\n"
                        "    return 1 / v\n"
                        "bad = g(0)\n")
    assert not r.success
    assert isinstance(r.error_in_exec, RemoteCellError)
    assert "before" in cap.stdout
    tb = r.error_in_exec.remote_traceback
    assert "ZeroDivisionError" in tb
    assert "line 5" in tb and "line 4, in g" in tb and "return 1 / v" in tb
    assert "bad" not in shell.user_ns


def queued(client, queue: str) -> int:
    """Tasks the broker holds in queue (one no worker serves: a task sent there stays)."""
    return client.status()["queues"].get(queue, 0)


def test_unpicklable_name_fails_before_sending(shell, shared_client):
    shell.user_ns["lock"] = threading.Lock()
    r, cap = run(shell, "%%remote --queue unpicklable-test\nwith lock:\n    got = 1\n")
    assert not r.success
    msg = str(r.error_in_exec)
    assert "'lock'" in msg and "nothing was sent" in msg
    assert queued(shared_client, "unpicklable-test") == 0     # no task reached the broker
    assert "got" not in shell.user_ns


def test_syntax_error_sends_nothing(shell, shared_client):
    r, cap = run(shell, "%%remote --queue syntax-error-test\nx = (1,\n")
    assert not r.success
    assert queued(shared_client, "syntax-error-test") == 0


def test_bg_returns_at_once_leaving_a_future(shell, tmp_path):
    """The cell waits for a file the test writes only after run_cell returned: a --bg that
    waited for the cell would return with its task done (after WAIT_FOR_GO gave up)."""
    go = tmp_path / "go"
    shell.user_ns["go"] = str(go)
    r, cap = run(shell, "%%remote --bg\n" + WAIT_FOR_GO + "late = 42\n")
    fut = shell.user_ns["_"]
    assert r.success and isinstance(fut, nbq.Future)
    assert not fut.done() and "late" not in shell.user_ns
    go.touch()
    assert fut.result(timeout=30).error is None
    wait_until(lambda: shell.user_ns.get("late") == 42, what="the name bound after --bg")


def test_interrupt_cancels_a_task_not_yet_started(shell, shared_client):
    """Ctrl-C (SIGINT) while the cell waits: the cell fails and its queued task is revoked."""
    import os
    import signal
    magics = shell.magics_manager.registry["NbqMagics"]
    magics.last = None

    def interrupt():
        # the broker holds the cell's task: the submit is a broker round trip behind, and the
        # cell is waiting for its result (the signal must land in that wait)
        wait_until(lambda: magics.last is not None and queued(shared_client, "nobody-serves-this"),
                   what="the cell's task queued at the broker")
        os.kill(os.getpid(), signal.SIGINT)
    t = threading.Thread(target=interrupt)
    t.start()
    r, cap = run(shell, "%%remote --queue nobody-serves-this --timeout 20\nnever = 1\n")
    t.join()
    assert not r.success and isinstance(r.error_in_exec, KeyboardInterrupt)
    assert magics.last.state == nbq.REVOKED and magics.last.cancelled()


def test_timeout(shell):
    r, cap = run(shell, "%%remote --timeout 0.3\nimport time\ntime.sleep(2)\n")
    assert not r.success and "no result within 0.3 s" in str(r.error_in_exec)


def test_all_runs_once_on_every_process(shell, shared_client):
    procs = {f"{w['host']}:{p}" for w in shared_client.workers() for p in w["processes"]}
    r, cap = run(shell, "%%remote --all\nimport os\npid = os.getpid()\nprint('pid', pid)\n")
    assert r.success, cap.stderr
    pids = shell.user_ns["pid"]
    assert set(pids) == procs and len(procs) == 2
    assert all(key.endswith(f":{pid}") for key, pid in pids.items())
    for key, pid in pids.items():
        assert f"[{key}]\npid {pid}\n" in cap.stdout


# -- %nbq ---------------------------------------------------------------------------

def test_nbq_connect_status_workers_shutdown():
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "nbq")
    magics = sh.magics_manager.registry["NbqMagics"]
    with capture_output() as cap:
        sh.run_line_magic("nbq", "connect --workers 1")
    client = magics.client
    try:
        assert "connected to tcp://" in cap.stdout
        with capture_output() as cap:
            sh.run_line_magic("nbq", "status")
        data = cap.outputs[0].data
        assert "1 workers" in data["text/plain"] and "queues:" in data["text/plain"]
        assert "<table>" in data["text/html"]
        with capture_output() as cap:
            sh.run_line_magic("nbq", "workers")
        assert str(client.workers()[0]["pid"]) in cap.outputs[0].data["text/plain"]
        with capture_output() as cap:
            r = sh.run_cell("%%remote\nanswer = 6 * 7\n")
        assert r.success and sh.user_ns.pop("answer") == 42
    finally:
        with capture_output():
            sh.run_line_magic("nbq", "shutdown")
    assert magics.client is None
    with pytest.raises(RuntimeError, match="after shutdown"):
        client.submit(abs, 1)


# -- the %%remote notebook on a real kernel ------------------------------------------------

@pytest.mark.timeout(120)
def test_remote_notebook_runs_on_a_real_kernel(tmp_path):
    """notebooks/remote.ipynb on the venv's ipykernel: streams, HTML, --all, --bg, and the
    one error (in the cell tagged raises-exception) with the cell's own line numbers."""
    nb = execute_notebook(NOTEBOOKS / "remote.ipynb", tmp_path)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = [(c, o) for c in cells for o in c.outputs if o.output_type == "error"]
    assert len(errors) == 1
    cell, err = errors[0]
    assert "raises-exception" in cell.metadata.get("tags", [])
    assert err.ename == "RemoteCellError" and "line 7, in <module>" in "".join(err.traceback)
    html = [o.data["text/html"] for c in cells for o in c.outputs if "text/html" in o.get("data", {})]
    assert sum("<table" in h for h in html) >= 3           # status table, head(), describe()
    streamed = "".join(o.get("text", "") for c in cells for o in c.outputs
                       if o.output_type == "stream")
    assert "computed on process" in streamed and streamed.count("hello from") == 2
    results = [o.data["text/plain"] for c in cells for o in c.outputs
               if o.output_type == "execute_result"]
    assert "(81, (10, 2))" in results and "42" in results
    assert any(r.startswith("{") and r.count(":") == 4 for r in results), results  # pid per worker


def test_client_rich_repr_lists_broker_workers_and_queues(shared_client):
    bundle = shared_client._repr_mimebundle_()
    (w,) = shared_client.workers()
    assert "<table" in bundle["text/html"] and str(w["pid"]) in bundle["text/html"]
    assert shared_client.address in bundle["text/plain"] and "queues" in bundle["text/plain"]


@pytest.mark.parametrize("transport", ["zmq", "redis"])
def test_output_streams_live_from_a_separate_worker_process(transport, procs, tmp_path):
    """The cell runs on an `nbq worker` started apart, under another host name (its own UTS
    namespace: as on another machine, nothing but the broker in common with the kernel), and
    its output still streams while it runs."""
    from conftest import standalone_broker
    address = standalone_broker(transport, procs)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    procs.start(["unshare", "--uts", "sh", "-c", "hostname labhost-2 && exec "
                 f"{sys.executable} -m nbq worker --broker {address} -c 1"], env=env)
    with nbq.Client(address) as client:
        client.wait_for_workers(1)
        sh = InteractiveShell.instance()
        sh.run_line_magic("load_ext", "nbq")
        magics = sh.magics_manager.registry["NbqMagics"]
        magics.client = client
        try:
            r, cap = run_streaming(sh, "%%remote\nimport socket\nprint('first', socket.gethostname())\n"
                                   + WAIT_FOR_GO, "first", tmp_path / "go")
        finally:
            magics.client = None
    assert r.success, cap.stderr
    assert cap.stdout.endswith("released\n")
    assert cap.stdout.split()[1] == "labhost-2"
