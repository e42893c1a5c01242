"""Capture files, record by record: classic pcap and pcapng.

`read_capture(path)` iterates over the packet records, one `Record` each: the captured bytes,
the length the packet had on the wire, an integer timestamp in nanoseconds, the link type, and
where the record sits in the file. It is the ingest hot path, so it is written with `struct` over a
buffer that is refilled in 1 MiB chunks: memory stays bounded whatever the file size, and a
pipe works as well as a file.

Formats (draft-ietf-opsawg-pcap, draft-ietf-opsawg-pcapng):

- classic pcap in both byte orders, with microsecond (a1b2c3d4) or nanosecond (a1b23c4d)
  timestamps. The header's link type field carries the FCS length in its upper bits: the
  link type is the low 16 bits. `thiszone` is ignored, as libpcap does (it is always 0).
- pcapng: any number of sections, each in its own byte order, each with its own interfaces;
  Enhanced, Simple and (obsolete) Packet Blocks; every other block is skipped by its length.
  An interface's `if_tsresol` (a power of 10 or of 2; default microseconds) and `if_tsoffset`
  (seconds) are applied, so every timestamp comes out in nanoseconds since the epoch.

Anything that cannot be read raises `CaptureError`, whose message names the file, the byte
offset and what is wrong. Records numbered in messages count from 1, as tshark numbers
frames (`Record.index` counts from 0). Records yielded before an error stay yielded: the
caller keeps everything that was readable.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Iterator, NamedTuple

MAX_CAPLEN = 262144  # libpcap's MAXIMUM_SNAPLEN: a larger caplen means a corrupt record
MAX_BLOCK_LEN = 16 << 20  # pcapng blocks we parse (packets, headers): larger is corrupt
CHUNK = 1 << 20

PCAP_HEADER_LEN = 24
PCAP_RECORD_HEADER_LEN = 16
# magic as read little-endian -> (struct byte order, nanosecond timestamps)
_PCAP_MAGICS = {
    0xA1B2C3D4: ("<", False),
    0xA1B23C4D: ("<", True),
    0xD4C3B2A1: (">", False),
    0x4D3CB2A1: (">", True),
}

# pcapng block types and the smallest length each can have
SHB, IDB, PB, SPB, EPB = 0x0A0D0D0A, 1, 2, 3, 6
_SHB_TYPE_BYTES = b"\x0a\x0d\x0d\x0a"  # the same in both byte orders
_MIN_BLOCK_LEN = {SHB: 28, IDB: 20, PB: 32, SPB: 16, EPB: 32}
_PACKET_BLOCKS = frozenset((EPB, SPB, PB))
_BLOCK_NAMES = {SHB: "section header block", IDB: "interface description block"}
# interface description options
_OPT_ENDOFOPT, _OPT_TSRESOL, _OPT_TSOFFSET = 0, 9, 14
NS_PER_S = 1_000_000_000

__all__ = ["CaptureError", "Record", "read_capture", "MAX_CAPLEN"]


class CaptureError(ValueError):
    """A capture file that cannot be read further.

    `path` names the file, `offset` is the byte offset of the faulty header or record,
    `detail` says what is wrong (and repeats the offset).
    """

    def __init__(self, path: str, offset: int, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.offset = offset
        self.detail = detail


class Record(NamedTuple):
    """One packet record of a capture file.

    A NamedTuple rather than a frozen dataclass: it is as immutable and as slim (no instance
    dict), and building one costs a quarter as much (`bench/capture.py` measures both): at a
    million records a second, that is most of the reader's time.
    """

    timestamp_ns: int  # nanoseconds since the Unix epoch (UTC)
    linktype: int  # LINKTYPE_* value: 1 Ethernet, 113 Linux SLL, ...
    data: bytes  # the captured bytes (fewer than wire_len under a snaplen)
    wire_len: int  # the packet's length on the wire, from the record header
    offset: int  # byte offset of the record (pcapng: of its block) in the file
    index: int  # 0-based number of the record in the file
    interface: int = 0  # pcapng interface id within its section; 0 for classic pcap


_new_record = tuple.__new__  # Record(...) without the Python-level __new__: the hot path


def read_capture(path: str | os.PathLike) -> Iterator[Record]:
    """Return an iterator over every packet record of the pcap or pcapng file at `path`.

    A file that is not a capture raises `CaptureError` here, at once; a fault further on
    (a record cut short, an impossible length) raises it when iteration reaches it, after the
    records before it. `OSError` when the file cannot be opened. The file is closed when the
    iterator is exhausted, fails or is closed.
    """
    name = os.fsdecode(path)
    f = open(path, "rb")
    try:
        stream = _Stream(f)
        available = stream.fill(4)
        magic = stream.buf[:4]
        if magic == _SHB_TYPE_BYTES:
            return _pcapng_records(stream, name)
        if available < 4 or int.from_bytes(magic, "little") not in _PCAP_MAGICS:
            shown = f"magic 0x{magic.hex()}" if magic else "no bytes"
            raise CaptureError(name, 0, f"not a pcap or pcapng file: {shown} at offset 0")
        return _pcap_records(stream, name)
    except BaseException:
        f.close()
        raise


class _Stream:
    """A file read in chunks. `buf[pos:]` holds the next unread bytes, found at file offset
    `base + pos`; `fill(n)` reads until n bytes are unread or the file ends."""

    __slots__ = ("f", "buf", "pos", "base")

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.buf, self.pos, self.base = f, b"", 0, 0

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def fill(self, need: int) -> int:
        """Make `need` bytes available at `pos`; return how many are (fewer only at EOF)."""
        available = len(self.buf) - self.pos
        if available >= need:
            return available
        parts = [self.buf[self.pos :]]
        while available < need:
            more = self.f.read(max(CHUNK, need - available))
            if not more:
                break
            parts.append(more)
            available += len(more)
        self.base += self.pos
        self.buf, self.pos = b"".join(parts), 0
        return available

    def skip(self, count: int) -> int:
        """Consume up to `count` bytes without keeping them; return how many were there."""
        skipped = 0
        while skipped < count:
            available = len(self.buf) - self.pos
            if available == 0 and self.fill(1) == 0:
                break
            step = min(count - skipped, len(self.buf) - self.pos)
            self.pos += step
            skipped += step
        return skipped


# -- classic pcap ------------------------------------------------------------------------------


def _pcap_records(stream: _Stream, name: str) -> Iterator[Record]:
    with stream.f:  # closed when the records end, fail, or the iterator is closed
        if stream.fill(PCAP_HEADER_LEN) < PCAP_HEADER_LEN:
            have = len(stream.buf)
            raise CaptureError(name, 0, f"pcap file header at offset 0 is cut: {have} of 24 bytes")
        order, nano = _PCAP_MAGICS[int.from_bytes(stream.buf[:4], "little")]
        linktype = struct.unpack_from(order + "I", stream.buf, 20)[0] & 0xFFFF
        stream.pos = PCAP_HEADER_LEN
        unpack = struct.Struct(order + "IIII").unpack_from
        frac_ns = 1 if nano else 1000
        # The hot loop reads only locals and literals (16 is the record header's length):
        # a global costs a dictionary lookup per record.
        new, record, ns_per_s, max_caplen = _new_record, Record, NS_PER_S, MAX_CAPLEN
        index = 0
        while True:
            buf, pos, base = stream.buf, stream.pos, stream.base
            end = len(buf)
            while pos + 16 <= end:
                sec, frac, caplen, wire_len = unpack(buf, pos)
                if caplen > max_caplen:
                    raise CaptureError(
                        name, base + pos, f"record {index + 1} at offset {base + pos} has caplen "
                        f"{caplen}, more than the {MAX_CAPLEN} bytes a pcap record can hold")
                next_pos = pos + 16 + caplen
                if next_pos > end:
                    break
                yield new(record, (sec * ns_per_s + frac * frac_ns, linktype,
                                   buf[pos + 16 : next_pos], wire_len, base + pos, index, 0))
                index += 1
                pos = next_pos
            stream.pos = pos
            # The buffer ends inside the next record's header, or inside its data.
            caplen = unpack(buf, pos)[2] if pos + PCAP_RECORD_HEADER_LEN <= end else 0
            need = PCAP_RECORD_HEADER_LEN + caplen
            available = stream.fill(need)
            if available >= need:
                continue
            if available == 0:
                return
            offset = stream.offset
            if available < PCAP_RECORD_HEADER_LEN:
                raise CaptureError(name, offset, f"record {index + 1} at offset {offset} is cut: "
                                   f"{available} bytes left, its header needs 16")
            raise CaptureError(name, offset, f"record {index + 1} at offset {offset} is cut: "
                               f"caplen {caplen}, {available - PCAP_RECORD_HEADER_LEN} bytes left")


# -- pcapng ------------------------------------------------------------------------------------


class _Interface(NamedTuple):
    linktype: int
    snaplen: int  # 0: no limit
    ticks_per_s: int  # the timestamp unit, from if_tsresol
    offset_ns: int  # if_tsoffset


class _Section:
    """The byte order and interfaces of the current pcapng section."""

    def __init__(self, order: str) -> None:
        self.order = order
        self.interfaces: list[_Interface] = []
        self.block_head = struct.Struct(order + "II").unpack_from
        self.epb = struct.Struct(order + "IIIII").unpack_from  # iface, ts hi/lo, caplen, len
        self.pb = struct.Struct(order + "HHIIII").unpack_from  # iface, drops, ts, caplen, len
        self.u32 = struct.Struct(order + "I").unpack_from


def _pcapng_records(stream: _Stream, name: str) -> Iterator[Record]:
    with stream.f:  # closed when the records end, fail, or the iterator is closed
        section: _Section | None = None
        index = 0  # packet records so far
        while True:
            available = stream.fill(12)
            if available == 0:
                return
            offset = stream.offset
            if available < 12:
                raise CaptureError(name, offset, f"block at offset {offset} is cut: "
                                   f"{available} bytes left, the smallest block has 12")
            buf, pos = stream.buf, stream.pos
            if buf[pos : pos + 4] == _SHB_TYPE_BYTES:  # a new section: new byte order
                section = _Section(_section_order(buf, pos, name, offset))
            assert section is not None  # the file starts with a section header
            block_type, block_len = section.block_head(buf, pos)
            block = _Block(name, offset, block_type, block_len, index)
            _check_block_len(block)
            if block_type not in _MIN_BLOCK_LEN:
                _skip(stream, section, block)
                continue
            if block_type in _PACKET_BLOCKS:
                _check_caplen(stream, section, block)
            if block_len > MAX_BLOCK_LEN:
                raise block.error(f"has length {block_len}, more than the {MAX_BLOCK_LEN} "
                                  "bytes allowed")
            available = stream.fill(block_len)
            if available < block_len:
                raise block.error(f"is cut: block length {block_len}, {available} bytes left")
            buf, pos = stream.buf, stream.pos
            _check_trailer(section, buf, pos + block_len - 4, block)
            stream.pos = pos + block_len
            if block_type == EPB:
                yield _enhanced_packet(section, buf, pos, block)
            elif block_type == PB:
                yield _obsolete_packet(section, buf, pos, block)
            elif block_type == SPB:
                yield _simple_packet(section, buf, pos, block)
            elif block_type == IDB:
                section.interfaces.append(_interface(section, buf, pos, block_len))
                continue
            else:
                _check_version(section, buf, pos, block)
                continue
            index += 1


class _Block(NamedTuple):
    """Where a pcapng block sits, to name it in an error."""

    file: str
    offset: int
    type: int
    length: int
    index: int  # the record index it gets if it is a packet block

    def error(self, problem: str) -> CaptureError:
        if self.type in _PACKET_BLOCKS:
            what = f"record {self.index + 1}"
        else:
            what = f"{_BLOCK_NAMES.get(self.type, 'block')} (type 0x{self.type:08x})"
        return CaptureError(self.file, self.offset, f"{what} at offset {self.offset} {problem}")


def _section_order(buf: bytes, pos: int, name: str, offset: int) -> str:
    magic = buf[pos + 8 : pos + 12]
    if magic == b"\x4d\x3c\x2b\x1a":
        return "<"
    if magic == b"\x1a\x2b\x3c\x4d":
        return ">"
    raise CaptureError(name, offset, f"section header block at offset {offset} has "
                       f"byte-order magic 0x{magic.hex()}, neither 1a2b3c4d nor 4d3c2b1a")


def _check_version(section: _Section, buf: bytes, pos: int, block: _Block) -> None:
    major, minor = struct.unpack_from(section.order + "HH", buf, pos + 12)
    if major != 1:
        raise block.error(f"has pcapng version {major}.{minor}: only 1.x exists")


def _check_block_len(block: _Block) -> None:
    if block.length % 4:
        raise block.error(f"has length {block.length}, not a multiple of 4")
    smallest = _MIN_BLOCK_LEN.get(block.type, 12)
    if block.length < smallest:
        raise block.error(f"has length {block.length}, smaller than {smallest}")


def _check_trailer(section: _Section, buf: bytes, at: int, block: _Block) -> None:
    (trailer,) = section.u32(buf, at)
    if trailer != block.length:
        raise block.error(f"has trailing length {trailer}, leading length {block.length}")


def _check_caplen(stream: _Stream, section: _Section, block: _Block) -> None:
    """Reject an absurd packet length from the block's fixed fields, before reading its body:
    a corrupt length field must not make us buffer gigabytes."""
    if block.type == SPB:
        return  # its captured length is bounded by the block length
    available = stream.fill(28)
    if available < 28:
        raise block.error(f"is cut: block length {block.length}, {available} bytes left")
    (caplen,) = section.u32(stream.buf, stream.pos + 20)
    if caplen > MAX_CAPLEN:
        raise block.error(f"has caplen {caplen}, more than the {MAX_CAPLEN} bytes a packet "
                          "record can hold")
    if 28 + caplen > block.length - 4:
        raise block.error(f"has caplen {caplen}, more than its {block.length}-byte block holds")


def _skip(stream: _Stream, section: _Section, block: _Block) -> None:
    """Step over a block we do not read, streaming it: its size does not matter."""
    skipped = stream.skip(block.length - 4)
    available = stream.fill(4) if skipped == block.length - 4 else 0
    if available < 4:
        raise block.error(f"is cut: block length {block.length}, "
                          f"{skipped + available} bytes left")
    _check_trailer(section, stream.buf, stream.pos, block)
    stream.pos += 4


def _interface_of(section: _Section, interface: int, block: _Block) -> _Interface:
    if interface >= len(section.interfaces):
        raise block.error(f"names interface {interface}, but its section declares "
                          f"{len(section.interfaces)}")
    return section.interfaces[interface]


def _enhanced_packet(section: _Section, buf: bytes, pos: int, block: _Block) -> Record:
    interface, ts_high, ts_low, caplen, wire_len = section.epb(buf, pos + 8)
    iface = _interface_of(section, interface, block)
    ts = ((ts_high << 32) | ts_low) * NS_PER_S // iface.ticks_per_s + iface.offset_ns
    data = buf[pos + 28 : pos + 28 + caplen]
    return _new_record(Record, (ts, iface.linktype, data, wire_len, block.offset, block.index,
                                interface))


def _obsolete_packet(section: _Section, buf: bytes, pos: int, block: _Block) -> Record:
    """A Packet Block (type 2, obsolete): an EPB with a 16-bit interface id and drop count."""
    interface, _drops, ts_high, ts_low, caplen, wire_len = section.pb(buf, pos + 8)
    iface = _interface_of(section, interface, block)
    ts = ((ts_high << 32) | ts_low) * NS_PER_S // iface.ticks_per_s + iface.offset_ns
    data = buf[pos + 28 : pos + 28 + caplen]
    return _new_record(Record, (ts, iface.linktype, data, wire_len, block.offset, block.index,
                                interface))


def _simple_packet(section: _Section, buf: bytes, pos: int, block: _Block) -> Record:
    """A Simple Packet Block: interface 0, no timestamp (0), the captured length implied:
    min(original length, snaplen), and never past the block (whose data is padded to 4)."""
    iface = _interface_of(section, 0, block)
    (wire_len,) = section.u32(buf, pos + 8)
    caplen = min(wire_len, block.length - 16)
    if iface.snaplen:
        caplen = min(caplen, iface.snaplen)
    if caplen > MAX_CAPLEN:
        raise block.error(f"has caplen {caplen}, more than the {MAX_CAPLEN} bytes a packet "
                          "record can hold")
    data = buf[pos + 12 : pos + 12 + caplen]
    return _new_record(Record, (0, iface.linktype, data, wire_len, block.offset, block.index, 0))


def _interface(section: _Section, buf: bytes, pos: int, block_len: int) -> _Interface:
    """An Interface Description Block: link type, snaplen, and the options that set the
    timestamp unit (if_tsresol) and offset (if_tsoffset)."""
    linktype, _reserved, snaplen = struct.unpack_from(section.order + "HHI", buf, pos + 8)
    ticks_per_s, offset_ns = 1_000_000, 0
    at, end = pos + 16, pos + block_len - 4
    option_head = struct.Struct(section.order + "HH").unpack_from
    while at + 4 <= end:
        code, length = option_head(buf, at)
        value_at = at + 4
        if code == _OPT_ENDOFOPT or value_at + length > end:
            break  # the end of the options, or one that overruns the block: stop there
        if code == _OPT_TSRESOL and length >= 1:
            # high bit clear: 10^-n seconds per tick; set: 2^-n
            exponent = buf[value_at] & 0x7F
            ticks_per_s = 2**exponent if buf[value_at] & 0x80 else 10**exponent
        elif code == _OPT_TSOFFSET and length >= 8:
            offset_ns = struct.unpack_from(section.order + "q", buf, value_at)[0] * NS_PER_S
        at = value_at + (length + 3) // 4 * 4
    return _Interface(linktype, snaplen, ticks_per_s, offset_ns)
