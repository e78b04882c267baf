"""SSHCluster against a real OpenSSH server on loopback: 127.0.0.2 and 127.0.0.3 are two lab hosts.

The fixture runs sshd with a temporary host key and an authorized key made for the
test, and writes an ssh config naming the hosts lab1 and lab2 (and `refusing`, a
port where nothing listens), which the clusters get as ``ssh_config``.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import nbq
from conftest import (NOTEBOOKS, execute_notebook, free_port, pid_alive, start_broker, wait_until,
                      widget_states)

PYTHON = sys.executable
HERE = sys.modules[__name__]  # shipped: the "lab machines" do not have the tests' folder


@pytest.fixture(scope="module")
def ssh_config(tmp_path_factory):
    """An sshd on a free port of 127.0.0.1-3, stopped by its handle; yields the ssh config path."""
    tmp = tmp_path_factory.mktemp("sshd")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)],
                       check=True)
    (tmp / "authorized_keys").write_text((tmp / "user.pub").read_text())
    port = free_port()
    (tmp / "sshd_config").write_text(textwrap.dedent(f"""\
        ListenAddress 127.0.0.1
        ListenAddress 127.0.0.2
        ListenAddress 127.0.0.3
        HostKey {tmp}/host
        PidFile {tmp}/sshd.pid
        AuthorizedKeysFile {tmp}/authorized_keys
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        MaxStartups 100
        """))
    config = tmp / "ssh_config"
    config.write_text(textwrap.dedent(f"""\
        Host lab1
          HostName 127.0.0.2
        Host lab2
          HostName 127.0.0.3
        Host refusing
          HostName 127.0.0.2
          Port {free_port()}
        Host *
          Port {port}
          User root
          IdentityFile {tmp}/user
          IdentitiesOnly yes
          StrictHostKeyChecking no
          UserKnownHostsFile /dev/null
          LogLevel ERROR
        """))
    with open(tmp / "sshd.log", "wb") as log:
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config"),
                                 "-p", str(port)], stderr=log)
    try:
        wait_until(lambda: subprocess.run(["ssh", "-F", str(config), "lab1", "true"],
                                          stderr=subprocess.DEVNULL).returncode
                   == 0 or sshd.poll() is not None, timeout=10, what="sshd to accept logins")
        assert sshd.poll() is None, (tmp / "sshd.log").read_text()
        yield config
    finally:
        sshd.terminate()
        sshd.wait(10)


def served_by(_=None) -> str:
    """The address a task's worker was reached at over SSH: which "host" it runs on."""
    time.sleep(0.02)  # so that no one process takes a whole map
    return os.environ.get("SSH_CONNECTION", "no ssh").split()[2]


def cluster_pids(cluster) -> list[int]:
    """Every process the cluster started: ssh clients, worker supervisors and their processes."""
    pids = [u.handle.proc.pid for u in cluster._units.values()]
    for w in cluster._status()["workers"]:
        pids += [w["pid"], *w["processes"]]
    return pids


