"""collector.store.arrow builds the same arrays as pa.array, from buffers."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from collector.store.arrow import int64_values, numeric, repeated, strings, take_strings

DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
          np.float64, np.bool_]


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_numeric_equals_pa_array(dtype, data):
    elements = st.floats(allow_nan=False) if dtype is np.float64 else None  # NaN != NaN
    values = data.draw(hnp.arrays(dtype, st.integers(0, 70), elements=elements))
    mask = data.draw(st.one_of(st.none(), hnp.arrays(np.bool_, len(values))))
    expected = pa.array(values, mask=mask)
    got = numeric(values, mask)
    got.validate(full=True)
    assert got.equals(expected)


@given(st.lists(st.one_of(st.none(), st.text(max_size=12)), max_size=60))
def test_strings_equal_pa_array(values):
    got = strings(values)
    got.validate(full=True)
    assert got.equals(pa.array(values, type=pa.string()))


def test_strided_and_2d_input():
    base = np.arange(10, dtype=np.int64)
    assert numeric(base[::2]).to_pylist() == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="1-D"):
        numeric(np.zeros((2, 2)))


def test_repeated():
    assert repeated("c-1", 3).to_pylist() == ["c-1"] * 3
    assert repeated("c-1", 0).to_pylist() == []


def test_does_not_import_pandas():
    code = ("import sys, numpy as np; from collector.store.arrow import int64_values, numeric, strings; "
            "a = numeric(np.arange(3), np.array([0, 1, 0], bool)); strings(['a', None]); "
            "int64_values(a); "
            "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@given(st.lists(st.one_of(st.none(), st.text(max_size=12)), min_size=1, max_size=8), st.data())
def test_take_strings_equals_take(values, data):
    indices = data.draw(st.lists(st.integers(0, len(values) - 1), max_size=50))
    got = take_strings(values, np.array(indices, dtype=np.int64))
    got.validate(full=True)
    assert got.equals(pa.array(values, type=pa.string()).take(pa.array(indices, pa.int64())))


def test_take_strings_refuses_an_index_out_of_range():
    with pytest.raises(IndexError):
        take_strings(["a"], np.array([1]))
    assert take_strings([], np.zeros(0, dtype=np.int64)).to_pylist() == []


@pytest.mark.parametrize("kind", [pa.int8(), pa.int16(), pa.int32(), pa.uint8(), pa.uint32(),
                                  pa.uint64()])
def test_int64_values_of_narrower_integers(kind):
    column = pa.array([1, None, 100], kind).slice(1)
    assert int64_values(column, null=-1).tolist() == [-1, 100]


def test_int64_values_refuses_what_int64_cannot_hold():
    with pytest.raises(OverflowError):
        int64_values(pa.array([2**63], pa.uint64()))
    with pytest.raises(TypeError):
        int64_values(pa.array([1.5]))


def test_flows_written_without_pyarrow_compute(tmp_path):
    """Array.take and Array.cast import pyarrow.compute (50 ms of a process's start): the
    writer (a partition that is one run of rows, the usual case) and these builders use
    neither; nor does np.unique's numpy.ma import happen."""
    code = f"""
import sys, numpy as np, pyarrow as pa
from collector.store.arrow import int64_values, numeric, repeated, take_strings
from collector.store.writer import _partitions
repeated("c-1", 3); take_strings(["a", None], np.array([1, 0, 1]))
stamps = numeric(np.array([0, 1, 7_200_000_000], dtype=np.int64)).view(pa.timestamp("us", tz="UTC"))
int64_values(stamps)
parts = list(_partitions(pa.table({{"first_seen": stamps}}), "first_seen"))
assert [key for key, _ in parts] == [("1970-01-01", "00"), ("1970-01-01", "02")], parts
print(sorted(m for m in ("pyarrow.compute", "numpy.ma", "pandas") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@given(st.lists(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)), max_size=40),
       st.integers(0, 5), st.integers(0, 5))
def test_int64_values_of_sliced_chunks(values, start, split):
    column = pa.chunked_array([pa.array(values[:split], pa.int64()),
                               pa.array(values[split:], pa.int64())]).slice(start)
    expected = [-1 if v is None else v for v in values[start:]]
    assert int64_values(column, null=-1).tolist() == expected


def test_int64_values_of_timestamps():
    stamps = pa.array([0, None, 1_700_000_000_000_000], pa.timestamp("us", tz="UTC"))
    assert int64_values(stamps).tolist() == [0, 0, 1_700_000_000_000_000]
