"""Tests for nbq.client.frames.to_dataframe: map results to a DataFrame."""

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import NOTEBOOKS, execute_notebook, widget_states
from nbq.client.frames import to_dataframe

Point = collections.namedtuple("Point", "x y")


def test_dicts_give_one_row_each_with_union_of_keys_in_first_seen_order():
    frame = to_dataframe([{"a": 1, "b": 2}, {"b": 3, "c": 4}, {"a": 5}], {}, None, star=False)
    assert list(frame.columns) == ["a", "b", "c"]
    assert list(frame.index) == [0, 1, 2]
    assert frame["b"].tolist()[:2] == [2, 3]
    assert frame.loc[2, "a"] == 5 and pd.isna(frame.loc[2, "b"])


def test_dict_rows_of_ints_keep_int64():
    frame = to_dataframe([{"a": 1, "b": 2}, {"a": 3, "b": 4}], {}, None, star=False)
    assert (frame.dtypes == "int64").all()
    assert frame.index.dtype == "int64"


def test_series_give_one_row_each_index_to_columns():
    values = [pd.Series({"a": 1, "b": 2}, name="ignored"), pd.Series({"b": 3, "c": 4})]
    frame = to_dataframe(values, {}, None, star=False)
    assert list(frame.columns) == ["a", "b", "c"]
    assert list(frame.index) == [0, 1]
    assert frame.loc[1, "c"] == 4 and frame.loc[0, "b"] == 2


def test_dataframes_are_concatenated_with_position_as_outer_level():
    one = pd.DataFrame({"x": [1, 2]}, index=pd.Index([10, 11], name="k"))
    two = pd.DataFrame({"x": [3]}, index=pd.Index([12], name="k"))
    frame = to_dataframe([one, two], {}, None, star=False)
    assert isinstance(frame.index, pd.MultiIndex)
    assert list(frame.index) == [(0, 10), (0, 11), (1, 12)]
    assert frame.index.names == [None, "k"]
    assert frame["x"].tolist() == [1, 2, 3]
    assert frame["x"].dtype == "int64"


def test_plain_tuples_match_pandas_dataframe_of_tuples():
    values = [(1, "a", 2.5), (2, "b", 3.5)]
    frame = to_dataframe(values, {}, None, star=False)
    assert list(frame.columns) == [0, 1, 2]
    pd.testing.assert_frame_equal(frame, pd.DataFrame(values))


def test_namedtuples_use_field_names():
    frame = to_dataframe([Point(1, 2), Point(3, 4)], {}, None, star=False)
    assert list(frame.columns) == ["x", "y"]
    assert frame["y"].tolist() == [2, 4]


def test_scalars_fill_an_int64_result_column():
    frame = to_dataframe([4, 5, 6], {}, None, star=False)
    assert list(frame.columns) == ["result"]
    assert frame["result"].dtype == "int64"
    assert frame["result"].tolist() == [4, 5, 6]
    assert list(frame.index) == [0, 1, 2]


def test_lists_are_not_expanded():
    frame = to_dataframe([[1, 2], [3, 4]], {}, None, star=False)
    assert list(frame.columns) == ["result"]
    assert frame.loc[1, "result"] == [3, 4]


def test_mixed_kinds_fall_back_to_result_column():
    frame = to_dataframe([{"a": 1}, (1, 2), 5], {}, None, star=False)
    assert list(frame.columns) == ["result"]
    assert frame["result"].tolist() == [{"a": 1}, (1, 2), 5]


def test_include_args_one_iterable_adds_leading_arg_column():
    frame = to_dataframe([{"a": 1}, {"a": 4}], {}, ["p", "q"], star=False, include_args=True)
    assert list(frame.columns) == ["arg", "a"]
    assert frame["arg"].tolist() == ["p", "q"]