def test_launch_map_scale_adapt_close(ssh_config):
    started = time.perf_counter()
    cluster = nbq.SSHCluster(["lab1", "lab2"], workers_per_host=4, python=PYTHON,
                             ssh_config=ssh_config)
    client = nbq.Client(cluster, ship=[HERE])
    assert client.submit(served_by).result(30) in ("127.0.0.2", "127.0.0.3")
    print(f"launch to first result, 2 hosts x 4 processes: {time.perf_counter() - started:.2f} s")
    try:
        assert cluster.processes == 8
        assert sorted(w["host"] for w in cluster.workers) == ["lab1", "lab2"]
        assert {w["state"] for w in cluster.workers} == {"running"}
        assert all(w["memory"] > 10_000_000 for w in cluster.workers)  # 5 Pythons each
        assert "lab1" in cluster._repr_html_() and "running" in cluster._repr_html_()
        assert set(client.map(served_by, range(200), chunksize=1)) == {"127.0.0.2", "127.0.0.3"}
        # no key on any command line: ps on a lab machine shows none
        key = bytes(cluster.key)
        pids = cluster_pids(cluster)
        for pid in pids:
            assert key not in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert key not in Path(f"/proc/{pid}/environ").read_bytes()

        cluster.scale(12)  # a third unit, on the host with fewest processes
        cluster.wait_for_workers(timeout=30)
        assert sum(len(w["processes"]) for w in client.workers()) == 12
        assert sorted(w["host"] for w in cluster.workers) == ["lab1", "lab1", "lab2"]
        more = cluster_pids(cluster)
        cluster.scale(3)  # a whole unit goes, and one process of another
        assert cluster.processes == 3 and len(cluster.workers) == 1
        wait_until(lambda: sum(len(w["processes"]) for w in client.workers()) == 3, timeout=15,
                   what="the cluster to shrink to 3 processes")
        gone = set(more) - set(cluster_pids(cluster))
        wait_until(lambda: not any(pid_alive(p) for p in gone), timeout=15,
                   what="the stopped units' processes to exit")

        with pytest.raises(ValueError, match="0 <= minimum <= maximum"):
            cluster.adapt(minimum=4, maximum=2)
        cluster.scale(0)
        cluster.adapt(minimum=0, maximum=8, wait=1.0)
        burst = client.map(time.sleep, [0.3] * 40, chunksize=1)
        wait_until(lambda: cluster.processes == 8, timeout=20, what="adapt to grow to 8")
        burst.result(60)
        wait_until(lambda: cluster.processes == 0, timeout=20, what="adapt to shrink when idle")
        assert cluster.workers == []
        client.submit(served_by)  # work again: adapt grows from nothing
        wait_until(lambda: cluster.processes > 0, timeout=20, what="adapt to grow again")
        pids = cluster_pids(cluster) + more
    finally:
        client.shutdown(wait=False)
        cluster.close()
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=15,
               what="every launched process to exit after close()")


def test_sigkilled_client_leaves_nothing_running(ssh_config, procs):
    script = textwrap.dedent(f"""\
        import nbq, sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_ssh import cluster_pids
        cluster = nbq.SSHCluster(["lab1", "lab2"], 2, python={PYTHON!r},
                                 ssh_config={str(ssh_config)!r})
        print(*cluster_pids(cluster), flush=True)
        time.sleep(600)
        """)
    p = procs.start([PYTHON, "-c", script])
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 2 + 2 * 3, pids  # 2 ssh, 2 supervisors, 4 worker processes
    assert all(pid_alive(pid) for pid in pids)
    p.send_signal(signal.SIGKILL)
    p.wait()
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=15,
               what="the workers of a SIGKILLed client to exit")


def test_workers_stop_when_their_broker_goes(ssh_config, procs):
    address = start_broker(procs)
    broker = procs.procs[-1]
    cluster = nbq.SSHCluster(["lab1"], 1, python=PYTHON, ssh_config=ssh_config, broker=address)
    try:
        pids = cluster_pids(cluster)
        broker.kill()
        wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=20,
                   what="the workers of a broker that went away to exit")
    finally:
        cluster.close()


def slow(i: int) -> str:
    time.sleep(0.5)
    return served_by()


def test_a_lost_session_has_its_tasks_run_elsewhere(ssh_config):
    with nbq.SSHCluster(["lab1", "lab2"], 1, python=PYTHON, ssh_config=ssh_config) as cluster, \
            nbq.Client(cluster, ship=[HERE]) as client:
        res = client.map(slow, range(6), chunksize=1)
        wait_until(lambda: sum(w["active"] for w in cluster.workers) == 2, timeout=15,
                   what="both hosts to run a task")
        lab1 = next(u for u in cluster._units.values() if u.host == "lab1")
        lab1.handle.proc.kill()  # the connection drops: lab1's worker loses its lifeline
        assert len(res.result(30)) == 6
        assert [w["state"] for w in cluster.workers if w["host"] == "lab1"][0].startswith(
            "failed: ssh lab1 exited")


