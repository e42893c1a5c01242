"""Arrow arrays from numpy columns and Python strings, built from buffers.

Why not `pa.array`: every call goes through pyarrow's pandas detection, which imports pandas
when it is installed (0.4 s of CPU, once per process: a third of a 1,000,000-packet ingest).
Building arrays from their buffers gives the same arrays without that, and without a pass
over Python objects for the numeric columns. Nor do these functions call `Array.take` or
`Array.cast`: both import `pyarrow.compute`, which registers every compute function with its
documentation (50 ms per process, a twentieth of a 1,000,000-packet ingest).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


def _bitmap(valid: np.ndarray) -> tuple[pa.Buffer | None, int]:
    nulls = int(len(valid) - np.count_nonzero(valid))
    if nulls == 0:
        return None, 0
    return pa.py_buffer(np.packbits(valid, bitorder="little")), nulls


def numeric(values: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
    """`pa.array(values, mask=mask)` for a 1-D numpy array of a fixed-width type: null where
    `mask` is true."""
    values = np.ascontiguousarray(values)
    if values.ndim != 1:
        raise ValueError(f"a column must be 1-D, got shape {values.shape}")
    validity, nulls = (None, 0) if mask is None else _bitmap(~np.asarray(mask, dtype=np.bool_))
    if values.dtype == np.bool_:
        data = pa.py_buffer(np.packbits(values, bitorder="little"))
        return pa.Array.from_buffers(pa.bool_(), len(values), [validity, data], nulls)
    kind = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(kind, len(values), [validity, pa.py_buffer(values)], nulls)


def strings(values: Sequence[str | None]) -> pa.Array:
    """`pa.array(values, type=pa.string())`."""
    encoded = [b"" if value is None else value.encode() for value in values]
    sizes = np.fromiter((len(item) for item in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("more than 2 GiB of text in one column")
    valid = np.fromiter((value is not None for value in values), dtype=np.bool_, count=len(values))
    validity, nulls = _bitmap(valid)
    return pa.StringArray.from_buffers(len(encoded), pa.py_buffer(offsets.astype(np.int32)),
                                       pa.py_buffer(b"".join(encoded)), validity, nulls)


def repeated(value: str, n: int) -> pa.Array:
    """A string column holding `value` n times."""
    encoded = value.encode()
    offsets = np.arange(n + 1, dtype=np.int64) * len(encoded)
    if offsets[-1] >= 2**31:
        raise ValueError("more than 2 GiB of text in one column")
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32)),
                                       pa.py_buffer(encoded * n), None, 0)


def take_strings(values: Sequence[str | None], indices: np.ndarray) -> pa.Array:
    """`strings(values).take(indices)`: row i holds values[indices[i]] (a column of a few
    distinct texts, such as the session of each flow's VNI)."""
    where = np.asarray(indices, dtype=np.intp)
    if where.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {where.shape}")
    encoded = [b"" if value is None else value.encode() for value in values]
    sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    row_sizes = sizes[where]  # an index out of range raises IndexError here
    offsets = np.zeros(len(where) + 1, dtype=np.int64)
    np.cumsum(row_sizes, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("more than 2 GiB of text in one column")
    width = int(sizes.max(initial=0))
    # Each value's bytes in a zero-padded row of `width`: gathering rows and keeping each
    # row's first row_sizes[i] bytes concatenates the values in order, with temporaries of
    # about twice the result (an index per byte would take eight times).
    padded = np.zeros((len(encoded), width), dtype=np.uint8)
    for row, item in enumerate(encoded):
        padded[row, : len(item)] = np.frombuffer(item, dtype=np.uint8)
    gathered = padded[where]
    if len(where) and (row_sizes == width).all():
        data = gathered.tobytes()
    else:
        data = gathered[np.arange(width) < row_sizes[:, None]].tobytes()
    valid = np.fromiter((value is not None for value in values), dtype=np.bool_,
                        count=len(values))[where]
    validity, nulls = _bitmap(valid)
    return pa.StringArray.from_buffers(len(where), pa.py_buffer(offsets.astype(np.int32)),
                                       pa.py_buffer(data), validity, nulls)


def int64_values(column: pa.Array | pa.ChunkedArray, null: int = 0) -> np.ndarray:
    """The values of an integer or timestamp column as int64 (a timestamp's are its ticks),
    `null` where null: `to_numpy(zero_copy_only=False)` without the pandas import."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [np.zeros(0, dtype=np.int64)]
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        kind = chunk.type
        if pa.types.is_timestamp(kind):
            kind = pa.int64()  # the ticks, as stored
        elif not pa.types.is_integer(kind):
            raise TypeError(f"int64_values: not an integer or timestamp column: {kind}")
        end = chunk.offset + len(chunk)
        values = np.frombuffer(chunk.buffers()[1], dtype=kind.to_pandas_dtype(),
                               count=end)[chunk.offset:]
        if values.dtype == np.uint64 and len(values) and values.max() >= 2**63:
            raise OverflowError("int64_values: a uint64 value past the int64 range")
        values = values.astype(np.int64)
        if chunk.null_count:
            bits = np.frombuffer(chunk.buffers()[0], dtype=np.uint8)
            valid = np.unpackbits(bits, count=end, bitorder="little")[chunk.offset:].astype(np.bool_)
            values = np.where(valid, values, np.int64(null))
        parts.append(values)
    return np.concatenate(parts)


__all__ = ["int64_values", "numeric", "repeated", "strings", "take_strings"]
