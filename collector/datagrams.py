"""The mirror datagrams of capture files, decoded: what `collector decode` prints.

`decode_capture(paths)` reads each capture (`collector.capture`), finds the datagrams sent to a
mirror port (`collector.decode.outer`) and decodes each one (`collector.decode`) exactly as
the live listener decodes what it receives. `format_line`, `to_json` and `Stats.summary` turn
the results into the command's table lines, JSON objects and summary.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Iterable, Iterator, NamedTuple

from collector.capture import NS_PER_S, Record, read_capture
from collector.decode import Malformed, Packet, decode_datagram
from collector.decode.outer import Outer, outer_datagram
from collector.decode.packet import ETH_IPV4, ETH_IPV6

__all__ = ["Decoded", "Stats", "decode_capture", "format_line", "header_line", "to_json"]


class Decoded(NamedTuple):
    """One mirror datagram of a capture: its record, its outer headers, and the decoded
    packet or the reason it is malformed."""

    record: Record
    outer: Outer
    packet: Packet | Malformed


@dataclass
class Stats:
    """What `decode_capture` has read so far."""

    records: int = 0  # capture records read
    datagrams: int = 0  # of which mirror datagrams
    decoded: int = 0
    malformed: Counter = field(default_factory=Counter)  # Reason value -> count
    truncated: int = 0  # decoded copies that AWS cut (Packet.truncated)
    capture_cut: int = 0  # datagrams of which the capture holds only the first bytes

    def summary(self) -> str:
        malformed = sum(self.malformed.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.malformed.items()))
        return (f"{self.records} records, {self.datagrams} mirror datagrams: {self.decoded} "
                f"decoded, {malformed} malformed{f' ({reasons})' if reasons else ''}, "
                f"{self.truncated} truncated copies, {self.capture_cut} cut by the capture")


def decode_capture(paths: Iterable[str | os.PathLike], stats: Stats | None = None
                   ) -> Iterator[Decoded]:
    """Every mirror datagram of the captures at `paths`, in file order, decoded.

    `stats`, when given, is updated as records are read. Raises `CaptureError` from the reader
    (after the datagrams that precede the fault).

    A capture's snaplen may have cut a datagram. The datagram is then decoded with
    `length=` the payload length its UDP header announces, as the live listener decodes a
    datagram larger than its receive slot: `captured_len`, `wire_len` and `truncated` describe
    the copy AWS sent (which had all those bytes), not the capture, which is what the flow
    counts need. The fields whose bytes the capture lacks stay None although AWS sent them:
    a None field then does not mean that the session's PacketLength cut it. `Outer.cut` (and
    `Stats.capture_cut`) tells these datagrams apart.
    """
    stats = Stats() if stats is None else stats
    for path in paths:
        for record in read_capture(path):
            stats.records += 1
            outer = outer_datagram(record.linktype, record.data)
            if outer is None:
                continue
            stats.datagrams += 1
            stats.capture_cut += outer.cut
            try:
                packet = decode_datagram(outer.payload, outer.port, length=outer.payload_len)
            except Malformed as e:
                stats.malformed[e.reason.value] += 1
                yield Decoded(record, outer, e)
                continue
            stats.decoded += 1
            stats.truncated += packet.truncated
            yield Decoded(record, outer, packet)


# -- presentation ----------------------------------------------------------------------------

PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
ETHERTYPE_NAMES = {0x0806: "arp", 0x88CC: "lldp", 0x8847: "mpls"}
# TCP flag letters from bit 0 up: FIN SYN RST PSH ACK URG ECE CWR NS
TCP_FLAG_LETTERS = "FSRPAUECN"
ENCAP_OF_PORT = {4789: "vxlan", 4790: "vxlan-gpe", 6081: "geneve"}
_EPOCH = datetime(1970, 1, 1)


def iso_time(timestamp_ns: int) -> str:
    """`2026-01-01T00:00:00.001000Z`: UTC to the microsecond (truncated, never rounded up)."""
    seconds, rest = divmod(timestamp_ns, NS_PER_S)
    try:
        moment = _EPOCH + timedelta(seconds=seconds, microseconds=rest // 1000)
    except OverflowError:  # past year 9999: a pcapng offset gone wild
        return str(timestamp_ns)
    return moment.isoformat(timespec="microseconds") + "Z"


def tcp_flag_letters(flags: int | None) -> str:
    """`SA`, `FPA`: a letter per flag set; `.` for none, `-` when unknown."""
    if flags is None:
        return "-"
    return "".join(c for bit, c in enumerate(TCP_FLAG_LETTERS) if flags >> bit & 1) or "."


def endpoint(addr: bytes | None, port: int | None) -> str:
    """`10.0.0.1:443`, `[fd00::1]:443`, `10.0.0.1` (no port), `?` (address cut)."""
    text = "?" if addr is None else str(ipaddress.ip_address(addr))
    if port is None:
        return text
    return f"[{text}]:{port}" if addr is not None and len(addr) == 16 else f"{text}:{port}"


def _text(value) -> str:
    return "-" if value is None else str(value)


def header_line(sessions: bool = False) -> str:
    session = f"{'SESSION':<21}  " if sessions else ""
    return (f"{'NO.':>6}  {'TIME':<27}  {'ENCAP':<12}  {'VNI':>8}  {session}"
            f"{'SOURCE':<21} → {'DESTINATION':<21}  {'PROTO':<6}  {'FLAGS':<5}  "
            f"{'WIRE':>5}  {'CAP':>5}  T  REASON").rstrip()


def format_line(decoded: Decoded, session: str | None = None) -> str:
    """One table line. `session` is the session id column (None: no such column).

    NO. counts records from 1 as tshark does; WIRE is the inner IP packet's length on the
    wire, CAP the bytes of the inner frame AWS sent; T marks a copy AWS truncated. `?` is an
    address the copy was cut before, `-` a field that does not apply or is unknown.
    """
    record, outer, packet = decoded
    head = f"{record.index + 1:>6}  {iso_time(record.timestamp_ns):<27}  "
    column = "" if session is None else f"{session:<21}  "
    if isinstance(packet, Malformed):
        encap = ENCAP_OF_PORT.get(outer.port, str(outer.port))
        return (f"{head}{encap:<12}  {'-':>8}  {column}{'-':<21} → {'-':<21}  {'-':<6}  "
                f"{'-':<5}  {'-':>5}  {'-':>5}     {packet.reason.value}")
    proto = packet.ip_proto
    flags = tcp_flag_letters(packet.tcp_flags) if proto == 6 else "-"
    if packet.ip_version is None and packet.ethertype not in (None, ETH_IPV4, ETH_IPV6):
        # not IP (ARP, LLDP...): no addresses to show, the ethertype as the protocol
        src = dst = "-"
        protocol = ETHERTYPE_NAMES.get(packet.ethertype, f"0x{packet.ethertype:04x}")
    else:
        src = endpoint(packet.src_addr, packet.src_port)
        dst = endpoint(packet.dst_addr, packet.dst_port)
        protocol = PROTOCOL_NAMES.get(proto, _text(proto))
    return (f"{head}{packet.encap:<12}  {_text(packet.vni):>8}  {column}{src:<21} → {dst:<21}  "
            f"{protocol:<6}  {flags:<5}  "
            f"{_text(packet.wire_len):>5}  {packet.captured_len:>5}  "
            f"{'T' if packet.truncated else ''}").rstrip()


def to_json(decoded: Decoded) -> dict:
    """One JSON object: the record, the outer datagram, and every `Packet` field (addresses as
    text), or `malformed` with the reason."""
    record, outer, packet = decoded
    obj = {
        "index": record.index,
        "timestamp_ns": record.timestamp_ns,
        "time": iso_time(record.timestamp_ns),
        "outer_src": str(ipaddress.ip_address(outer.src)),
        "outer_dst": str(ipaddress.ip_address(outer.dst)),
        "outer_src_port": outer.src_port,
        "outer_dst_port": outer.port,
        "udp_payload_len": outer.payload_len,
        "udp_payload_captured": len(outer.payload),
    }
    if isinstance(packet, Malformed):
        obj["malformed"] = {"reason": packet.reason.value, "offset": packet.offset,
                            "detail": packet.detail}
        return obj
    obj["malformed"] = None
    for f in dataclasses.fields(Packet):
        obj[f.name] = _json_value(f.name, getattr(packet, f.name))
    return obj


def _json_value(name: str, value):
    if value is None:
        return None
    if name in ("src_addr", "dst_addr"):
        return str(ipaddress.ip_address(value))
    if name in ("eth_src", "eth_dst"):
        return value.hex(":")
    if isinstance(value, tuple):
        return list(value)
    return value
