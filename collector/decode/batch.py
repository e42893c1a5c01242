"""Columnar decoding of many datagrams at once: the receive path's decoder.

The input is what a batched receive produces: a 2-D uint8 array with one datagram per row
(a fixed-width receive slot, so a row may hold only the first bytes of a long datagram) and
each datagram's real length. The output is one numpy column per field, None encoded as -1.

AWS traffic is nearly all one shape: VXLAN `08 00 00 00 | VNI | 00`, an untagged Ethernet
header, IPv4 without options or IPv6 without extension headers. For rows of that shape every
field sits at a fixed offset, so a field of all rows is one strided column read, and the
presence of each field is one comparison of the row's length with the field's end (so
truncated copies stay on the fast path). Every other row (VLAN tags, IPv4 options, IPv6
extension headers, GENEVE with unusual options, anything malformed) goes through
`decode_datagram`, the reference decoder; the two agree field for field, which the tests
check on generated and mutated input.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from collector.decode.datagram import GENEVE_PORT, VXLAN_PORT, decode_datagram
from collector.decode.errors import Malformed, Reason
from collector.decode.packet import Packet

ENCAPS = ("vxlan", "vxlan-gpe", "geneve", "geneve-vxlan")
REASONS = (None,) + tuple(Reason)  # code 0: decoded; code k: REASONS[k]
_REASON_CODE = {reason: code for code, reason in enumerate(REASONS) if reason is not None}
_ENCAP_CODE = {name: code for code, name in enumerate(ENCAPS)}
_PORT_PROTOCOLS = (6, 17, 33, 132, 136)
_ICMP_PROTOCOLS = (1, 58)
_IPV6_EXTENSIONS = (0, 43, 44, 51, 60, 135, 139, 140)
_IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
# bytes of each row the fast path reads, from the VXLAN header to the IPv6 TCP flags (8 + 14 +
# 40 + 14 = 76), rounded up to whole words
_REGION = 80
_IPV4_MAPPED_LO = np.uint64(0xFFFF << 32)  # low half of ::ffff:0.0.0.0


@dataclass
class PacketBatch:
    """Decoded columns of n datagrams. Integer fields use -1 for None.

    `reason` is 0 for a decoded row and the index in `REASONS` of a malformed one (whose
    other fields are -1/False). Addresses are 16 bytes, IPv4 as IPv4-mapped IPv6
    (::ffff:a.b.c.d), held as two big-endian uint64 halves (`src_hi`, `src_lo`) so that
    flow keys sort and hash as plain integers; `src_ok` / `dst_ok` say whether they were
    received.
    """

    reason: np.ndarray  # uint8
    encap: np.ndarray  # int8 index in ENCAPS
    vni: np.ndarray  # int32
    reserved_bits: np.ndarray  # bool
    geneve_vni: np.ndarray  # int32
    captured_len: np.ndarray  # int32
    ethertype: np.ndarray  # int32
    vlan: np.ndarray  # int16: outermost VLAN id
    inner_vlan: np.ndarray  # int16: second VLAN id
    vlan_count: np.ndarray  # int8
    l3_offset: np.ndarray  # int16
    ip_version: np.ndarray  # int8
    ip_header_len: np.ndarray  # int16
    ip_tos: np.ndarray  # int16
    ip_ttl: np.ndarray  # int16
    ip_id: np.ndarray  # int64 (IPv6 fragment ids are 32 bits)
    frag_offset: np.ndarray  # int32
    more_fragments: np.ndarray  # int8
    ip_proto: np.ndarray  # int16
    src_hi: np.ndarray  # uint64: address bytes 0-7
    src_lo: np.ndarray  # uint64: address bytes 8-15
    dst_hi: np.ndarray
    dst_lo: np.ndarray
    src_ok: np.ndarray  # bool
    dst_ok: np.ndarray  # bool
    wire_len: np.ndarray  # int32
    l4_offset: np.ndarray  # int16
    src_port: np.ndarray  # int32
    dst_port: np.ndarray  # int32
    tcp_flags: np.ndarray  # int16
    icmp_type: np.ndarray  # int16
    icmp_code: np.ndarray  # int16
    truncated: np.ndarray  # bool

    @classmethod
    def empty(cls, n: int) -> PacketBatch:
        columns = {}
        for spec in fields(cls):
            dtype = _DTYPES[spec.name]
            if dtype in (np.bool_, np.uint64) or spec.name in ("reason", "vlan_count"):
                columns[spec.name] = np.zeros(n, dtype=dtype)
            else:
                columns[spec.name] = np.full(n, -1, dtype=dtype)
        return cls(**columns)

    def __len__(self) -> int:
        return len(self.reason)

    @property
    def malformed(self) -> np.ndarray:
        return self.reason != 0

    def reason_counts(self) -> dict[str, int]:
        """{reason label: rows} for the malformed rows, for metrics."""
        codes, counts = np.unique(self.reason[self.reason != 0], return_counts=True)
        return {REASONS[c].value: int(k) for c, k in zip(codes, counts)}

    def addresses(self, side: str, rows: np.ndarray) -> list[bytes | None]:
        """The `side` ("src" or "dst") addresses of `rows` as 4 or 16 bytes (None: cut)."""
        present = getattr(self, side + "_ok")[rows].tolist()
        high = getattr(self, side + "_hi")[rows].tolist()
        low = getattr(self, side + "_lo")[rows].tolist()
        version = self.ip_version[rows].tolist()
        return [
            None if not ok
            else (lo & 0xFFFFFFFF).to_bytes(4, "big") if v == 4
            else ((hi << 64) | lo).to_bytes(16, "big")
            for ok, hi, lo, v in zip(present, high, low, version)
        ]

    def packet(self, i: int) -> Packet | Malformed:
        """Row i as the reference decoder's `Packet` (the fields the batch carries)."""
        if self.reason[i]:
            return Malformed(REASONS[self.reason[i]], -1, "decoded in a batch")
        pkt = Packet(encap=ENCAPS[self.encap[i]], reserved_bits=bool(self.reserved_bits[i]),
                     captured_len=int(self.captured_len[i]), truncated=bool(self.truncated[i]))
        for name in _OPTIONAL_INTS:
            value = int(getattr(self, name)[i])
            setattr(pkt, name, None if value < 0 else value)
        if self.more_fragments[i] >= 0:
            pkt.more_fragments = bool(self.more_fragments[i])
        pkt.vlans = tuple(int(v) for v in (self.vlan[i], self.inner_vlan[i])[: self.vlan_count[i]])
        for side in ("src", "dst"):
            if getattr(self, side + "_ok")[i]:
                raw = int(getattr(self, side + "_hi")[i]).to_bytes(8, "big")
                raw += int(getattr(self, side + "_lo")[i]).to_bytes(8, "big")
                setattr(pkt, side + "_addr", raw[12:] if pkt.ip_version == 4 else raw)
        return pkt