def test_include_args_one_iterable_keeps_tuple_items_whole():
    frame = to_dataframe([1, 2], {}, [(1, 2), (3, 4)], star=False, include_args=True)
    assert list(frame.columns) == ["arg", "result"]
    assert frame["arg"].tolist() == [(1, 2), (3, 4)]


def test_include_args_star_adds_arg0_arg1():
    frame = to_dataframe([3, 7], {}, [(1, 2), (3, 4)], star=True, include_args=True)
    assert list(frame.columns) == ["arg0", "arg1", "result"]
    assert frame["arg0"].tolist() == [1, 3]
    assert frame["arg1"].tolist() == [2, 4]
    assert frame["arg0"].dtype == "int64"


def test_include_args_repeated_on_each_row_of_dataframe_results():
    one = pd.DataFrame({"x": [1, 2]})
    two = pd.DataFrame({"x": [3]})
    frame = to_dataframe([one, two], {}, [(1, "a"), (2, "b")], star=True, include_args=True)
    assert list(frame.columns) == ["arg0", "arg1", "x"]
    assert frame["arg0"].tolist() == [1, 1, 2]
    assert frame["arg1"].tolist() == ["a", "a", "b"]


def test_errors_raise_raises_lowest_position_error():
    late, early = KeyError("late"), ValueError("early")
    with pytest.raises(ValueError) as info:
        to_dataframe([1, None, 3, None], {3: late, 1: early}, None, star=False)
    assert info.value is early


def test_errors_raise_is_default_and_only_raises_with_errors():
    frame = to_dataframe([1, 2], {}, None, star=False)
    assert frame["result"].tolist() == [1, 2]


def test_errors_include_adds_error_column_and_missing_values():
    exc = ZeroDivisionError("division by zero")
    frame = to_dataframe([{"a": 1}, None, {"a": 3}], {1: exc}, [10, 20, 30], star=False,
                         include_args=True, errors_mode="include")
    assert list(frame.columns) == ["arg", "a", "error"]
    assert list(frame.index) == [0, 1, 2]
    assert frame.loc[1, "error"] == repr(exc)
    assert pd.isna(frame.loc[0, "error"]) and pd.isna(frame.loc[2, "error"])
    assert pd.isna(frame.loc[1, "a"])
    assert frame.loc[1, "arg"] == 20
    assert frame["a"].tolist()[::2] == [1.0, 3.0]


def test_errors_include_without_errors_still_has_error_column():
    frame = to_dataframe([1, 2], {}, None, star=False, errors_mode="include")
    assert list(frame.columns) == ["result", "error"]
    assert frame["error"].isna().all()
    assert frame["result"].dtype == "int64"


def test_errors_include_all_failed_gives_result_and_error():
    frame = to_dataframe([None, None], {0: KeyError(1), 1: TypeError("t")}, None, star=False,
                         errors_mode="include")
    assert list(frame.columns) == ["result", "error"]
    assert frame["result"].isna().all()
    assert frame["error"].tolist() == ["KeyError(1)", "TypeError('t')"]


def test_errors_include_dataframe_results_get_one_row_for_failed_position():
    part = pd.DataFrame({"x": [1, 2]})
    frame = to_dataframe([part, None, part], {1: RuntimeError("x")}, None, star=False,
                         errors_mode="include")
    assert frame.index.get_level_values(0).tolist() == [0, 0, 1, 2, 2]
    assert frame["error"].tolist()[2] == "RuntimeError('x')"
    assert frame["error"].isna().sum() == 4
    assert pd.isna(frame["x"].iloc[2])


def test_errors_skip_leaves_failed_rows_out_and_keeps_dtypes():
    frame = to_dataframe([1, None, 3, None], {1: ValueError(), 3: ValueError()}, ["a", "b", "c", "d"],
                         star=False, include_args=True, errors_mode="skip")
    assert list(frame.index) == [0, 2]
    assert frame.index.dtype == "int64"
    assert frame["result"].dtype == "int64"
    assert frame["arg"].tolist() == ["a", "c"]
    assert "error" not in frame.columns


