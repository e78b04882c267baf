"""A real JupyterLab server and headless Chromium: a map's progress bar reaches 100% in the page."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import Processes, free_port, wait_until

#: Chromium from the system (Debian's package): playwright's own browser download is not used.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ITEMS = 2_000


def chromium() -> str:
    """The path of the system's chromium; fails (never skips) the test when it is missing."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not on PATH: install it with `apt-get install chromium` "
                    "(the README's test command does this when it is missing)")
    return path


def start_lab(procs: Processes, base: Path) -> str:
    """JupyterLab on a free 127.0.0.1 port with a token, its root, config, data, runtime and
    IPython dirs under base (nothing from the user's home), news and update checks off.
    Returns the URL of progress.ipynb (token included) once the server answers; procs stops
    the server (SIGTERM, which also shuts its kernels down, then SIGKILL if need be)."""
    dirs = {name: base / name for name in ("root", "config", "data", "runtime", "ipython")}
    for d in dirs.values():
        d.mkdir()
    (dirs["config"] / "labconfig").mkdir()
    (dirs["config"] / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    nbformat.write(new_notebook(cells=[
        new_code_cell("import nbq\n\nclient = nbq.Client(workers=2)"),
        new_code_cell(f"res = client.map(lambda x: x * x, range({ITEMS:_}), chunksize=50)\nres"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}}), dirs["root"] / "progress.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(dirs["config"]),
           "JUPYTER_DATA_DIR": str(dirs["data"]), "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
           "IPYTHONDIR": str(dirs["ipython"])}
    with open(base / "server.log", "w") as log:
        server = procs.start([sys.executable, "-m", "jupyterlab", "--no-browser",
                              "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                              "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                              f"--ServerApp.root_dir={dirs['root']}", "--ServerApp.allow_root=True",
                              "--LabApp.news_url=",
                              "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                             env=env, stdout=log)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert server.poll() is None, "jupyterlab exited:\n" + (base / "server.log").read_text()
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                return True
        except OSError:
            return False
    wait_until(answers, timeout=30, interval=0.1, what="jupyterlab to answer")
    return f"{url}/lab/tree/progress.ipynb?token={token}"


@pytest.mark.timeout(90)
def test_progress_widget_reaches_100_percent_in_jupyterlab(procs, tmp_path):
    """Open the notebook in JupyterLab, Run > Run All Cells, and read the bar from the DOM:
    green, labelled 100%, full width, and its text saying every item is done."""
    from playwright.sync_api import expect, sync_playwright
    browser_path = chromium()
    page_url = start_lab(procs, tmp_path)
    local = page_url.split("/lab/")[0]
    shot = tmp_path / "jupyterlab-progress.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 700})
            page.route("**/*", lambda route: route.continue_()        # nothing beyond 127.0.0.1
                       if route.request.url.startswith(local) else route.abort())
            page.goto(page_url)
            expect(page.locator("#jp-main-statusbar")).to_contain_text(     # the kernel is up
                "Python 3 (ipykernel) | Idle", timeout=45_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.locator('li[data-command="runmenu:run-all"]').click()
            text = page.locator(".widget-html-content")
            expect(text).to_contain_text(re.compile(rf"^{ITEMS:,} / {ITEMS:,} done, 0 failed"),
                                         timeout=45_000)
            bar = page.locator(".widget-hprogress")
            expect(bar.locator(".widget-label")).to_have_text("100%")
            fill = bar.locator(".progress-bar")
            expect(fill).to_have_class(re.compile(r"\bprogress-bar-success\b"))   # green
            expect(fill).to_have_attribute("style", re.compile(r"width: 100%"))
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    print(f"screenshot: {shot}")
