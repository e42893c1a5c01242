"""The compiled path behind `Pipeline.feed`: batch decode and flow table in C
(`collector._fastflow`), with the same results as the pure-Python reference.

The references stay the specification: `collector.decode.batch.decode_batch` (and the
per-packet `decode_datagram` behind it), `collector.flows.table.FlowTable` and
`collector.store.rows.flows_batch`. This module gives the compiled versions the same shape:

- `decode_batch(buf, lengths, port, present)` -> the same `PacketBatch`, column for column. Rows
  the C code leaves (a negative cut, a length past the int32 columns) go through the
  reference decoder.
- `FastFlowTable(config)`: `add_batch`, `expire`, `drain` like `FlowTable`'s, but what they
  return is an `EndedFlows`: the flows that ended, as columns, in the order the reference
  ends them. `EndedFlows.record_batch(...)` is `flows_batch(...)` of the same flows without a
  Python object per flow; `EndedFlows.flows()` gives the reference's `EndedFlow` objects (for
  tests and tools).

`available()` says whether the extension is built and not switched off
(COLLECTOR_PURE_PYTHON=1).
"""

from __future__ import annotations

import ipaddress
import operator
from dataclasses import fields

import numpy as np
import pyarrow as pa

from collector.compiled import extension
from collector.decode.batch import _DTYPES, PacketBatch, _decode_one
from collector.decode.batch import decode_batch as reference_decode_batch
from collector.decode.datagram import GENEVE_PORT, VXLAN_GPE_PORT, VXLAN_PORT
from collector.flows.table import END_REASONS, NS, EndedFlow, FlowConfig
from collector.sessions import SessionRegistry
from collector.store import arrow
from collector.store.schema import FLOWS, PACKETS

_COLUMNS = tuple(spec.name for spec in fields(PacketBatch))
_DTYPE_OF = tuple(np.dtype(_DTYPES[name]) for name in _COLUMNS)
_PORTS = (VXLAN_PORT, VXLAN_GPE_PORT, GENEVE_PORT)
_REASON_CODE = {reason: code for code, reason in enumerate(END_REASONS)}


def _load():
    ext = extension("_fastflow")
    if ext is None or not hasattr(ext, "FlowTable") or ext.COLUMNS != len(_COLUMNS):
        return None
    return ext


_ext = _load()


def available() -> bool:
    """True when the compiled path is built and not switched off."""
    return _ext is not None


# -- decode --------------------------------------------------------------------------------


def decode_batch(buf: np.ndarray, lengths, port: int = VXLAN_PORT, present=None) -> PacketBatch:
    """`collector.decode.batch.decode_batch`, compiled: the same arguments, the same result."""
    if _ext is None or port not in _PORTS:
        return reference_decode_batch(buf, lengths, port, present)
    if buf.ndim != 2 or buf.dtype != np.uint8:
        raise ValueError("buf must be a 2-D uint8 array, one datagram per row")
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    n, width = buf.shape
    if lengths.ndim != 1 or len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} rows")
    if buf.strides[1] != 1:
        buf = np.ascontiguousarray(buf)
    if present is not None:
        present = np.ascontiguousarray(present, dtype=np.int64)
    columns = tuple([np.empty(n, dtype=dtype) for dtype in _DTYPE_OF])
    fallback = np.empty(n, dtype=np.uint8)
    left = _ext.decode(buf, lengths, present, port, columns, fallback)
    batch = PacketBatch(*columns)
    batch._columns = columns  # batch_columns: no check of 34 dtypes and layouts per batch
    if left:
        cut = np.minimum(lengths, width) if present is None else np.minimum(
            present, np.minimum(lengths, width))
        for i in np.flatnonzero(fallback).tolist():
            _decode_one(buf, lengths, cut, port, i, batch)
    return batch


def batch_counts(batch: PacketBatch, nreasons: int) -> tuple[list[int], int, list[tuple]]:
    """(rows per reason code, truncated decoded rows, [(vni, decoded rows, IP wire bytes)]
    in VNI order; unknown wire lengths count 0): `Pipeline._count`'s reductions in one call."""
    columns = _decoded_columns(batch)
    if columns is not None:
        return _ext.batch_counts(*(columns[i] for i in _COUNTED_AT), nreasons)
    return _ext.batch_counts(*(np.ascontiguousarray(getattr(batch, name), dtype=dtype)
                               for name, dtype in _COUNTED), nreasons)


_COUNTED = (("reason", np.uint8), ("vni", np.int32), ("wire_len", np.int32),
            ("truncated", np.bool_))
