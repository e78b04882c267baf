"""``nbq demo``: the main job on the embedded default, start to DataFrame."""
from __future__ import annotations

import math
import time


def simulate(seed: int) -> dict:
    """A small Monte-Carlo estimate of pi: one row of results per seed."""
    import random
    rng = random.Random(seed)
    n = 200
    inside = sum(1 for _ in range(n) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return {"seed": seed, "pi": 4.0 * inside / n, "error": abs(4.0 * inside / n - math.pi)}


def run(items: int = 300_000, workers: int | None = None) -> None:
    """Map simulate over `items` seeds with a live progress bar, then show the DataFrame."""
    import nbq
    t0 = time.perf_counter()
    with nbq.Client(workers=workers) as client:
        started = time.perf_counter()
        print(f"nbq demo: {client._cluster.processes} worker processes, broker {client.address}, "
              f"started in {started - t0:.2f} s")
        res = client.map(simulate, range(items))
        res.progress()
        res.result()
        mapped = time.perf_counter()
        df = res.to_dataframe()
        framed = time.perf_counter()
    print(df.head().to_string())
    print(f"\n{len(df):,} rows; pi ~ {df['pi'].mean():.5f} (error {abs(df['pi'].mean() - math.pi):.5f})")
    print(f"map: {items / (mapped - started):,.0f} items/s ({mapped - started:.2f} s); "
          f"to_dataframe: {framed - mapped:.2f} s")
