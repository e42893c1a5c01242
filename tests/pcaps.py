"""The shared real captures (`<project root>/../shared/pcaps`), read with dpkt.

Independent of `collector`: the tests use this to find what the network delivered to a
mirroring target (the UDP payloads sent to 4789/6081) and then hand those bytes to the decoder.

`unavailable()` skips a test whose inputs are missing, or fails it when
`COLLECTOR_REQUIRE_REFERENCE=1` (CI), so that a broken CI machine cannot pass by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Iterator, NoReturn

import dpkt
import pytest

PCAPS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "pcaps"
REQUIRE_ENV = "COLLECTOR_REQUIRE_REFERENCE"
MIRROR_PORTS = (4789, 6081)  # VXLAN, GENEVE
CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap")

# pcapng block types (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-02.html)
_SHB, _IDB, _PB, _SPB, _EPB = 0x0A0D0D0A, 1, 2, 3, 6
_SHB_LE_MAGIC = b"\x4d\x3c\x2b\x1a"


def tshark_path() -> str | None:
    """tshark on PATH, or Debian's, or None."""
    if found := shutil.which("tshark"):
        return found
    return "/usr/bin/tshark" if os.access("/usr/bin/tshark", os.X_OK) else None


def reference_required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip for want of `reason`; under COLLECTOR_REQUIRE_REFERENCE=1, fail instead."""
    if reference_required():
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 forbids skipping the reference tests")
    pytest.skip(reason)


def capture_files() -> list[Path]:
    """Every capture under PCAPS_DIR (all subfolders), sorted; [] when the folder is absent."""
    if not PCAPS_DIR.is_dir():
        return []
    return sorted(
        p for p in PCAPS_DIR.rglob("*") if p.is_file() and p.suffix in CAPTURE_SUFFIXES
    )


def capture_id(path: Path) -> str:
    """`vxlan/tcpdump_vxlan.pcap`: a stable test id."""
    return path.relative_to(PCAPS_DIR).as_posix()


@cache
def census() -> dict[str, dict] | None:
    """analysis.jsonl (the per-file census shipped with the captures) by file name, or None."""
    path = PCAPS_DIR / "analysis.jsonl"
    if not path.is_file():
        return None
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["file"]: row for row in rows}


# -- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    number: int  # 1-based, as tshark's frame.number
    linktype: int
    data: bytes  # the captured bytes (fewer than the wire length under a snaplen)


def read_records(path: Path) -> Iterator[Record]:
    """Every packet record of a classic pcap (any byte order, µs or ns) or pcapng file."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head == b"\x0a\x0d\x0d\x0a":
            records = _pcapng_records(f.read())
        else:
            reader = dpkt.pcap.Reader(f)
            linktype = reader.datalink() & 0xFFFF  # upper bits: FCS length flags
            records = ((linktype, buf) for _, buf in reader)
        for number, (linktype, data) in enumerate(records, 1):
            yield Record(number, linktype, bytes(data))


