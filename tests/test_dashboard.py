"""nbq dashboard on a real broker and worker, in headless Chromium: standalone (`nbq dashboard`)
and inside a real JupyterLab at /nbq/ (the server extension nbq's wheel enables)."""
from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import nbq
from conftest import Processes, free_port, start_broker, wait_until
from test_jupyterlab import CHROMIUM_ARGS, chromium

REPO = Path(__file__).resolve().parent.parent
SHOTS = os.environ.get("NBQ_DASHBOARD_SHOTS")   # a directory: also save the screenshots there


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A broker and a worker of 2 processes (subprocesses), and a Client on it."""
    procs = Processes(tmp_path_factory.mktemp("dash"))
    address = start_broker(procs)
    procs.nbq("worker", "--broker", address, "--concurrency", "2", "-n", "dash@test")
    client = nbq.Client(address)
    client.wait_for_workers(2)
    yield address, client, procs
    client.shutdown(wait=False)
    procs.stop_all()


def start_dashboard(procs: Processes, address: str) -> str:
    """`nbq dashboard` on a free loopback port; its URL, token included, as it prints it."""
    p = procs.nbq("dashboard", "--broker", address, "--bind", "127.0.0.1:0")
    for line in p.stdout:
        if "http://" in line:
            return line.strip()
    raise AssertionError(f"nbq dashboard exited: {p.wait()}")


def get(url: str, **headers) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def snapshot(url: str) -> dict:
    base, token = url.split("/?token=")
    return json.loads(get(f"{base}/api/snapshot?token={token}")[1])


def processes(client: nbq.Client) -> int:
    return sum(len(r["pool"]["processes"]) for r in client.control("stats").values())


def save(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name))
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / name))


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright
    path = chromium()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.timeout(60)
def test_standalone_shows_workers_a_moving_map_and_grows_the_pool(cluster, browser, tmp_path):
    """The workers page lists the worker's 2 processes; the maps page shows a running map's
    done count move to the end; '+1 process' on the page grows the pool (seen through
    Client.control('stats'), as `nbq inspect stats` sees it); the rate limit form sets one
    on the worker; Revoke in a held task's detail revokes it (its future ends)."""
    from playwright.sync_api import expect
    address, client, procs = cluster
    url = start_dashboard(procs, address)
    page = browser.new_page(viewport={"width": 1300, "height": 500})
    page.goto(url)
    row = page.locator("#workers tbody tr", has_text="dash@test")
    expect(row.locator("td.processes")).to_have_text("2", timeout=10_000)

    res = client.map(time.sleep, [0.01] * 300, chunksize=5)   # nothing for workers to import
    page.click("nav a[data-tab=maps]")
    text = page.locator(f'#maps tr[data-map="{res.id}"] .map-text')
    seen = set()

    def finished() -> bool:
        found = re.match(r"([\d,]+)/", text.inner_text()) if text.count() else None
        if found:
            done = int(found.group(1).replace(",", ""))
            if 0 < done < 300 and not any(0 < n < 300 for n in seen):
                save(page, tmp_path, "dashboard.png")    # the map half way
            seen.add(done)
        return 300 in seen
    wait_until(finished, timeout=30, interval=0.05, what="the map's progress to reach 300")
    res.result(10)
    assert len([n for n in seen if 0 < n < 300]) >= 1, f"no progress seen between: {seen}"
    expect(page.locator(f'#maps tr[data-map="{res.id}"] .bar.success')).to_be_visible()

    page.click("nav a[data-tab=workers]")
    before = processes(client)
    row.get_by_role("button", name="+1 process").click()
    expect(page.locator("#notice")).to_contain_text("pool will grow")
    wait_until(lambda: processes(client) == before + 1, timeout=15, what="the pool to grow")
    expect(row.locator("td.processes")).to_have_text(str(before + 1), timeout=10_000)
    save(page, tmp_path, "dashboard-workers.png")
    client.control("pool_shrink", {"n": 1})
    wait_until(lambda: processes(client) == before, timeout=15, what="the pool to shrink back")

    page.fill("#rate-form input[name=task_name]", "builtins.abs")
    page.fill("#rate-form input[name=rate_limit]", "100/s")
    page.click("#rate-form button")
    expect(page.locator("#notice")).to_contain_text("new rate limit set successfully")
    client.control("rate_limit", {"task_name": "builtins.abs", "rate_limit": None})

    held = client.submit(abs, -1, queue="unserved")   # waits at the broker: no worker takes it
    page.click("nav a[data-tab=tasks]")
    page.fill("#task-filter input[name=q]", held.id)
    page.click("#task-filter button")
    page.locator(f'#tasks tr[data-task="{held.id}"] a.task').click()
    page.locator("#task-detail").get_by_role("button", name="Revoke").click()
    expect(page.locator("#notice")).to_contain_text('"revoked":true')
    wait_until(held.done, timeout=10, what="the revoked task's future to end")
    assert held.cancelled() or held.exception() is not None