def test_a_refusing_host_is_named_while_the_other_serves(ssh_config):
    with pytest.warns(nbq.LaunchWarning, match=r"refusing: ssh refusing exited with code 255: "
                                               r".*Connection refused"):
        cluster = nbq.SSHCluster(["refusing", "lab1"], 1, python=PYTHON, ssh_config=ssh_config)
    with cluster, nbq.Client(cluster, ship=[HERE]) as client:
        assert client.map(served_by, range(4)).result(30) == ["127.0.0.2"] * 4
        assert [w["state"] for w in cluster.workers if w["host"] == "refusing"][0].startswith(
            "failed: ssh refusing exited")
        logs = cluster.logs()  # each unit's output, the failed one's too
        assert "Connection refused" in next(t for n, t in logs.items() if n.endswith("@refusing"))
    with pytest.raises(nbq.LaunchError, match="no worker started: refusing: .*refused"):
        nbq.SSHCluster(["refusing"], 1, python=PYTHON, ssh_config=ssh_config)


def test_a_worker_of_other_versions_refuses_naming_both(ssh_config, monkeypatch):
    monkeypatch.setattr(nbq.version, "__version__", "0.0.1")  # this side's (clusters.base.versions)
    with pytest.raises(nbq.LaunchError, match=r"lab2: .*this worker has nbq [\d.]+ on Python "
                                              r"[\d.]+, its client nbq 0.0.1 on Python"):
        nbq.SSHCluster(["lab2"], 1, python=PYTHON, ssh_config=ssh_config)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="hosts must be a list"):
        nbq.SSHCluster("lab1")
    with pytest.raises(ValueError, match="workers_per_host must be a positive"):
        nbq.SSHCluster(["lab1"], 0)


def test_nbq_launch_ssh_command(ssh_config, procs):
    p = procs.nbq("launch", "ssh", "lab1", "lab2", "-n", "1", "--python", PYTHON,
                  "--ssh-config", str(ssh_config))
    line = p.stdout.readline()
    assert "2 worker processes on lab1, lab2" in line, line + p.stdout.read()
    address = line.split("serving ")[1].split(";")[0]
    with nbq.Client(address, ship=[HERE]) as client:
        assert set(client.map(served_by, range(40), chunksize=1)) == {"127.0.0.2", "127.0.0.3"}
        pids = [pid for w in client.workers() for pid in (w["pid"], *w["processes"])]
        assert len(pids) == 4
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=15,
               what="nbq launch's workers to exit")


def test_lab_notebook(ssh_config, slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("NBQ_SSH_CONFIG", str(ssh_config))
    monkeypatch.setenv("NBQ_LAB_HOSTS", "lab1 lab2")
    monkeypatch.setenv("NBQ_LAB_PYTHON", PYTHON)
    nb = execute_notebook(NOTEBOOKS / "lab.ipynb", tmp_path)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "served by: ['127.0.0.2', '127.0.0.3']" in text, text
    assert re.search(r"served by: \['127\.0\.0\.2', '127\.0\.0\.3', 'slurm job \d+'\]",
                     text), text  # SSH hosts and a Slurm job on one broker, in one map
    assert "processes while busy: 8" in text and "processes when idle: 4" in text, text
    assert "left running: 0" in text and not slurm.jobs(), text
    assert "a cell ran on 127.0.0." in text, text  # %nbq launch ssh, then %%remote
    # the displayed cluster is a live table: redrawn until it closed
    tables = [v for st in widget_states(nb).values() if isinstance(v := st["state"].get("value"), str)]
    assert any("<b>SSHCluster</b>" in t and "closed" in t for t in tables), tables


def test_the_handshake_carries_any_key_bytes_on_one_line():
    """A key file may hold any bytes, a newline too: the handshake's line still ends at its end."""
    import io
    from nbq import keys
    key = keys.Key(b"\n\xff" + bytes(range(40)) + b"\r\n", "test")
    sent = keys.handshake(key)
    assert sent.count(b"\n") == 1 and sent.endswith(b"\n")
    stream = io.BytesIO(sent + b"more input: the lifeline")
    assert keys.read_handshake(stream) == key
    with pytest.raises(nbq.InvalidKey, match="not a key in hex"):
        keys.read_handshake(io.BytesIO(b"zz\n"))
