"""What every input must satisfy, one function per fuzz target: `check_<target>(data)`.

Each takes arbitrary bytes, runs one parser of untrusted input, and raises AssertionError
(or lets an unexpected exception escape) when the parser misbehaves: an exception other than
its documented error type, a result outside its field ranges, or two implementations that
disagree. The atheris harnesses (fuzz/harness.py) and the hypothesis properties
(tests/test_fuzz_*.py) call the same functions, so a crash found by one is replayed by the
other.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tempfile

import numpy as np

from collector.capture import MAX_CAPLEN, CaptureError, read_capture
from collector.decode import Malformed, decode_batch, decode_datagram
from collector.decode.packet import Packet
from collector.serve import config as serve_config
from collector.sessions import SessionRegistry, SessionsError, parse_document

PORTS = (4789, 4790, 6081)

# the Packet fields a batch row carries (MACs and GWLB ids stay with the reference decoder)
BATCH_FIELDS = ("encap", "vni", "reserved_bits", "geneve_vni", "captured_len", "ethertype",
                "l3_offset", "ip_version", "ip_header_len", "ip_tos", "ip_ttl", "ip_id",
                "frag_offset", "more_fragments", "ip_proto", "src_addr", "dst_addr", "wire_len",
                "l4_offset", "src_port", "dst_port", "tcp_flags", "icmp_type", "icmp_code",
                "truncated")

_RANGES = {"vni": 1 << 24, "geneve_vni": 1 << 24, "ethertype": 1 << 16, "ip_tos": 256,
           "ip_ttl": 256, "ip_proto": 256, "src_port": 1 << 16, "dst_port": 1 << 16,
           "tcp_flags": 1 << 9, "icmp_type": 256, "icmp_code": 256, "wire_len": 1 << 32}


def check_packet(pkt: Packet, received: int, length: int) -> None:
    """Field ranges and offsets of a decoded packet of `received` bytes (`length` on the wire)."""
    for name, bound in _RANGES.items():
        value = getattr(pkt, name)
        assert value is None or 0 <= value < bound, (name, value)
    assert pkt.captured_len is None or 0 <= pkt.captured_len <= length, pkt.captured_len
    for name in ("l3_offset", "l4_offset"):
        value = getattr(pkt, name)
        assert value is None or 0 <= value <= length, (name, value)
    for name in ("src_addr", "dst_addr"):
        value = getattr(pkt, name)
        assert value is None or len(value) in (4, 16), (name, value)


def check_datagram(data: bytes) -> None:
    """decode_datagram raises Malformed and nothing else; what it returns is in range.

    data[0] picks the port; data[1] (odd) says the payload is only the head of a longer
    datagram (a receive slot), by data[1] * 37 bytes."""
    if len(data) < 2:
        return
    port, payload = PORTS[data[0] % 3], data[2:]
    length = len(payload) + (data[1] * 37 if data[1] & 1 else 0)
    try:
        pkt = decode_datagram(payload, port, length=length)
    except Malformed as err:
        assert 0 <= err.offset <= len(payload), (err.offset, len(payload))
        return
    check_packet(pkt, len(payload), length)


def _rows(data: bytes):
    """data -> (port, slot width, datagrams, bytes present of each): length-prefixed rows."""
    port, width = PORTS[data[0] % 3], 8 + data[1] % 193
    rows, present, at = [], [], 3
    while at < len(data) and len(rows) < 64:
        size, cut = data[at - 1], data[at]
        rows.append(data[at + 1 : at + 1 + size])
        present.append(cut)
        at += 2 + size
    return port, width, rows, present


def check_batch(data: bytes) -> None:
    """decode_batch agrees with decode_datagram on every row, field by field, whatever the
    slot width, and whatever the bytes left in a slot past its datagram."""
    if len(data) < 4:
        return
    port, width, rows, present = _rows(data)
    if not rows:
        return
    buf = np.full((len(rows), width), 0xA5, dtype=np.uint8)  # stale slot bytes
    cuts = [min(p if p <= len(r) else len(r), width) for p, r in zip(present, rows)]
    for i, (row, cut) in enumerate(zip(rows, cuts)):
        buf[i, :cut] = np.frombuffer(row[:cut], dtype=np.uint8)
    lengths = np.array([len(r) for r in rows])
    batch = decode_batch(buf, lengths, port, np.array(cuts))
    for i, (row, cut) in enumerate(zip(rows, cuts)):
        try:
            want = decode_datagram(row[:cut], port, length=len(row))
        except Malformed as err:
            want = err
        got = batch.packet(i)
        if isinstance(want, Malformed):
            assert isinstance(got, Malformed) and got.reason == want.reason, (i, want, got)
            continue
        assert not isinstance(got, Malformed), (i, got, want)
        for name in BATCH_FIELDS:
            assert getattr(got, name) == getattr(want, name), (i, name, getattr(got, name), getattr(want, name))


_scratch = None


def _scratch_file(data: bytes) -> str:
    """One temporary file per process, rewritten for each input (fuzzers call us a lot)."""
    global _scratch
    if _scratch is None:
        fd, _scratch = tempfile.mkstemp(prefix="collector-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.close(fd)
    with open(_scratch, "wb") as f:
        f.write(data)
    return _scratch


def check_capture(data: bytes) -> None:
    """read_capture yields well-formed records and then ends or raises CaptureError (naming
    the file and an offset inside it); nothing else, and no record larger than MAX_CAPLEN."""
    path = _scratch_file(data)
    index, last_offset = 0, -1
    try:
        for record in read_capture(path):
            assert record.index == index, (record.index, index)
            assert last_offset < record.offset < len(data), (record.offset, last_offset)
            assert len(record.data) <= MAX_CAPLEN
            assert record.offset + len(record.data) <= len(data)
            assert record.wire_len >= 0 and isinstance(record.timestamp_ns, int)
            last_offset, index = record.offset, index + 1
    except CaptureError as err:
        assert err.path == path and 0 <= err.offset <= len(data), (err.offset, len(data))
        assert str(err).startswith(path)


def check_sessions(data: bytes) -> None:
    """Any bytes as a sessions/targets/filters file: a registry or SessionsError, nothing else."""
    try:
        document = parse_document(data, "fuzz.json")
        registry = SessionRegistry.from_documents([("fuzz.json", document)])
    except SessionsError as err:
        assert "fuzz.json" in str(err) or "VirtualNetworkId" in str(err) or "used by two" in str(err), str(err)
        return
    for session in registry:
        assert 0 <= session.vni < 1 << 24
        registry.to_json()


def check_config(data: bytes) -> None:
    """Any bytes as a serve TOML file, and as COLLECTOR_* variables: a ServeConfig whose every
    value is in range, or ConfigError naming the source; nothing else."""
    path = _scratch_file(data)
    try:
        config = serve_config.load(path, env={})
    except serve_config.ConfigError as err:
        assert str(err).startswith(path), str(err)
    else:
        _check_config_ranges(config)
    text = data.decode("utf-8", "replace")
    env = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        env["COLLECTOR_" + key.strip().upper()] = value.replace("\0", "")
    try:
        config = serve_config.load(None, env=env)
    except serve_config.ConfigError as err:
        assert str(err).startswith("environment: "), str(err)
    else:
        _check_config_ranges(config)


def _check_config_ranges(config) -> None:
    for address in (config.listen, config.health, config.geneve_listen):
        if address is not None:
            assert 0 < address.port < 65536 and _bindable_host(address.host), address
    for name in ("flush_seconds", "idle_timeout", "active_timeout", "shutdown_timeout", "health_stale"):
        value = getattr(config, name)
        assert value > 0 and math.isfinite(value), (name, value)
    for name in ("workers", "max_flows", "batch", "rcvbuf"):
        assert getattr(config, name) > 0, name
    assert config.rcvbuf < 2**31, config.rcvbuf  # setsockopt takes a C int
    assert 0 <= config.packet_bytes <= 9000 and config.min_free >= 0


def _bindable_host(host: str) -> bool:
    """An address literal, or a name made of DNS labels (not all digits: that is an address)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except (OSError, ValueError):
            pass
    labels = host.rstrip(".").split(".")
    return (not all(label.isdigit() for label in labels)
            and all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels))