def start_jupyterlab(procs: Processes, base: Path) -> tuple[str, str]:
    """JupyterLab with its dirs under base, the repository's jupyter-config/ on the config
    path (the file the wheel installs in etc/jupyter enables nbq's server extension, no flag
    does) and the prebuilt side panel where the wheel puts it (share/jupyter/labextensions).
    Returns its URL and token once it answers."""
    dirs = {name: base / name for name in ("root", "config", "data", "runtime", "path")}
    for d in dirs.values():
        d.mkdir()
    (dirs["path"] / "labextensions" / "@nbq").mkdir(parents=True)   # as the wheel installs it
    (dirs["path"] / "labextensions" / "@nbq" / "jupyterlab-dashboard").symlink_to(
        REPO / "nbq" / "jupyter_ext" / "labextension")
    (dirs["config"] / "labconfig").mkdir()
    (dirs["config"] / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(dirs["config"]),
           "JUPYTER_CONFIG_PATH": str(REPO / "jupyter-config"), "JUPYTER_PATH": str(dirs["path"]),
           "JUPYTER_DATA_DIR": str(dirs["data"]), "JUPYTER_RUNTIME_DIR": str(dirs["runtime"])}
    with open(base / "server.log", "w") as log:
        server = procs.start([sys.executable, "-m", "jupyterlab", "--no-browser",
                              "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                              "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                              f"--ServerApp.root_dir={dirs['root']}", "--ServerApp.allow_root=True",
                              "--ServerApp.base_url=/user/someone/", "--LabApp.news_url=",
                              "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                             env=env, stdout=log)
    url = f"http://127.0.0.1:{port}/user/someone"

    def answers() -> bool:
        assert server.poll() is None, "jupyterlab exited:\n" + (base / "server.log").read_text()
        try:
            return get(f"{url}/api/status?token={token}")[0] == 200
        except OSError:   # not listening yet
            return False
    wait_until(answers, timeout=30, interval=0.1, what="jupyterlab to answer")
    return url, token


@pytest.mark.timeout(60)
def test_inside_jupyterlab_with_its_token(cluster, browser, tmp_path):
    """At <base_url>/nbq/ under JupyterLab (a JupyterHub-like base_url): the page shows the
    worker with Jupyter's token; without it, or with a wrong one, 403 and no data. In the Lab,
    the side panel shows that broker's worker, its button opens the dashboard in a Lab tab,
    and both show a map finish; '+1 process' there (Jupyter's cookie and _xsrf, no token in
    the URL, as behind JupyterHub) grows the pool."""
    from playwright.sync_api import expect
    address, client, procs = cluster
    url, token = start_jupyterlab(procs, tmp_path)
    broker = urllib.parse.quote(address, safe="")
    for path in ("/nbq/", "/nbq/api/snapshot", "/nbq/api/live", "/nbq/metrics"):
        for auth in ("", "&token=wrong"):
            status, body = get(f"{url}{path}?broker={broker}{auth}")
            assert status == 403, (path, auth, status)
            assert "dash@test" not in body
    page = browser.new_page(viewport={"width": 1300, "height": 500})
    page.goto(f"{url}/nbq/?token={token}&broker={broker}")
    row = page.locator("#workers tbody tr", has_text="dash@test")
    expect(row.locator("td.processes")).to_have_text(re.compile(r"^\d+$"), timeout=20_000)
    expect(page.locator("#live")).to_have_text("live")
    page.set_viewport_size({"width": 1400, "height": 700})
    page.goto(f"{url}/lab?token={token}")          # the side panel shows the broker just seen
    page.locator('.lm-TabBar-tab[data-id="nbq-panel"]').click()
    panel = page.frame_locator("#nbq-panel iframe")
    expect(panel.locator("#workers tbody tr", has_text="dash@test")).to_be_visible(
        timeout=45_000)
    page.locator("#nbq-panel .nbq-open-dashboard").click()
    tab = page.frame_locator(".jp-MainAreaWidget iframe")
    tab.locator("nav a[data-tab=maps]").click()
    res = client.map(time.sleep, [0.01] * 200, chunksize=5)
    for where in (panel, tab):
        expect(where.locator(f'#maps tr[data-map="{res.id}"] .map-text')).to_contain_text(
            "200/200 done", timeout=30_000)
    save(page, tmp_path, "dashboard-jupyterlab.png")
    before = processes(client)     # control from the tab: Jupyter's cookie and _xsrf, no token
    tab.locator("nav a[data-tab=workers]").click()
    tab.locator("#workers tbody tr", has_text="dash@test").get_by_role(
        "button", name="+1 process").click()
    expect(tab.locator("#notice")).to_contain_text("pool will grow")
    wait_until(lambda: processes(client) == before + 1, timeout=15, what="the pool to grow")
    client.control("pool_shrink", {"n": 1})
    wait_until(lambda: processes(client) == before, timeout=15, what="the pool to shrink back")
    status, body = get(f"{url}/nbq/api/snapshot?broker={broker}", Authorization=f"token {token}")
    assert status == 200 and "dash@test" in body


@pytest.mark.timeout(60)
def test_history_survives_a_restart_and_10000_tasks_load_fast(cluster, browser, tmp_path):
    """10,000 tasks run; a dashboard started after them has them all from the broker's kept
    events, and its page loads (snapshot drawn) within a second."""
    address, client, procs = cluster
    futures = [client.submit(abs, -i) for i in range(10_000)]
    client.gather(futures, timeout=60)
    url = start_dashboard(procs, address)
    wait_until(lambda: snapshot(url)["kept"] >= 10_000, timeout=30, interval=0.2,
               what="the new dashboard to fold the kept events")
    page = browser.new_page(viewport={"width": 1300, "height": 700})
    start = time.perf_counter()
    page.goto(url + "#tasks")       # the browser's first page pays its own start-up too
    page.wait_for_selector("body[data-loaded='1']")
    first = time.perf_counter() - start
    times = []
    for _ in range(3):
        start = time.perf_counter()
        page.goto(url + "#tasks")
        page.wait_for_selector("body[data-loaded='1']")
        times.append(time.perf_counter() - start)
    kept = page.locator("#kept").inner_text()
    assert int(kept.split()[0].replace(",", "")) >= 10_000, kept
    assert page.locator("#tasks tbody tr").count() == 200
    print(f"page load with {kept}: first {first * 1000:.0f} ms, then best "
          f"{min(times) * 1000:.0f} ms, worst {max(times) * 1000:.0f} ms")
    assert min(times) < 1.0, times
    last = futures[-1].id
    page.fill("#task-filter input[name=q]", last)
    page.click("#task-filter button")
    page.locator(f'#tasks tr[data-task="{last}"] a.task').click()
    from playwright.sync_api import expect
    expect(page.locator("#task-detail")).to_contain_text("builtins.abs")
    page.click("nav a[data-tab=charts]")
    save(page, tmp_path, "dashboard-charts.png")


@pytest.mark.timeout(30)
def test_no_token_no_data_and_metrics_parse(cluster):
    """Without the token, or with a wrong one: 403 and nothing of the cluster, on every route
    (a control POST changes nothing, nor does one from another site's page); with the token,
    /metrics parses as Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families
    address, client, procs = cluster
    url = start_dashboard(procs, address)
    base, token = url.split("/?token=")
    wait_until(lambda: snapshot(url)["workers"], what="the dashboard to see the worker")
    before = processes(client)
    for path in ("/", "/api/snapshot", "/api/tasks", "/api/task/x", "/api/live", "/metrics"):
        for query in ("", "?token=wrong", f"?token={token[:-1]}"):
            status, body = get(base + path + query)
            assert status == 403, (path, query, status)
            assert "dash@test" not in body and "nbq_" not in body
    request = urllib.request.Request(f"{base}/api/control?token=wrong", method="POST",
                                     data=b'{"action": "pool_grow", "n": 1}')
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    request = urllib.request.Request(f"{base}/api/control?token={token}", method="POST",
                                     data=b'{"action": "pool_grow", "n": 1}',
                                     headers={"Origin": "http://elsewhere.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:   # another site's page
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert processes(client) == before
    status, text = get(f"{base}/metrics", Authorization=f"token {token}")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert [s.value for s in families["nbq_workers"].samples] == [1.0]
    assert {s.labels["worker"] for s in families["nbq_worker_processes"].samples} == {"dash@test"}


def test_beyond_loopback_needs_a_password_and_basic_auth_takes_it():
    """auth.Guard: no password off loopback is an error saying what to do; with one, HTTP
    Basic auth with it passes, a wrong one does not, and a browser is asked (401) first."""
    import base64

    from nbq.dashboard.auth import DashboardAuthError, Guard
    with pytest.raises(DashboardAuthError, match="--password"):
        Guard("0.0.0.0")
    assert Guard("127.0.0.1").password is None and Guard("localhost").token
    guard = Guard("0.0.0.0", password="s3cret")
    basic = "Basic " + base64.b64encode(b"anyone:s3cret").decode()
    assert guard.allows(None, basic) and guard.allows(guard.token, None)
    assert not guard.allows(None, "Basic " + base64.b64encode(b"anyone:wrong").decode())
    assert not guard.allows("wrong", None) and not guard.allows(None, "token wrong")
    assert guard.challenge(None) and not guard.challenge(basic)


def test_reprs_link_to_the_dashboard_under_jupyter(monkeypatch):
    """In a kernel of a Jupyter server with nbq's extension (NBQ_DASHBOARD_URL set), the
    status table links to the dashboard of its broker; elsewhere, and for memory://, no link."""
    from nbq.client.status import DASHBOARD_ENV, status_bundle
    st = {"workers": [], "queues": {}, "tasks": 0, "results": 0}
    assert "dashboard" not in status_bundle("tcp://127.0.0.1:5555", st)["text/html"]
    monkeypatch.setenv(DASHBOARD_ENV, "/user/someone/nbq/")
    html = status_bundle("tcp://127.0.0.1:5555", st)["text/html"]
    assert 'href="/user/someone/nbq/?broker=tcp%3A%2F%2F127.0.0.1%3A5555"' in html
    assert "dashboard" not in status_bundle("memory://x", st)["text/html"]


def test_state_folds_chains_maps_and_forgets_the_oldest():
    """State alone: a chain's parent lists its child; a map's counts are MapResult's (failed
    and revoked items count as done) in the progress bar's words; a retry then a start is
    STARTED again; past max_tasks the oldest tasks go, their state counts with them."""
    from nbq.client.progress import format_counts
    from nbq.dashboard.state import State
    st = State(max_tasks=4)
    t = time.time()
    base = {"name": "f", "queue": "default", "worker": "w1/0"}
    st.fold([
        {**base, "type": "task-sent", "ts": t, "id": "a", "args": "(1,)"},
        {**base, "type": "task-sent", "ts": t, "id": "b", "parent": "a", "root": "a"},
        {**base, "type": "task-started", "ts": t + 1, "id": "a"},
        {**base, "type": "task-retried", "ts": t + 2, "id": "a"},
        {**base, "type": "task-started", "ts": t + 3, "id": "a"},
        {"type": "map-sent", "ts": t, "map": "m", "name": "g", "queue": "default", "total": 10},
        {**base, "type": "task-succeeded", "ts": t + 1, "id": "m:0", "map": "m", "count": 6},
        {**base, "type": "task-failed", "ts": t + 1, "id": "m:0", "map": "m", "count": 1,
         "exception": "ValueError", "traceback": "Traceback ..."},
        {**base, "type": "task-revoked", "ts": t + 2, "id": "m:7", "map": "m", "count": 3},
    ])
    a = st.task("a")
    assert a["state"] == "STARTED" and a["retries"] == 1
    assert [c["id"] for c in a["children"]] == ["b"] and st.task("b")["root"] == "a"
    m = st.snapshot()["maps"][0]
    assert (m["done"], m["failed"], m["total"]) == (10, 4, 10)
    assert m["text"] == format_counts(m) and m["text"].startswith("10/10 done, 4 failed")
    assert st.task("m:0")["exception"] == "ValueError"
    st.fold([{**base, "type": "task-sent", "ts": t + 4, "id": "c"}])
    assert len(st.tasks) == 4 and st.task("a") is None          # the oldest went first
    assert sum(st.states.values()) == 4 and st.states["STARTED"] == 0
    assert [r["id"] for r in st.find({"state": "REVOKED"})] == ["m:7"]


def test_a_worker_first_seen_in_its_events_has_its_name():
    """A worker the dashboard hears of by its events before the broker's status reply is
    listed (and labelled in /metrics) by its name, not its id."""
    from nbq.dashboard.metrics import render
    from nbq.dashboard.state import State
    st = State()
    st.fold([{"type": "worker-heartbeat", "ts": time.time(), "worker": "host:12:ab",
              "name": "dash@test", "processes": [13, 14], "concurrency": 2}])
    assert [(w["name"], w["concurrency"]) for w in st.snapshot()["workers"]] == [("dash@test", 2)]
    assert 'nbq_worker_processes{broker="b",worker="dash@test"} 2.0' in render(st.metrics(), "b")


@pytest.mark.timeout(60)
def test_redis_broker_history_and_workers(procs):
    """The same picture from a Redis broker: a dashboard's Source started after a map and
    some calls has them from the kept events, and the worker from its heartbeats and info."""
    from conftest import make_client
    from nbq.dashboard.source import Source
    client = make_client("redis", procs)
    try:
        res = client.map(abs, range(-500, 0), chunksize=50)
        res.result(30)
        client.gather([client.submit(abs, -i) for i in range(20)], timeout=30)
        src = Source(client.address)
        try:
            def folded():
                snap = src.state.snapshot()
                maps = {m["id"]: m for m in snap["maps"]}
                return (res.id in maps and maps[res.id]["done"] == 500
                        and snap["states"].get("SUCCESS") == 30
                        and any(w.get("online") and w.get("processes") for w in snap["workers"]))
            wait_until(folded, timeout=20, interval=0.1, what="the Source to fold the history")
            m = next(m for m in src.state.snapshot()["maps"] if m["id"] == res.id)
            assert m["text"].startswith("500/500 done") and m["failed"] == 0
        finally:
            src.close()
    finally:
        client.shutdown(wait=False)
