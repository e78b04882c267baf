"""SlurmCluster on a real Slurm (munged + slurmctld + slurmd on this machine, tests/slurm_server.py):
jobs submitted with sbatch, workers that join, a map across jobs, scancel on close, a job
killed mid-task, and a client killed by SIGKILL."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import nbq
from conftest import pid_alive, redis_url, wait_until
from nbq.clusters.slurm import job_script, memory_mb


def _job_of_task(_):
    """Which job ran this, and its worker's pid.  It lasts 20 ms, too long for the broker to
    hand it out in batches (policy.BATCH_SECONDS): one job's worker cannot take them all."""
    time.sleep(0.02)
    return os.environ.get("SLURM_JOB_ID"), os.getppid()


def _slow_first_time(x, marks):
    """Mark which job runs item x; a first run takes far longer than the test, a rerun is quick."""
    first = not os.listdir(marks)
    Path(marks, f"{x}-{os.environ['SLURM_JOB_ID']}").touch()
    time.sleep(120 if first else 0)
    return x * 10


def test_job_script_lines_and_checks(tmp_path):
    script = job_script(name="nbq-1", command=["/py", "-m", "nbq", "worker", "--key-file", "-"],
                        key_file=tmp_path / "k", log_file=tmp_path / "l", cores=8,
                        memory="16GB", walltime="01:00:00", partition="gpu", account="lab",
                        job_extra=["--qos=high"], prologue=["module load python"])
    for line in ["#SBATCH --cpus-per-task=8", "#SBATCH --mem=16384M", "#SBATCH --time=01:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 f"exec 3<{tmp_path / 'k'} && rm -f {tmp_path / 'k'} || exit 1",
                 "module load python", "exec /py -m nbq worker --key-file - <&3 3<&-"]:
        assert line in script.splitlines(), line
    assert "kill" not in script  # no lease: the embedded broker dies with the notebook
    leased = job_script(name="nbq-1", command=["/py"], key_file=tmp_path / "k",
                        log_file=tmp_path / "l", cores=1, lease=tmp_path / "lease")
    assert f"cat {tmp_path / 'lease'}" in leased and "kill -TERM $$" in leased
    assert memory_mb("500M") == 500 and memory_mb("1.5GiB") == 1536 and memory_mb(2048) == 2048
    with pytest.raises(ValueError, match="line break"):
        job_script(name="x", command=[], key_file=tmp_path / "k", log_file=tmp_path / "l",
                   cores=1, job_extra=["--qos=a\nrm -rf ~"])
    with pytest.raises(ValueError, match="not a Slurm time"):
        nbq.SlurmCluster(jobs=1, walltime="1 hour")
    with pytest.raises(ValueError, match="not a size"):
        nbq.SlurmCluster(jobs=1, memory="lots")
    with pytest.raises(ValueError, match="cores"):
        nbq.SlurmCluster(jobs=1, cores=0)