_DTYPES = {
    "reason": np.uint8, "encap": np.int8, "vni": np.int32, "reserved_bits": np.bool_,
    "geneve_vni": np.int32, "captured_len": np.int32, "ethertype": np.int32, "vlan": np.int16,
    "inner_vlan": np.int16, "vlan_count": np.int8, "l3_offset": np.int16,
    "ip_version": np.int8, "ip_header_len": np.int16, "ip_tos": np.int16, "ip_ttl": np.int16,
    "ip_id": np.int64, "frag_offset": np.int32, "more_fragments": np.int8,
    "ip_proto": np.int16, "src_hi": np.uint64, "src_lo": np.uint64, "dst_hi": np.uint64,
    "dst_lo": np.uint64, "src_ok": np.bool_, "dst_ok": np.bool_, "wire_len": np.int32, "l4_offset": np.int16,
    "src_port": np.int32, "dst_port": np.int32, "tcp_flags": np.int16, "icmp_type": np.int16,
    "icmp_code": np.int16, "truncated": np.bool_,
}
_OPTIONAL_INTS = (
    "vni", "geneve_vni", "ethertype", "l3_offset", "ip_version", "ip_header_len", "ip_tos",
    "ip_ttl", "ip_id", "frag_offset", "ip_proto", "wire_len", "l4_offset", "src_port",
    "dst_port", "tcp_flags", "icmp_type", "icmp_code",
)


