"""Turn the results of a parallel map into a pandas DataFrame.

pandas is imported inside the function so that importing nbq stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import pandas

ERRORS_MODES = ("raise", "include", "skip")


def to_dataframe(values: list, errors: dict[int, BaseException], args: list | None, *, star: bool,
                 include_args: bool = False, errors_mode: str = "raise",
                 positions: Sequence[int] | None = None) -> pandas.DataFrame:
    """Build one DataFrame from map results, indexed by input position.

    The kind of every row is decided by the first successful value: dicts, Series,
    tuples and namedtuples become one row each (columns as ``pandas.DataFrame(list)``
    gives them); DataFrames are concatenated under an outer index level holding the
    position; anything else fills one ``result`` column. If another successful value
    is of a different kind, every value goes into the ``result`` column instead, so a
    mixed list never gives half-parsed rows. Empty input gives an empty ``result`` column.

    ``include_args`` puts the inputs first: ``arg`` (``star=False``) or ``arg0``,
    ``arg1``, ... (``star=True``), repeated on every row of a DataFrame result.

    ``errors_mode``: "raise" raises the error of the lowest failed position; "skip"
    leaves failed positions out (dtypes stay exact); "include" adds a last ``error``
    column (``repr`` of the exception, missing on successful rows) and leaves the other
    columns of failed rows missing, with pandas' usual upcast (int to float64, bool to
    object). A failed position of DataFrame results gives one row with a NaN inner index.
    The ``arg``/``error`` columns never replace a result column of the same name.

    ``positions`` (ascending) limits the rows to those input positions, as for a map
    still running (``errors`` then holds failures at those positions only); the
    index is then those positions, and kinds and dtypes are decided as above from
    the rows present.
    """
    if errors_mode not in ERRORS_MODES:
        raise ValueError(f"errors_mode must be one of {', '.join(map(repr, ERRORS_MODES))}, "
                         f"not {errors_mode!r}")
    if errors and errors_mode == "raise":
        raise errors[min(errors)]
    import pandas as pd

    whole = positions is None and not errors      # every row, no gaps: no copies, a RangeIndex
    every = range(len(values)) if positions is None else positions
    ok = [i for i in every if i not in errors] if errors else every
    results = values if whole else [values[i] for i in ok]
    kind = _kind(pd, results)
    if kind is pd.DataFrame:
        if errors_mode == "include":
            stub = pd.DataFrame(index=results[0].index[:0].insert(0, float("nan")))
            results = [stub if i in errors else values[i] for i in every]
            ok = every
        frame = pd.concat(results, keys=list(ok))
    else:
        index = pd.RangeIndex(len(values)) if whole else pd.Index(ok, dtype="int64")
        if kind is None:
            frame = pd.Series(results, index=index, name="result").to_frame()
        else:
            frame = pd.DataFrame(results, index=index)
        if errors_mode == "include":
            frame = frame.reindex(pd.RangeIndex(len(values)) if positions is None
                                  else pd.Index(every, dtype="int64"))

    rows = frame.index.get_level_values(0)
    if include_args:
        given = pd.DataFrame(args) if star else pd.DataFrame({"arg": args})
        if star:
            given.columns = [f"arg{j}" for j in range(given.shape[1])]
        taken = given.take(rows)
        for j, name in enumerate(given.columns):
            frame.insert(j, name, taken[name].array, allow_duplicates=True)
    if errors_mode == "include":
        messages = pd.Series({i: repr(exc) for i, exc in errors.items()}, dtype=str)
        frame.insert(frame.shape[1], "error", messages.reindex(rows).array, allow_duplicates=True)
    return frame


def _kind(pd, results: list) -> type | None:
    """The row kind of ``results`` (None means one ``result`` column)."""
    if not results:
        return None
    for kind in (pd.DataFrame, pd.Series, dict, tuple):
        if isinstance(results[0], kind):
            return kind if all(issubclass(t, kind) for t in set(map(type, results))) else None
    return None