def test_a_job_sbatch_refuses_is_a_launch_error_naming_why(slurm, tmp_path):
    with pytest.raises(nbq.LaunchError, match="sbatch refused job .*invalid partition"):
        nbq.SlurmCluster(jobs=1, partition="nosuch", directory=tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.key"))  # its key file went with it
    assert not slurm.jobs()


def test_jobs_join_run_a_map_and_close_cancels_them(slurm, tmp_path):
    key = bytes(nbq.keys.load_key())
    with nbq.SlurmCluster(jobs=2, cores=1, memory="200MB", walltime="00:10:00",
                          partition="debug", directory=tmp_path / "c") as cluster, \
            nbq.Client(cluster, ship=[sys.modules[__name__]]) as client:
        jobs = slurm.jobs()
        assert len(jobs) == 2
        client.wait_for_workers(2, timeout=60)
        ran = client.map(_job_of_task, range(40), chunksize=1).result(timeout=60)
        assert {j for j, _ in ran} == set(jobs)  # both jobs served the map
        pids = {p for _, p in ran}
        # the key reached the workers through a 0600 file the job removed, nothing else
        assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o700
        assert not list((tmp_path / "c").glob("*.key"))
        for job in jobs:
            assert key not in slurm.run("scontrol", "write", "batch_script", job, "-").encode()
        for pid in pids:
            for what in ("cmdline", "environ"):
                assert key not in Path(f"/proc/{pid}/{what}").read_bytes()
        assert {w["state"] for w in cluster.workers} == {"running"}
        assert len(cluster.logs()) == 2  # one log per job
        t0 = time.monotonic()
        cluster.close()  # with the client still open: it is shut down first
        print(f"close took {time.monotonic() - t0:.2f} s")
        with pytest.raises(RuntimeError):
            client.submit(abs, 1)
    assert not slurm.jobs()  # scancel through close(): squeue lists nothing
    assert not [p for p in pids if pid_alive(p)]
    assert len(list((tmp_path / "c").glob("*.log"))) == 2  # a directory given is the user's: kept


def test_jobs_serve_a_redis_broker(slurm, tmp_path):
    with nbq.SlurmCluster(jobs=1, cores=2, broker=redis_url(), directory=tmp_path / "c") \
            as cluster, nbq.Client(cluster, ship=[sys.modules[__name__]]) as client:
        client.wait_for_workers(2, timeout=60)
        assert {j for j, _ in client.map(_job_of_task, range(10))} == set(slurm.jobs())
        cluster.close()
    assert not slurm.jobs()


def test_a_job_killed_mid_task_has_its_task_finish_elsewhere(slurm, tmp_path):
    """scancel from outside the cluster, as Slurm ends a job at its walltime or on preemption:
    SIGTERM to every process of the job, SIGKILL KillWait seconds later.  (A real TIMEOUT
    takes the same path, but Slurm's limits are whole minutes, checked about every 30 s: at
    least 60-90 s, too long for this suite.)"""
    marks = tmp_path / "marks"
    marks.mkdir()
    with nbq.SlurmCluster(jobs=2, cores=1, walltime="00:10:00", directory=tmp_path / "c") \
            as cluster, nbq.Client(cluster, ship=[sys.modules[__name__]]) as client:
        client.wait_for_workers(2, timeout=60)
        fut = client.submit(_slow_first_time, 7, str(marks))
        [mark] = wait_until(lambda: os.listdir(marks), timeout=30, what="the task to start")
        victim = mark.split("-")[1]
        t0 = time.monotonic()
        slurm.run("scancel", victim)
        assert fut.result(timeout=60) == 70
        print(f"task finished elsewhere {time.monotonic() - t0:.1f} s after scancel")
        [rerun] = [m for m in os.listdir(marks) if m != mark]
        assert rerun.split("-")[1] != victim  # ran again, in the other job
        wait_until(lambda: any(w["state"].startswith(f"failed: job {victim} cancelled")
                               for w in cluster.workers), timeout=10, what="the job's end seen")


def test_scale_and_adapt_submit_and_cancel_jobs(slurm, tmp_path):
    with nbq.SlurmCluster(jobs=1, cores=1, directory=tmp_path / "c") as cluster, \
            nbq.Client(cluster) as client:
        cluster.scale(3)
        assert len(slurm.jobs()) == 3
        client.wait_for_workers(3, timeout=60)
        cluster.scale(1)  # whole jobs cancelled, idle ones first
        assert len(slurm.jobs()) == 1
        cluster.adapt(minimum=0, maximum=3, wait=1.0)
        res = client.map(time.sleep, [2] * 6, chunksize=1)
        wait_until(lambda: len(slurm.jobs()) == 3, timeout=20, what="adapt to submit 3 jobs")
        res.result(timeout=60)
        wait_until(lambda: not slurm.jobs(), timeout=30, what="adapt to cancel the idle jobs")


CLIENT = textwrap.dedent("""
    import sys, nbq
    nbq.clusters.slurm.LEASE_TIMEOUT = 3  # the test's patience, not a user's shared filesystem's
    broker = sys.argv[2] if len(sys.argv) > 2 else None
    cluster = nbq.SlurmCluster(jobs=2, cores=1, directory=sys.argv[1], broker=broker)
    client = nbq.Client(cluster)
    client.wait_for_workers(2, timeout=60)
    print(" ".join(str(p) for p in sorted({w["pid"] for w in client.workers()})), flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_jobs_end_within_seconds_when_the_client_is_killed(slurm, procs, tmp_path, broker):
    """Embedded broker: it dies with the client, and the workers stop when it stops answering.
    Redis outlives the client: the jobs stop when the cluster's lease file stops changing."""
    p = procs.start([sys.executable, "-c", CLIENT, str(tmp_path / "c"),
                     *([redis_url()] if broker == "redis" else [])], stdin=subprocess.PIPE,
                    env=slurm.env())
    line = p.stdout.readline()
    pids = [int(x) for x in line.split()]
    assert pids and slurm.jobs(), line + p.stdout.read() if p.poll() is not None else line
    t0 = time.monotonic()
    p.send_signal(signal.SIGKILL)
    p.wait()
    wait_until(lambda: not slurm.jobs(), timeout=30, what="the jobs to end")
    print(f"{broker}: jobs ended {time.monotonic() - t0:.1f} s after the client's SIGKILL")
    wait_until(lambda: not [q for q in pids if pid_alive(q)], timeout=10, what="workers gone")


def test_nbq_launch_slurm_command(slurm, procs, tmp_path):
    p = procs.nbq("launch", "slurm", "--jobs", "2", "--cores", "1", "--walltime", "00:10:00",
                  "--directory", str(tmp_path / "c"), env=slurm.env())
    line = p.stdout.readline()
    assert "2 worker processes on slurm" in line, line + (p.stdout.read() if p.poll() else "")
    assert len(slurm.jobs()) == 2
    address = line.split("serving ")[1].split(";")[0]
    with nbq.Client(address, ship=[sys.modules[__name__]]) as client:
        client.wait_for_workers(2, timeout=60)
        assert {j for j, _ in client.map(_job_of_task, range(20), chunksize=1)} == set(slurm.jobs())
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    assert not slurm.jobs()


def test_nbq_launch_slurm_magic(slurm):
    """Also: the default private directory, made 0700 under ~/.cache/nbq/slurm, goes on close."""
    from IPython.core.interactiveshell import InteractiveShell
    base = Path.home() / ".cache" / "nbq" / "slurm"
    before = set(base.glob("cluster-*"))
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "nbq")
    sh.run_line_magic("nbq", "launch slurm --jobs 1")
    try:
        [made] = set(base.glob("cluster-*")) - before
        assert stat.S_IMODE(made.stat().st_mode) == 0o700
        [job] = slurm.jobs()
        sh.run_cell_magic("remote", "--timeout 60", "import os\njob = os.environ['SLURM_JOB_ID']")
        assert sh.user_ns["job"] == job
    finally:
        sh.run_line_magic("nbq", "shutdown")
    assert not slurm.jobs()
    assert not made.exists()