def test_errors_skip_dataframe_results_keep_positions():
    part = pd.DataFrame({"x": [1]})
    frame = to_dataframe([None, part], {0: ValueError()}, None, star=False, errors_mode="skip")
    assert list(frame.index) == [(1, 0)]


@pytest.mark.parametrize("mode", ["ignore", "RAISE", ""])
def test_invalid_errors_mode_is_value_error_naming_allowed_values(mode):
    with pytest.raises(ValueError, match="raise.*include.*skip"):
        to_dataframe([1], {}, None, star=False, errors_mode=mode)


def test_empty_input_gives_empty_frame_with_result_column():
    frame = to_dataframe([], {}, None, star=False)
    assert isinstance(frame, pd.DataFrame)
    assert len(frame) == 0
    assert list(frame.columns) == ["result"]


def test_positions_limit_rows_and_keep_dtypes():
    values = [{"a": 1, "b": True}, None, {"a": 3, "b": False}, None]   # 1 and 3 not done yet
    frame = to_dataframe(values, {}, ["p", "q", "r", "s"], star=False, include_args=True,
                         positions=[0, 2])
    assert list(frame.index) == [0, 2] and frame.index.dtype == "int64"
    assert list(frame.columns) == ["arg", "a", "b"] and frame["arg"].tolist() == ["p", "r"]
    assert frame["a"].dtype == "int64" and frame["b"].dtype == "bool"


def test_positions_with_errors_include_and_dataframe_results():
    part = pd.DataFrame({"x": [1, 2]})
    frame = to_dataframe([part, None, None, part], {1: KeyError("k")}, None, star=False,
                         errors_mode="include", positions=[0, 1, 3])
    assert frame.index.get_level_values(0).tolist() == [0, 0, 1, 3, 3]
    assert frame["error"].tolist()[2] == "KeyError('k')"
    scalars = to_dataframe([5, None, 7], {1: KeyError("k")}, None, star=False,
                           errors_mode="include", positions=[1, 2])
    assert list(scalars.index) == [1, 2] and scalars.loc[2, "result"] == 7


def test_no_positions_gives_an_empty_result_column():
    frame = to_dataframe([None, None], {}, None, star=False, positions=[])
    assert len(frame) == 0 and list(frame.columns) == ["result"]


def test_importing_frames_does_not_import_pandas():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import sys, nbq.client.frames; assert 'pandas' not in sys.modules, 'pandas imported'"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_100k_dicts_give_the_frame_pandas_builds():
    """The dicts path at the size benchmarks/bench_frames.py times against pandas (speed is
    measured there, not here): the same frame, column for column, dtype for dtype."""
    values = [{"a": i, "b": i * 0.5, "c": str(i), "d": i % 2 == 0} for i in range(100_000)]
    pd.testing.assert_frame_equal(to_dataframe(values, {}, None, star=False), pd.DataFrame(values))


# -- the sweep notebook on a real kernel ------------------------------------------------

@pytest.mark.timeout(120)
def test_sweep_notebook_runs_on_a_real_kernel(tmp_path):
    """notebooks/sweep.ipynb top to bottom: the sweep's bar saved green, the partial look,
    the groupby tables, a PNG plot, and the thresholds found next to the theory."""
    nb = execute_notebook(NOTEBOOKS / "sweep.ipynb", tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    progress = [s["state"] for s in widget_states(nb).values()
                if s["model_name"] == "IntProgressModel"]
    assert [(p["value"], p["max"], p["bar_style"]) for p in progress] == [(2850, 2850, "success")]
    # the partial look: the 500 runs the cell waited for, and any that came in meanwhile
    done = re.search(r"([\d,]+) of 2,850 runs done so far", "".join(o.get("text", "") for o in outputs))
    assert done and 500 <= int(done[1].replace(",", "")) <= 2850, done
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    tables = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert len(tables) == 4 and "theory (1 - 1/R0)" in tables[-1]