def check_fastflow(data: bytes) -> None:
    """The compiled batch decoder (collector._fastflow) equals the reference decode_batch,
    column for column, on the rows check_batch builds."""
    from collector.flows import fast

    if len(data) < 4:
        return
    port, width, rows, present = _rows(data)
    if not rows:
        return
    buf = np.full((len(rows), width), 0x5A, dtype=np.uint8)
    cuts = [min(p if p <= len(r) else len(r), width) for p, r in zip(present, rows)]
    for i, (row, cut) in enumerate(zip(rows, cuts)):
        buf[i, :cut] = np.frombuffer(row[:cut], dtype=np.uint8)
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    if data[2] & 1:  # also lengths past what the row holds, and no `present` at all
        lengths += data[2] * 97
        cuts = None
    want = decode_batch(buf, lengths, port, None if cuts is None else np.array(cuts))
    got = fast.decode_batch(buf, lengths, port, None if cuts is None else np.array(cuts))
    for name in want.__dataclass_fields__:
        a, b = getattr(want, name), getattr(got, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), (name, a, b)


def _walk(path: str, compiled: bool) -> tuple:
    """Everything ingest's capture walk hands on (fed rows, counters, error), as values."""
    from collector import ingest as ingest_module

    events = []

    def feed(slots):
        n = slots.rows
        events.append((slots.port, slots.buf[:n].tobytes(), slots.lengths[:n].tolist(),
                       slots.present[:n].tolist(), slots.ts[:n].tolist(), slots.no_vni[:n].tolist()))

    batches = ingest_module._Batches(ingest_module.HEADER_SLOT, None, feed,
                                     lambda clock: events.append(("tick", clock)), 3)
    result = ingest_module.IngestResult()
    error = None
    try:
        done = None
        if compiled:
            done = ingest_module._walk_compiled(_fastcapture(), path, batches, result, None,
                                                pause_bytes=64)
        if done is None:
            ingest_module._walk_records(path, batches, result, None)
    except CaptureError as err:
        error = (err.offset, str(err))
    batches.feed_all()
    return error, (result.records, result.mirror_datagrams, result.plain_packets, result.skipped), events


def _fastcapture():
    from collector.compiled import extension

    return extension("_fastcapture")


def check_fastcapture(data: bytes) -> None:
    """The compiled capture walker (collector._fastcapture, over the file mapped in memory)
    hands ingest exactly what read_capture's walk does: the same rows, counters, error."""
    path = _scratch_file(data)
    reference, compiled = _walk(path, compiled=False), _walk(path, compiled=True)
    assert compiled[0] == reference[0], (compiled[0], reference[0])
    assert compiled[1] == reference[1], (compiled[1], reference[1])
    assert compiled[2] == reference[2]


TARGETS = {
    "datagram": check_datagram,
    "batch": check_batch,
    "capture": check_capture,
    "sessions": check_sessions,
    "config": check_config,
}


def _compiled_targets() -> None:
    """The compiled fast paths, when this build has them (their harnesses compare them with
    the Python reference on every input; atheris sees the Python side's coverage only)."""
    from collector.compiled import extension
    from collector.flows import fast

    if fast.available():
        TARGETS["fastflow"] = check_fastflow
    ext = extension("_fastcapture")
    if ext is not None and hasattr(ext, "Walker"):
        TARGETS["fastcapture"] = check_fastcapture


_compiled_targets()
