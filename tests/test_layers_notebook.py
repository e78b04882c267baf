"""The notebook layer stays above the rest: workers run remote cells without IPython's
magics, and importing nbq loads no notebook machinery and patches no module."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output


def test_a_worker_runs_a_remote_cell_without_ipython_or_the_magics(client):
    """A fresh worker process unpickles remote_cell from nbq.notebook.remotecell alone:
    the cell sees neither IPython (its magics above all) nor nbq's magics loaded."""
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "nbq")
    magics = sh.magics_manager.registry["NbqMagics"]
    magics.client = client
    try:
        with capture_output() as cap:
            r = sh.run_cell(
                "%%remote\nimport os, sys\npid = os.getpid()\n"
                "loaded = sorted(m for m in ('IPython', 'IPython.core.magic', 'ipywidgets',\n"
                "                            'nbq.magics', 'nbq.notebook.magics') "
                "if m in sys.modules)\n")
        assert r.success, (r.error_in_exec, cap.stdout, cap.stderr)
        assert sh.user_ns["pid"] != os.getpid()       # it ran in a worker process
        assert sh.user_ns["loaded"] == []
    finally:
        magics.client = None
        for name in ("pid", "loaded"):
            sh.user_ns.pop(name, None)


def test_importing_nbq_loads_no_notebook_machinery_and_patches_no_module():
    code = ("import sys, types, nbq\n"
            "print(type(sys.modules['nbq.client.progress']) is types.ModuleType, callable(nbq.progress))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('IPython', 'ipywidgets', 'pandas') or m.startswith('nbq.notebook')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["True True", "[]"], out.stdout


def test_the_kernel_progress_display_is_the_widget_entry_point():
    from nbq.notebook.widgets import widget_progress
    (ep,) = entry_points(group="nbq.display", name="jupyter")
    assert ep.load() is widget_progress