def decode_batch(buf: np.ndarray, lengths, port: int = VXLAN_PORT, present=None) -> PacketBatch:
    """Decode row i of `buf` as a datagram of lengths[i] bytes received on `port`.

    Row i holds the datagram's first present[i] bytes: by default min(lengths[i], width), as a
    receive slot does; a capture cut by its snaplen holds fewer, and the bytes after them in
    the row are not the datagram's."""
    if buf.ndim != 2 or buf.dtype != np.uint8:
        raise ValueError("buf must be a 2-D uint8 array, one datagram per row")
    lengths = np.asarray(lengths, dtype=np.int64)
    n, width = buf.shape
    if len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} rows")
    present = np.minimum(lengths, width) if present is None else np.minimum(
        np.asarray(present, dtype=np.int64), np.minimum(lengths, width))
    out = PacketBatch.empty(n)
    done = np.zeros(n, dtype=bool)
    if port == VXLAN_PORT:
        rows = present >= 8
        if rows.all():
            done = _fixed_layout(buf, lengths, present, 8, out, slice(None))  # no copy
        else:
            rows = np.flatnonzero(rows)
            handled = _fixed_layout(buf[rows], lengths[rows], present[rows], 8, out, rows)
            done[rows[handled]] = True
    elif port == GENEVE_PORT:
        for base, rows in _gwlb_groups(buf, present):
            handled = _fixed_layout(buf[rows], lengths[rows], present[rows], base, out, rows)
            if handled.any():
                hit = rows[handled]
                out.encap[hit] = _ENCAP_CODE["geneve-vxlan"]
                out.geneve_vni[hit] = _u24(buf[hit], 4)
                out.reserved_bits[hit] |= ((buf[hit, 1] & 0x3F) | buf[hit, 7]) != 0
                done[hit] = True
    for i in np.flatnonzero(~done):
        _decode_one(buf, lengths, present, port, int(i), out)
    return out


def _gwlb_groups(buf: np.ndarray, present: np.ndarray):
    """Rows shaped GENEVE (IPv4 protocol) -> IPv4 without options -> UDP 4789 -> VXLAN, grouped
    by where the mirrored frame starts, which depends on the GENEVE options length."""
    if buf.shape[1] < 8:
        return
    opt_bytes = (buf[:, 0].astype(np.int64) & 0x3F) * 4
    base = opt_bytes + 8 + 20 + 8 + 8  # GENEVE, options, IPv4, UDP, VXLAN
    plausible = ((buf[:, 0] >> 6) == 0) & (buf[:, 2] == 0x08) & (buf[:, 3] == 0)
    plausible &= present >= base
    for value in np.unique(base[plausible]):
        rows = np.flatnonzero(plausible & (base == value))
        ip = int(value) - 36
        group = buf[rows]
        ok = (group[:, ip] == 0x45) & (group[:, ip + 9] == 17)
        ok &= ((group[:, ip + 6] & 0x1F) | group[:, ip + 7]) == 0  # not a later fragment
        ok &= (group[:, ip + 22] == 0x12) & (group[:, ip + 23] == 0xB5)  # UDP dst 4789
        ok &= _options_well_formed(group, ip)
        if ok.any():
            yield int(value), rows[ok]


def _options_well_formed(group: np.ndarray, options_end: int) -> np.ndarray:
    """Walk the option TLVs of every row at once: True where they end exactly at the end of
    the options area (GWLB: three TLVs, so three steps)."""
    at = np.full(len(group), 8, dtype=np.int64)
    index = np.arange(len(group))
    while True:
        walking = at < options_end
        if not walking.any():
            return at == options_end
        step = 4 + (group[index[walking], np.minimum(at[walking] + 3, options_end - 1)] & 0x1F) * 4
        at[walking] += step


def _decode_one(buf, lengths, present, port, i, out: PacketBatch) -> None:
    length = int(lengths[i])
    try:
        pkt = decode_datagram(buf[i, : int(present[i])].tobytes(), port, length=length)
    except Malformed as err:
        out.reason[i] = _REASON_CODE[err.reason]
        return
    out.encap[i] = _ENCAP_CODE[pkt.encap]
    out.reserved_bits[i] = pkt.reserved_bits
    out.captured_len[i] = pkt.captured_len
    out.truncated[i] = pkt.truncated
    for name in _OPTIONAL_INTS:
        value = getattr(pkt, name)
        if value is not None:
            getattr(out, name)[i] = value
    if pkt.more_fragments is not None:
        out.more_fragments[i] = pkt.more_fragments
    out.vlan_count[i] = min(len(pkt.vlans), 2)
    for column, vlan in zip((out.vlan, out.inner_vlan), pkt.vlans):
        column[i] = vlan
    for side in ("src", "dst"):
        addr = getattr(pkt, side + "_addr")
        if addr is not None:
            if len(addr) == 4:
                addr = _IPV4_MAPPED_PREFIX + addr
            getattr(out, side + "_hi")[i] = int.from_bytes(addr[:8], "big")
            getattr(out, side + "_lo")[i] = int.from_bytes(addr[8:], "big")
            getattr(out, side + "_ok")[i] = True


