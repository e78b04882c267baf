"""Chaos: worker processes and whole workers SIGKILLed at random, by their own pids, while
thousands of map items and single tasks run.  Every result arrives, correct, once."""
from __future__ import annotations

import collections
import functools
import os
import random
import signal
import time

import nbq
from conftest import pid_alive, standalone_broker

N_MAP = 3000     # map items of ~4 ms, in chunks of 20
N_SINGLE = 400   # single tasks of ~4 ms
WORKERS = 2      # `nbq worker -c 2` each, a killed one replaced at once
BOUND = 120.0    # seconds: the run fails rather than hangs


class Chaos:
    """Kills, at random intervals, a random worker process (three times in four) or a
    random whole `nbq worker` (then starts another), by pid."""

    def __init__(self, procs, address: str, client: nbq.Client, rng: random.Random, log) -> None:
        self.procs, self.address, self.client, self.rng = procs, address, client, rng
        self.log = log  # the workers' output: a file, as a pipe nobody reads would fill up
        self.workers = [self._start() for _ in range(WORKERS)]
        self.kills = collections.Counter()

    def _start(self):
        return self.procs.nbq("worker", "--broker", self.address, "-c", "2", stdout=self.log)

    def strike(self) -> None:
        live = {w.pid for w in self.workers}
        if (self.kills["process"] + self.kills["worker"]) % 4 == 1:
            victim = self.rng.choice(self.workers)
            victim.kill()
            victim.wait()
            self.workers.remove(victim)
            self.workers.append(self._start())
            self.kills["worker"] += 1
            return
        pids = [p for w in self.client.workers() if w["pid"] in live for p in w["processes"]]
        pids = [p for p in pids if pid_alive(p)]
        if pids:
            os.kill(self.rng.choice(pids), signal.SIGKILL)
            self.kills["process"] += 1


def test_every_result_arrives_once_through_random_kills(transport, procs, tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    runs = tmp_path / "runs"
    address = standalone_broker(transport, procs)

    def _run(kind: str, x: int, runs: str) -> int:  # travels by value, as a notebook's would
        with open(runs, "a") as f:  # one short O_APPEND write per run: runs are counted
            f.write(f"{kind}{x}\n")
        time.sleep(0.004)
        return x * x if kind == "m" else -x

    with nbq.Client(address) as client, open(tmp_path / "workers.log", "a") as log:
        chaos = Chaos(procs, address, client, rng, log)
        client.wait_for_workers(2 * WORKERS)
        t0 = time.monotonic()
        res = client.map(functools.partial(_run, "m", runs=str(runs)), range(N_MAP), chunksize=20)
        futs = [client.submit(_run, "s", i, str(runs)) for i in range(N_SINGLE)]
        told = collections.Counter()
        for f in futs:
            f.add_done_callback(lambda f: told.update([f.id]))
        deadline = t0 + BOUND
        while not (res.done() and all(f.done() for f in futs)):
            assert time.monotonic() < deadline, f"not done after {BOUND} s (seed {seed})"
            time.sleep(rng.uniform(0.2, 0.5))
            chaos.strike()
        elapsed = time.monotonic() - t0
        assert list(res) == [x * x for x in range(N_MAP)], f"seed {seed}"
        assert not res.errors()
        assert [f.result() for f in futs] == [-i for i in range(N_SINGLE)]
        assert set(told.values()) == {1} and len(told) == N_SINGLE  # each future told once
    done = runs.read_text().split()
    assert set(done) == {f"m{x}" for x in range(N_MAP)} | {f"s{i}" for i in range(N_SINGLE)}
    reruns = len(done) - N_MAP - N_SINGLE
    print(f"\nchaos on {transport} (seed {seed}): {chaos.kills['process']} process kills, "
          f"{chaos.kills['worker']} worker kills; {N_MAP + N_SINGLE} tasks, {reruns} re-runs "
          f"({100 * reruns / (N_MAP + N_SINGLE):.1f}%), {elapsed:.1f} s")
    assert chaos.kills["process"] >= 3 and chaos.kills["worker"] >= 1, "too little chaos happened"