def _pcapng_records(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(linktype, bytes) per packet block, with each block's own interface (dpkt's Reader
    assumes one interface and skips simple packet blocks; tshark counts every packet block)."""
    pcapng = dpkt.pcapng
    # block type -> dpkt class, little-endian / big-endian
    classes = {
        _IDB: (pcapng.InterfaceDescriptionBlockLE, pcapng.InterfaceDescriptionBlock),
        _EPB: (pcapng.EnhancedPacketBlockLE, pcapng.EnhancedPacketBlock),
        _PB: (pcapng.PacketBlockLE, pcapng.PacketBlock),
    }
    off, le, interfaces = 0, True, []
    while off + 12 <= len(data):
        if data[off : off + 4] == b"\x0a\x0d\x0d\x0a":  # a new section: byte order, interfaces
            le, interfaces = data[off + 8 : off + 12] == _SHB_LE_MAGIC, []
        block_type, block_len = struct.unpack_from("<II" if le else ">II", data, off)
        if block_len < 12:
            raise ValueError(f"pcapng block of {block_len} bytes at offset {off}")
        block = data[off : off + block_len]
        if block_type == _IDB:
            idb = classes[_IDB][0 if le else 1](block)
            interfaces.append((idb.linktype, idb.snaplen))
        elif block_type in (_EPB, _PB):
            packet = classes[block_type][0 if le else 1](block)
            yield interfaces[packet.iface_id][0], packet.pkt_data
        elif block_type == _SPB:  # no interface id: the first one; caplen = min(len, snaplen)
            (wire_len,) = struct.unpack_from("<I" if le else ">I", block, 8)
            linktype, snaplen = interfaces[0]
            yield linktype, block[12 : 12 + min(wire_len, snaplen or wire_len, block_len - 16)]
        off += block_len


# -- link layer to IP -------------------------------------------------------------------------


def _raw_ip(buf: bytes):
    version = buf[0] >> 4 if buf else 0
    return dpkt.ip.IP(buf) if version == 4 else dpkt.ip6.IP6(buf) if version == 6 else None


_LINK_DECODERS = {
    0: dpkt.loopback.Loopback,  # NULL: the family in host byte order (dpkt reads both)
    1: dpkt.ethernet.Ethernet,  # incl. 802.1Q/802.1ad tags and MPLS
    12: _raw_ip,  # RAW (OpenBSD value)
    14: _raw_ip,  # RAW (BSD/OS value)
    101: _raw_ip,  # RAW
    108: dpkt.loopback.Loopback,  # OpenBSD LOOP: the family in network byte order
    113: dpkt.sll.SLL,
    228: dpkt.ip.IP,  # IPV4
    229: dpkt.ip6.IP6,  # IPV6
    276: dpkt.sll2.SLL2,
}


def outer_ip(record: Record):
    """The first IPv4/IPv6 layer of the record as a dpkt object, or None (ARP, unknown link
    type, a header dpkt cannot parse)."""
    decoder = _LINK_DECODERS.get(record.linktype)
    if decoder is None:
        return None
    try:
        layer = decoder(record.data)
    except (dpkt.UnpackError, IndexError, struct.error):
        return None
    for _ in range(8):  # link header -> (PPPoE -> PPP ->) IP
        if isinstance(layer, (dpkt.ip.IP, dpkt.ip6.IP6)):
            return layer
        layer = getattr(layer, "data", None)
        if layer is None or isinstance(layer, (bytes, bytearray)):
            return None
    return None


# -- UDP datagrams ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Datagram:
    frame: int  # record number
    src_port: int
    dst_port: int
    udp_length: int  # the UDP length field (8 + payload on the wire)
    payload: bytes  # the payload bytes captured: fewer than udp_length - 8 when cut

    @property
    def cut(self) -> bool:
        return len(self.payload) < self.udp_length - 8


def udp_datagram(record: Record) -> Datagram | None:
    """The record's outer UDP datagram, or None when the first IP layer does not carry UDP
    (a non-first fragment carries no UDP header)."""
    ip = outer_ip(record)
    if ip is None:
        return None
    if isinstance(ip, dpkt.ip.IP) and ip.offset:
        return None
    udp = ip.data
    if ip.p != dpkt.ip.IP_PROTO_UDP or not isinstance(udp, dpkt.udp.UDP):
        return None
    payload = udp.data
    if not isinstance(payload, (bytes, bytearray)):
        raise TypeError(f"dpkt decoded the UDP payload of frame {record.number} as {type(payload)}")
    if udp.ulen >= 8:  # 0: an IPv6 jumbogram; the IP length already bounds the payload
        payload = payload[: udp.ulen - 8]
    return Datagram(record.number, udp.sport, udp.dport, udp.ulen, bytes(payload))


def mirror_datagrams(path: Path, ports=MIRROR_PORTS) -> list[Datagram]:
    """The UDP datagrams of the capture whose destination port is a mirror port."""
    datagrams = (udp_datagram(record) for record in read_records(path))
    return [d for d in datagrams if d is not None and d.dst_port in ports]