def _u16(b: np.ndarray, at: int) -> np.ndarray:
    return (b[:, at].astype(np.int32) << 8) | b[:, at + 1]


def _u24(b: np.ndarray, at: int) -> np.ndarray:
    return (b[:, at].astype(np.int32) << 16) | (b[:, at + 1].astype(np.int32) << 8) | b[:, at + 2]


def _one_of(values: np.ndarray, choices) -> np.ndarray:
    hit = values == choices[0]
    for choice in choices[1:]:
        hit |= values == choice
    return hit


def _fixed_layout(b: np.ndarray, lengths: np.ndarray, present: np.ndarray, base: int,
                  out: PacketBatch, rows) -> np.ndarray:
    """Decode the rows of `b` that have the common shape, with the VXLAN header at base-8 and
    the mirrored frame at `base`; `rows` (a slice or an index array) says where they go in
    `out`. Returns the mask of rows handled; the others are left to the reference decoder,
    and their columns here are left at None."""
    m, width = b.shape
    l3 = base + 14
    if m == 0 or width < l3 + 1:
        return np.zeros(m, dtype=bool)
    cap = (lengths - base).astype(np.int32)  # bytes of the mirrored frame in the copy
    avail = present.astype(np.int32) - l3  # IP-layer bytes in the buffer
    ip_cap = cap - 14  # IP-layer bytes in the copy

    # Reading one byte of every slot walks memory with the slot's stride, a cache line per
    # row per field. Instead: copy the header bytes once, transpose them as 8-byte words
    # (a byte-wise transpose is 5x slower), and read a byte column as every 8th byte of one
    # contiguous word row.
    start = base - 8
    region = np.zeros((m, _REGION), dtype=np.uint8)
    copied = min(width, start + _REGION) - start
    region[:, :copied] = b[:, start : start + copied]
    words = region.view(np.uint64).T.copy().view(np.uint8)  # (_REGION / 8, m * 8)

    def col(at: int) -> np.ndarray:  # byte `at` of every row; zeros past the buffer's width
        rel = at - start
        return words[rel >> 3, rel & 7 :: 8]

    def col16(at: int) -> np.ndarray:
        return (col(at).astype(np.int32) << 8) | col(at + 1)

    flags = col(base - 8)
    first = col(l3)
    ethertype = col16(base + 12)
    v4 = (ethertype == 0x0800) & (first == 0x45)
    v6 = (ethertype == 0x86DD) & ((first >> 4) == 6)
    ok = ((flags & 0x08) != 0) & (avail >= 1) & (v4 | v6)
    # IPv4: the common shape has no options; every layout offset below depends on it.
    off = lambda v4_at, v6_at: np.where(v4, col(l3 + v4_at), col(l3 + v6_at))  # noqa: E731
    total = col16(l3 + 2)
    payload_len = col16(l3 + 4)
    next_header = col(l3 + 6)
    ok &= ~(v4 & (avail >= 4) & (total > 0) & (total < 20))  # malformed: the reference says so
    ok &= ~(v6 & (avail >= 7) & _one_of(next_header, _IPV6_EXTENSIONS))  # chain: reference
    frag_field = col16(l3 + 6)
    frag_offset = np.where(v4, (frag_field & 0x1FFF) * 8, 0)
    proto = np.where(v4, col(l3 + 9), next_header).astype(np.int16)
    proto_ok = avail >= np.where(v4, 10, 7)
    header_len = np.where(v4, 20, 40)
    wire = np.where(v4, total, payload_len + 40)
    wire_ok = np.where(v4, (avail >= 4) & (total > 0), (avail >= 6) & (payload_len > 0))
    # L4 lies inside the IP packet (Ethernet padding is not L4), never in a later fragment.
    l4_avail = np.where(wire_ok, np.minimum(avail, wire), avail) - header_len
    has_l4 = proto_ok & (frag_offset == 0) & (l4_avail >= 0)
    l4 = lambda k: np.where(v4, col(l3 + 20 + k), col(l3 + 40 + k)).astype(np.int32)  # noqa: E731
    tcp = has_l4 & (proto == 6)
    udp = has_l4 & (proto == 17)
    ok &= ~(tcp & (l4_avail >= 13) & ((l4(12) >> 4) < 5))  # TCP data offset < 5
    udp_len = (l4(4) << 8) | l4(5)
    ok &= ~(udp & (l4_avail >= 6) & (udp_len > 0) & (udp_len < 8))
    if not ok.any():
        return ok
    v4, v6 = v4 & ok, v6 & ok

    _put(out.encap, rows, _ENCAP_CODE["vxlan"], ok)
    _put(out.vni, rows, (col16(base - 4) << 8) | col(base - 2), ok)
    reserved = (flags != 0x08) | (col(base - 7) != 0) | (col(base - 6) != 0)
    reserved |= (col(base - 5) != 0) | (col(base - 1) != 0)
    out.reserved_bits[rows] = reserved & ok
    _put(out.captured_len, rows, cap, ok)
    _put(out.ethertype, rows, ethertype, ok)
    _put(out.l3_offset, rows, 14, ok)
    _put(out.ip_version, rows, np.where(v4, 4, 6), ok)
    v6_class = ((first & 0x0F) << 4) | (col(l3 + 1) >> 4)
    _put(out.ip_tos, rows, np.where(v4, col(l3 + 1), v6_class), ok & (avail >= 2))
    _put(out.wire_len, rows, wire, ok & wire_ok)
    _put(out.ip_ttl, rows, off(8, 7), ok & (avail >= np.where(v4, 9, 8)))
    _put(out.ip_id, rows, payload_len, v4 & (avail >= 6))  # IPv4 bytes 4-5: identification
    _put(out.frag_offset, rows, frag_offset, ok & (avail >= np.where(v4, 8, 7)))
    more = np.where(v4, (frag_field & 0x2000) != 0, 0)
    _put(out.more_fragments, rows, more, ok & (avail >= np.where(v4, 8, 7)))
    _put(out.ip_proto, rows, proto, ok & proto_ok)
    _put(out.ip_header_len, rows, header_len, v4 | (v6 & (avail >= 7)))
    _addresses(b, l3, v4, v6, avail, out, rows, width)
    # truncated: fewer IP bytes in the copy than on the wire; when the length is unknown,
    # only a copy cut before the length field is known to be cut
    truncated = np.where(wire_ok, ip_cap < wire, ip_cap < np.where(v4, 4, 6))
    out.truncated[rows] = truncated & ok
    has_l4 &= ok
    _put(out.l4_offset, rows, np.where(v4, 34, 54), has_l4)
    ports = has_l4 & _one_of(proto, _PORT_PROTOCOLS)
    _put(out.src_port, rows, (l4(0) << 8) | l4(1), ports & (l4_avail >= 2))
    _put(out.dst_port, rows, (l4(2) << 8) | l4(3), ports & (l4_avail >= 4))
    _put(out.tcp_flags, rows, ((l4(12) & 1) << 8) | l4(13), tcp & ok & (l4_avail >= 14))
    icmp = has_l4 & _one_of(proto, _ICMP_PROTOCOLS)
    _put(out.icmp_type, rows, l4(0), icmp & (l4_avail >= 1))
    _put(out.icmp_code, rows, l4(1), icmp & (l4_avail >= 2))
    return ok


