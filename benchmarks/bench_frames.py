"""DataFrame benchmark: MapResult.to_dataframe() of a completed map against pandas.DataFrame.

For each kind of result, one map of N items runs to completion on 2 local workers; then only
``res.to_dataframe()`` is timed, against ``pandas.DataFrame`` of the same list of results
(best of R, the two interleaved). The budget: dicts within 2x of pandas.

    python benchmarks/bench_frames.py [--items 100000] [--repeat 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(1, str(Path(__file__).resolve().parent))
from bench_engine import WORKERS, table, timed  # noqa: E402  (puts this checkout's nbq on sys.path)

BUDGET = 2.0  # to_dataframe of dicts may take at most this many times pandas.DataFrame's time


def dict_row(x: int) -> dict:
    """A dict result: int, float, str and bool columns."""
    return {"a": x, "b": x * 0.5, "c": str(x), "d": x % 2 == 0}


def tuple_row(x: int) -> tuple:
    """The same fields as a plain tuple (columns 0..3)."""
    return (x, x * 0.5, str(x), x % 2 == 0)


def scalar_row(x: int) -> float:
    """A scalar result (one ``result`` column)."""
    return x * 0.5


#: kind -> (the mapped function, what pandas is given for the same results)
KINDS: dict[str, tuple[Callable[[int], Any], Callable[[list], Any]]] = {
    "dicts": (dict_row, lambda values: values),
    "tuples": (tuple_row, lambda values: values),
    "floats": (scalar_row, lambda values: {"result": values}),
}


def measure(client: Any, kind: str, n: int, repeat: int) -> tuple[float, float]:
    """Best-of-repeat seconds of to_dataframe() and of pandas.DataFrame on one completed map."""
    import pandas as pd
    fn, given = KINDS[kind]
    res = client.map(fn, range(n))
    values = res.result(timeout=600)
    expected = pd.DataFrame(given(values))
    ours = lambda: res.to_dataframe()  # noqa: E731
    theirs = lambda: pd.DataFrame(given(values))  # noqa: E731
    same = lambda df: df.equals(expected)  # noqa: E731
    timed(ours, same), timed(theirs, same)  # warm-up: neither pays first-call costs
    runs = [(timed(ours, same), timed(theirs, same)) for _ in range(repeat)]
    return min(o for o, _ in runs), min(t for _, t in runs)


def main(argv: list[str] | None = None) -> None:
    """Run every kind, print the table and the dicts ratio against the budget."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000, help="items per map")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of each; the best counts")
    args = ap.parse_args(argv)
    import nbq
    rows: list[str] = []
    cells: dict[tuple[str, str], float] = {}
    with nbq.Client(workers=WORKERS) as client:
        client.wait_for_workers(WORKERS)
        for kind in KINDS:
            print(f"running {kind} ...", file=sys.stderr, flush=True)
            row = f"{args.items:,} {kind} to DataFrame (ms)"
            rows.append(row)
            ours, theirs = measure(client, kind, args.items, args.repeat)
            cells[("nbq", row)], cells[("pandas", row)] = ours * 1e3, theirs * 1e3
    print(f"\nres.to_dataframe() (nbq) vs pandas.DataFrame(list) (pandas), best of {args.repeat}, "
          f"Python {sys.version.split()[0]}\n")
    print(table(rows, ["nbq", "pandas"], cells, peers_of_interest=("pandas",)))
    ratio = cells[("nbq", rows[0])] / cells[("pandas", rows[0])]
    print(f"\ndicts: to_dataframe / pandas.DataFrame = {ratio:.2f} "
          f"({'within' if ratio < BUDGET else 'OVER'} the {BUDGET:g}x budget)", flush=True)


if __name__ == "__main__":
    main()