_COUNTED_AT = tuple(_COLUMNS.index(name) for name, _ in _COUNTED)


def _decoded_columns(batch: PacketBatch) -> tuple | None:
    """The columns `decode_batch` made for `batch` (contiguous, of the batch dtypes), if
    they are still its columns."""
    cached = batch.__dict__.get("_columns")
    if cached is not None and all(map(operator.is_, cached, batch.__dict__.values())):
        return cached
    return None


def batch_columns(batch: PacketBatch) -> tuple:
    """The columns of `batch` as the extension reads them (contiguous, of the batch dtypes)."""
    cached = _decoded_columns(batch)
    if cached is not None:
        return cached
    return tuple(np.ascontiguousarray(getattr(batch, name), dtype=dtype)
                 for name, dtype in zip(_COLUMNS, _DTYPE_OF))


def _texts(offsets: bytes, data: bytes, valid: np.ndarray) -> pa.Array:
    n = len(valid)
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data), bitmap,
                                       int(n - np.count_nonzero(valid)))


def _address_texts(raw: np.ndarray, version: np.ndarray, valid: np.ndarray) -> pa.Array:
    """str(ipaddress.ip_address(...)) of rows of 16 address bytes (IPv4 mapped when version 4),
    None where not valid."""
    valid = np.ascontiguousarray(valid, dtype=np.bool_)
    version = np.ascontiguousarray(version, dtype=np.int8)
    offsets, data = _ext.ip_texts(np.ascontiguousarray(raw).tobytes(), version.tobytes(),
                                  valid.view(np.uint8).tobytes())
    return _python_mapped_texts(_texts(offsets, data, valid), raw, version, valid)


def _python_mapped_texts(text: pa.Array, raw: np.ndarray, version: np.ndarray,
                         valid: np.ndarray) -> pa.Array:
    """`text` with IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) written as Python writes them:
    the reference path uses str(ipaddress.ip_address(...)), whose form changed in 3.13."""
    mapped = valid & (version == 6) & ~raw[:, :10].any(axis=1) & (raw[:, 10] == 255) & (raw[:, 11] == 255)
    if not mapped.any():
        return text
    values = text.to_pylist()
    for i in np.flatnonzero(mapped).tolist():
        values[i] = str(ipaddress.ip_address(raw[i].tobytes()))
    return arrow.strings(values)


def _sessions(vni: np.ndarray, registry: SessionRegistry | None) -> tuple[pa.Array, pa.Array]:
    """(session_id, network_interface_id) of each VNI: one registry lookup per distinct VNI."""
    vnis, where = np.unique(vni, return_inverse=True)
    session_ids, interfaces = [], []
    for value in vnis.tolist():
        session = registry.lookup(value) if registry and value >= 0 else None
        session_ids.append(session.session_id if session else None)
        interfaces.append(session.network_interface_id if session else None)
    # take_strings, not pa.Array.take: that imports pyarrow.compute (50 ms of a process)
    return arrow.take_strings(session_ids, where), arrow.take_strings(interfaces, where)


def _optional(values: np.ndarray) -> pa.Array:
    return arrow.numeric(values, values < 0)