def _put(column: np.ndarray, rows, values, present: np.ndarray) -> None:
    # Cast first: -1 must be the column's None, not a uint8 wrapped to 255.
    values = np.asarray(values).astype(column.dtype, copy=False)
    column[rows] = np.where(present, values, column.dtype.type(-1))


def _addresses(b, l3, v4, v6, avail, out: PacketBatch, rows, width) -> None:
    """Addresses as uint64 halves, IPv4 as ::ffff:a.b.c.d; the bytes of each row are read
    as big-endian integers in one strided copy per half."""
    m = len(b)

    def be(at: int, size: int) -> np.ndarray:  # bytes [at, at+size) of every row, as integers
        if at + size > width:
            return np.zeros(m, dtype=np.uint64)
        chunk = np.ascontiguousarray(b[:, at : at + size]).view(">u8" if size == 8 else ">u4")
        return chunk.ravel().astype(np.uint64)

    src_ok = (v4 & (avail >= 16)) | (v6 & (avail >= 24))
    dst_ok = (v4 & (avail >= 20)) | (v6 & (avail >= 40))
    zero = np.uint64(0)
    for side, ok, v4_at, v6_at in (("src", src_ok, 12, 8), ("dst", dst_ok, 16, 24)):
        hi = np.where(v6 & ok, be(l3 + v6_at, 8), zero)
        lo = np.where(v6 & ok, be(l3 + v6_at + 8, 8), zero)
        lo = np.where(v4 & ok, be(l3 + v4_at, 4) | _IPV4_MAPPED_LO, lo)
        getattr(out, side + "_hi")[rows] = hi
        getattr(out, side + "_lo")[rows] = lo
        getattr(out, side + "_ok")[rows] = ok