def packets_record_batch(batch: PacketBatch, rows: np.ndarray, ts_ns: np.ndarray, buf, lengths,
                         packet_bytes: int, registry: SessionRegistry | None,
                         collector_id: str, present=None) -> pa.RecordBatch | None:
    """`collector.store.rows.packets_batch` of the decoded `rows`, their frames cut to
    `packet_bytes` as `Pipeline._write_packets` cuts them, in a few array operations. None
    when a row's frame would start before its slot (only hand-made batches): the caller takes
    the reference path then."""
    n = len(rows)
    if buf is None:
        frames = pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(
            np.zeros(n + 1, dtype=np.int32)), pa.py_buffer(b"")])
    else:
        length = np.asarray(lengths, dtype=np.int64)[rows]
        start = length - batch.captured_len[rows]  # where the frame begins
        if (start < 0).any():
            return None
        if present is not None:  # a snaplen kept fewer bytes: the rest of the slot is not data
            length = np.minimum(length, np.asarray(present, dtype=np.int64)[rows])
        stop = np.minimum(np.minimum(start + packet_bytes, length), buf.shape[1])
        size = np.maximum(stop - start, 0)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(size, out=offsets[1:])
        columns = np.arange(buf.shape[1])
        keep = (columns >= start[:, None]) & (columns < stop[:, None])
        data = buf[rows][keep]
        frames = pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets),
                                                               pa.py_buffer(data.tobytes())])
    vni = batch.vni[rows]
    version = batch.ip_version[rows]
    addresses = []
    for side in ("src", "dst"):
        halves = np.stack([getattr(batch, side + "_hi")[rows], getattr(batch, side + "_lo")[rows]], axis=1)
        raw = halves.astype(">u8").view(np.uint8).reshape(n, 16)
        addresses.append(_address_texts(raw, version, getattr(batch, side + "_ok")[rows]))
    session_ids, _ = _sessions(vni, registry)
    return pa.RecordBatch.from_arrays(
        [
            arrow.numeric(np.asarray(ts_ns[rows] // 1000, dtype=np.int64)).cast(PACKETS.field("ts").type),
            _optional(vni),
            session_ids,
            arrow.repeated(collector_id, n),
            _optional(version),
            _optional(batch.ip_proto[rows]),
            addresses[0],
            addresses[1],
            _optional(batch.src_port[rows]),
            _optional(batch.dst_port[rows]),
            _optional(batch.wire_len[rows]),
            arrow.numeric(batch.captured_len[rows]),
            arrow.numeric(batch.truncated[rows]),
            _optional(batch.tcp_flags[rows]),
            frames,
        ],
        schema=PACKETS,
    )


# -- flows ---------------------------------------------------------------------------------


class EndedFlows:
    """Flows that ended, as columns (the C table's `take()`), in the reference's order."""

    _NAMES = ("vni", "vlan", "inner", "ethertype", "version", "proto", "sport", "dport",
              "first_ns", "last_ns", "first_us", "last_us", "packets", "bytes", "captured",
              "truncated", "rev_packets", "rev_bytes", "rev_captured", "rev_truncated", "flags",
              "rev_flags", "reason", "src_ok", "dst_ok", "cid_ok")
    _TYPES = ("i4", "i2", "i2", "i4", "i1", "i2", "i4", "i4", "i8", "i8", "i8", "i8", "i8", "i8",
              "i8", "i8", "i8", "i8", "i8", "i8", "i2", "i2", "u1", "?", "?", "?")

    def __init__(self, taken: tuple | None = None) -> None:
        self.n = 0 if taken is None else taken[0]
        if not self.n:
            return
        values = taken[1:]
        for name, kind, raw in zip(self._NAMES, self._TYPES, values):
            setattr(self, name, np.frombuffer(raw, dtype=kind))
        rest = values[len(self._NAMES):]
        self.src = np.frombuffer(rest[0], dtype=np.uint8).reshape(-1, 16)
        self.dst = np.frombuffer(rest[1], dtype=np.uint8).reshape(-1, 16)
        self._text_offsets = rest[2:5]
        self._text_data = rest[5:8]

    def __len__(self) -> int:
        return self.n

    @classmethod
    def concat(cls, parts: list[EndedFlows]) -> EndedFlows:
        """The flows of `parts`, in order, as one: one Arrow batch for many small takes."""
        parts = [part for part in parts if part.n]
        if len(parts) <= 1:
            return parts[0] if parts else cls()
        out = cls()
        out.n = sum(part.n for part in parts)
        for name in (*cls._NAMES, "src", "dst"):
            setattr(out, name, np.concatenate([getattr(part, name) for part in parts]))
        offsets, data = [], []
        for which in range(3):
            pieces, base = [np.zeros(1, np.int32)], 0
            for part in parts:
                own = np.frombuffer(part._text_offsets[which], np.int32)
                pieces.append(own[1:] + np.int32(base))
                base += int(own[-1])
            if base >= 2**31:
                raise ValueError("more than 2 GiB of text in one column")
            offsets.append(np.concatenate(pieces).tobytes())
            data.append(b"".join(part._text_data[which] for part in parts))
        out._text_offsets, out._text_data = tuple(offsets), tuple(data)
        return out

    def _strings(self, which: int, valid: np.ndarray) -> pa.Array:
        return _texts(self._text_offsets[which], self._text_data[which], valid)

    def _addr_text(self, which: int) -> pa.Array:
        valid = self.src_ok if which == 0 else self.dst_ok
        raw = self.src if which == 0 else self.dst
        return _python_mapped_texts(self._strings(which, valid), raw, self.version, valid)

    _optional = staticmethod(_optional)

    def record_batch(self, registry: SessionRegistry | None, collector_id: str) -> pa.RecordBatch:
        """`collector.store.rows.flows_batch` of these flows."""
        n = self.n
        session_ids, interfaces = _sessions(self.vni, registry)
        timestamp = FLOWS.field("first_seen").type
        columns = [
            self._optional(self.vni),
            session_ids,
            interfaces,
            arrow.repeated(collector_id, n),
            self._optional(self.vlan),
            self._optional(self.inner),
            self._optional(self.ethertype),
            self._optional(self.version),
            self._optional(self.proto),
            self._addr_text(0),
            self._addr_text(1),
            self._optional(self.sport),
            self._optional(self.dport),
            arrow.numeric(self.first_us).view(timestamp),
            arrow.numeric(self.last_us).view(timestamp),
            arrow.numeric(self.packets),
            arrow.numeric(self.bytes),
            arrow.numeric(self.rev_packets),
            arrow.numeric(self.rev_bytes),
            arrow.numeric(self.captured),
            arrow.numeric(self.rev_captured),
            arrow.numeric(self.truncated),
            arrow.numeric(self.rev_truncated),
            arrow.numeric(self.flags),
            arrow.numeric(self.rev_flags),
            arrow.take_strings(END_REASONS, self.reason),
            self._strings(2, self.cid_ok),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=FLOWS)

    def flows(self) -> list[EndedFlow]:
        """The reference's `EndedFlow` objects, in order."""
        if not self.n:
            return []

        def opt(values):
            return [None if v < 0 else v for v in values.tolist()]

        def addresses(raw, ok):
            return [None if not present else bytes(row[12:]) if v == 4 else bytes(row)
                    for row, present, v in zip(raw, ok.tolist(), self.version.tolist())]

        columns = [opt(self.vni), opt(self.vlan), opt(self.inner), opt(self.ethertype),
                   opt(self.version), opt(self.proto), addresses(self.src, self.src_ok),
                   addresses(self.dst, self.dst_ok), opt(self.sport), opt(self.dport),
                   self.first_ns.tolist(), self.last_ns.tolist(), self.packets.tolist(),
                   self.bytes.tolist(), self.captured.tolist(), self.truncated.tolist(),
                   self.flags.tolist(), self.rev_packets.tolist(), self.rev_bytes.tolist(),
                   self.rev_captured.tolist(), self.rev_truncated.tolist(),
                   self.rev_flags.tolist(), [END_REASONS[r] for r in self.reason.tolist()]]
        return [EndedFlow(*values) for values in zip(*columns)]


class FastFlowTable:
    """`collector.flows.table.FlowTable` with its state in C; its methods return `EndedFlows`."""

    def __init__(self, config: FlowConfig | None = None) -> None:
        if _ext is None:
            raise RuntimeError("collector._fastflow is not available")
        self.config = config or FlowConfig()
        c = self.config
        # the same integer nanoseconds the reference computes
        self._table = _ext.FlowTable(
            int(c.idle_timeout * NS), int(c.active_timeout * NS), int(c.close_linger * NS),
            int(c.fragment_timeout * NS), c.max_flows, c.max_fragments)

    def __len__(self) -> int:
        return len(self._table)

    @property
    def packets(self) -> int:
        return self._table.stats()[0]

    @property
    def exported(self) -> dict[str, int]:
        return dict(zip(END_REASONS, self._table.stats()[1]))

    @property
    def evicted(self) -> int:
        return self.exported["evicted"]

    def memory(self) -> int:
        """Bytes the C table holds (records, index, heap, fragments, pending rows)."""
        return self._table.memory()

    def _take(self, ended: int, community_id: bool = True) -> EndedFlows:
        return EndedFlows(self._table.take(community_id)) if ended else EndedFlows()

    def add_batch(self, batch: PacketBatch, ts_ns) -> EndedFlows:
        """Meter the decoded rows of `batch`, row i seen at ts_ns[i]."""
        ts = np.ascontiguousarray(ts_ns, dtype=np.int64)
        if len(ts) != len(batch):
            raise ValueError(f"{len(ts)} timestamps for {len(batch)} rows")
        return self._take(self._table.add_batch(batch_columns(batch), ts))

    def expire(self, now_ns: int) -> EndedFlows:
        return self._take(self._table.expire(int(now_ns)))

    def snapshot(self, reason: str = "shutdown", community_id: bool = True) -> EndedFlows:
        """`community_id` False: that column NULL, for a third of the time (the journal)."""
        return self._take(self._table.snapshot(_REASON_CODE[reason]), community_id)

    def checkpoint(self) -> EndedFlows:
        return self._take(self._table.checkpoint())

    def drain(self, reason: str = "shutdown") -> EndedFlows:
        return self._take(self._table.drain(_REASON_CODE[reason]))


__all__ = ["EndedFlows", "FastFlowTable", "available", "batch_columns", "decode_batch",
           "packets_record_batch"]
