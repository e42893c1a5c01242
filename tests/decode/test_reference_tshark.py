"""The decoder against tshark, datagram by datagram, on the shared real captures.

For every UDP datagram to 4789 (VXLAN) or 6081 (GENEVE) in every capture under
../shared/pcaps, dpkt extracts the UDP payload (only the bytes the capture holds when a snaplen
cut the record), `decode_datagram` decodes it, and each field is compared
with what tshark dissected in the same frame: VNIs, the encapsulation, inner VLAN ids and
ethertype, addresses, IP protocol, wire length, ports, TCP flags, ICMP type and code.

tshark prints every occurrence of a field in the frame (outer, inner, tunnel in the tunnel...).
Which occurrence describes the mirrored frame is worked out from `frame.protocols`: the layer
right after the mirror encapsulation we remove (the first VXLAN, the first GENEVE, or GENEVE ->
IP -> UDP 4789 -> VXLAN), and for each field the number of layers of its protocol before it.

Fields tshark does not report (a layer cut by the snaplen) are not compared, but wherever tshark
reports a value the decoder must have one. `truncated` is compared with tshark's signs of a cut
frame (`_ws.short`, or an IP length beyond the bytes at hand), and the frames dpkt selects
(UDP to 4789/6081 right after the first IP layer) must be the ones tshark shows.

tshark costs 0.3 s of start-up per capture, so it runs only on the captures with datagrams to
compare or that the census (analysis.jsonl) marks as VXLAN/GENEVE, all at once in the background.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

from collector.decode import Malformed, decode_datagram
from tests import pcaps
from tests.pcaps import tshark_path

pytestmark = pytest.mark.reference

TSHARK_FIELDS = (
    "frame.number",
    "frame.protocols",
    "vxlan.vni",
    "geneve.vni",
    "eth.type",
    "vlan.id",
    "vlan.etype",
    "ieee8021ad.id",
    "ip.src",
    "ip.dst",
    "ip.proto",
    "ip.len",
    "ipv6.src",
    "ipv6.dst",
    "ipv6.nxt",
    "ipv6.plen",
    "ipv6.hopopts.nxt",
    "ipv6.routing.nxt",
    "ipv6.fraghdr.nxt",
    "ipv6.dstopts.nxt",
    "udp.srcport",
    "udp.dstport",
    "tcp.srcport",
    "tcp.dstport",
    "tcp.flags",
    "sctp.srcport",
    "sctp.dstport",
    "dccp.srcport",
    "dccp.dstport",
    "icmp.type",
    "icmp.code",
    "icmpv6.type",
    "icmpv6.code",
    "_ws.short",  # a dissector ran past the captured bytes: the snaplen cut the frame
    "_ws.malformed",
    "ip.bogus_ip_length",  # expert info: IPv4 total length exceeds the bytes at hand
    "ipv6.plen_exceeds_framing",  # expert info: the same for the IPv6 payload length
)
# Signs that tshark found the frame cut: by the snaplen, or (AWS PacketLength truncation, the
# lengths left as they were) inside the mirrored IP packet.
CUT_SIGNS = ("_ws.short", "ip.bogus_ip_length", "ipv6.plen_exceeds_framing")
# Per packet, as the decoder sees it: no IP reassembly (a reassembled datagram would lend
# the last fragment the upper-layer fields of the first one).
TSHARK_OPTIONS = ("-n", "-o", "ip.defragment:FALSE", "-o", "ipv6.defragment:FALSE")

VLAN_TAGS = {"vlan": "vlan.id", "ieee8021ad": "ieee8021ad.id"}  # frame.protocols token -> id
IPV6_EXTENSIONS = ("ipv6.hopopts", "ipv6.routing", "ipv6.fraghdr", "ipv6.dstopts")
# Next Header values that name another extension header, not the upper layer
IPV6_EXTENSION_NUMBERS = frozenset((0, 43, 44, 51, 60, 135, 139, 140))
PORT_PROTOCOLS = ("tcp", "udp", "sctp", "dccp")
ICMP_PROTOCOLS = ("icmp", "icmpv6")
TCP_FLAGS_MASK = 0x1FF  # tshark's tcp.flags has 12 bits; the 3 reserved ones are not decoded


# -- tshark -----------------------------------------------------------------------------------


@dataclass
class TsharkFrame:
    number: int
    tokens: list[str]  # frame.protocols
    values: dict[str, list[str]]  # field -> its occurrences, in dissection order

    def nth(self, name: str, n: int) -> str | None:
        occurrences = self.values.get(name, [])
        return occurrences[n] if n < len(occurrences) else None

    def before(self, token: str, index: int) -> int:
        """How many layers named `token` precede position `index`: the occurrence number of
        that layer's fields (each layer of a protocol adds one occurrence of each field)."""
        return self.tokens[:index].count(token)


def parse_tshark(text: str) -> list[TsharkFrame]:
    frames = []
    for line in text.splitlines():
        columns = line.split("\t")
        assert len(columns) == len(TSHARK_FIELDS), f"tshark printed {line!r}"
        values = {name: col.split(",") for name, col in zip(TSHARK_FIELDS, columns) if col}
        frames.append(TsharkFrame(int(columns[0]), columns[1].split(":"), values))
    return frames


def tshark_command(tshark: str, capture: Path) -> list[str]:
    fields = [arg for name in TSHARK_FIELDS for arg in ("-e", name)]
    return [tshark, *TSHARK_OPTIONS, "-r", str(capture), "-T", "fields",
            "-E", "occurrence=a", "-E", "aggregator=,", "-E", "separator=/t", *fields]


@cache
def datagrams_of(capture: Path) -> list[pcaps.Datagram]:
    return pcaps.mirror_datagrams(capture)


def is_mirror_capture(capture: Path) -> bool | None:
    """What the census shipped with the captures says: VXLAN on 4789 or GENEVE on the outer
    layer (not 'VXLAN(udp/8472)', not only 'inner:...'). None when there is no census."""
    census = pcaps.census()
    if census is None:
        return None
    keys = census.get(capture.name, {}).get("census", {})
    return any(k.startswith(("VXLAN(udp/4789)", "GENEVE")) for k in keys)


def needs_tshark(capture: Path) -> bool:
    """tshark runs (0.3 s of start-up each) only where there is something to compare or the
    census says there should be; without a census, on every capture."""
    return bool(datagrams_of(capture)) or is_mirror_capture(capture) is not False


@cache
def _tshark_pool(tshark: str) -> dict[Path, Future]:
    """Start tshark on all the captures that need it at once, one process per CPU: most of
    its time is start-up, so they are better run side by side than one per test."""
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    jobs = {
        capture: pool.submit(_run_tshark, tshark, capture)
        for capture in pcaps.capture_files()
        if needs_tshark(capture)
    }
    pool.shutdown(wait=False)
    return jobs


def _run_tshark(tshark: str, capture: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        tshark_command(tshark, capture), capture_output=True, text=True, timeout=120
    )


@cache
def tshark_frames(tshark: str, capture: Path) -> list[TsharkFrame]:
    job = _tshark_pool(tshark).get(capture)
    done = job.result() if job is not None else _run_tshark(tshark, capture)
    assert done.returncode == 0, (
        f"tshark failed on {capture} (exit {done.returncode}): {done.stderr}"
    )
    return parse_tshark(done.stdout)


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    return int(text, 16) if text.lower().startswith("0x") else int(text)


def outer_mirror_port(frame: TsharkFrame) -> int | None:
    """The UDP destination port right after the first IP layer, when it is a mirror port:
    what dpkt selects, seen by tshark."""
    tokens = frame.tokens
    l3 = next((i for i, t in enumerate(tokens) if t in ("ip", "ipv6")), None)
    if l3 is None:
        return None
    l4 = l3 + 1
    while l4 < len(tokens) and tokens[l4].startswith("ipv6."):
        l4 += 1
    if l4 >= len(tokens) or tokens[l4] != "udp":
        return None
    port = _int(frame.nth("udp.dstport", frame.before("udp", l4)))
    return port if port in pcaps.MIRROR_PORTS else None


# -- what tshark says about the mirrored frame ------------------------------------------------


@dataclass
class Reference:
    """The decoder's view of one frame, per tshark: attribute -> value, for the values tshark
    reports; `has_ip` False when the mirrored frame holds no IP layer (ARP...)."""

    encap: str
    fields: dict[str, object] = field(default_factory=dict)
    has_ip: bool = False

    def put(self, name: str, value) -> None:
        if value is not None:
            self.fields[name] = value


def reference(frame: TsharkFrame) -> Reference | None:
    """What the decoder should find in `frame`, or None if tshark saw no VXLAN/GENEVE."""
    tokens = frame.tokens
    tunnel = next((i for i, t in enumerate(tokens) if t in ("vxlan", "geneve")), None)
    if tunnel is None:
        return None
    ref = Reference(encap=tokens[tunnel])
    decap = tunnel  # the header after which the mirrored frame starts
    if ref.encap == "geneve":
        ref.put("geneve_vni", _int(frame.nth("geneve.vni", frame.before("geneve", tunnel))))
        ref.put("vni", ref.fields.get("geneve_vni"))
        # A Gateway Load Balancer: GENEVE -> IPv4/IPv6 -> UDP to 4789 -> VXLAN
        if (
            tokens[tunnel + 1 : tunnel + 2] in (["ip"], ["ipv6"])
            and tokens[tunnel + 2 : tunnel + 4] == ["udp", "vxlan"]
            and _int(frame.nth("udp.dstport", frame.before("udp", tunnel + 2))) == 4789
        ):
            ref.encap, decap = "geneve-vxlan", tunnel + 3
            del ref.fields["vni"]  # the session VNI is the VXLAN one
    if tokens[decap] == "vxlan":
        ref.put("vni", _int(frame.nth("vxlan.vni", frame.before("vxlan", decap))))

    at = decap + 1
    if at < len(tokens) and tokens[at] == "eth":
        at = _ethernet(frame, at, ref)
    if at < len(tokens) and tokens[at] == "ip":
        ref.has_ip = True
        _ipv4(frame, at, ref)
        _upper(frame, at + 1, ref)
    elif at < len(tokens) and tokens[at] == "ipv6":
        ref.has_ip = True
        _upper(frame, _ipv6(frame, at, ref), ref)
    # IPv6 payload length 0 (a jumbogram): the length is elsewhere, not compared
    length_known = ref.fields.get("wire_len", 0) is not None
    if ref.has_ip and length_known and "_ws.malformed" not in frame.values:
        # (A snaplen cut that fell only after the inner IP packet, in an inner Ethernet
        # trailer, would be "short" but not truncated: no capture here has one.)
        ref.fields["truncated"] = any(sign in frame.values for sign in CUT_SIGNS)
    return ref


def _ethernet(frame: TsharkFrame, eth: int, ref: Reference) -> int:
    """Inner VLAN ids and ethertype; return the position of the layer after them."""
    tokens = frame.tokens
    if tokens[eth + 1 : eth + 2] != ["ethertype"]:
        return eth + 1  # cut before its type, or 802.3 + LLC
    # eth.type: one per Ethernet II header, i.e. per "eth" followed by "ethertype"
    eth_ii_before = sum(1 for i in range(eth) if tokens[i : i + 2] == ["eth", "ethertype"])
    ethertype = _int(frame.nth("eth.type", eth_ii_before))
    at, vlans = eth + 2, []
    while at < len(tokens) and tokens[at] in VLAN_TAGS:
        tag = tokens[at]
        vlans.append(_int(frame.nth(VLAN_TAGS[tag], frame.before(tag, at))))
        # the type after an 802.1Q tag is vlan.etype; tshark has no field for an 802.1ad one
        ethertype = None
        if tag == "vlan":
            ethertype = _int(frame.nth("vlan.etype", frame.before("vlan", at)))
        at += 2 if tokens[at + 1 : at + 2] == ["ethertype"] else 1
    if None not in vlans:
        ref.put("vlans", tuple(vlans))
    ref.put("ethertype", ethertype)
    return at


def _ipv4(frame: TsharkFrame, at: int, ref: Reference) -> None:
    n = frame.before("ip", at)
    ref.put("src_ip", frame.nth("ip.src", n))
    ref.put("dst_ip", frame.nth("ip.dst", n))
    ref.put("ip_proto", _int(frame.nth("ip.proto", n)))
    ref.put("wire_len", _int(frame.nth("ip.len", n)))  # (for a length field of 0, see _tso)


def _ipv6(frame: TsharkFrame, at: int, ref: Reference) -> int:
    """Fill the IPv6 fields; return the position of the upper layer."""
    tokens = frame.tokens
    n = frame.before("ipv6", at)
    ref.put("src_ip", frame.nth("ipv6.src", n))
    ref.put("dst_ip", frame.nth("ipv6.dst", n))
    payload = _int(frame.nth("ipv6.plen", n))
    if payload is not None:
        ref.fields["wire_len"] = 40 + payload if payload else None  # 0: a jumbogram
    # the upper-layer protocol is the Next Header of the last extension header, if any
    proto = _int(frame.nth("ipv6.nxt", n))
    upper = at + 1
    while upper < len(tokens) and tokens[upper].startswith("ipv6."):
        ext = tokens[upper]
        if ext in IPV6_EXTENSIONS:
            proto = _int(frame.nth(f"{ext}.nxt", frame.before(ext, upper)))
        upper += 1
    if proto not in IPV6_EXTENSION_NUMBERS:  # else the chain was cut before the upper layer
        ref.put("ip_proto", proto)
    return upper


def _upper(frame: TsharkFrame, at: int, ref: Reference) -> None:
    if at >= len(frame.tokens):
        return
    proto = frame.tokens[at]
    n = frame.before(proto, at)
    if proto in PORT_PROTOCOLS:
        ref.put("src_port", _int(frame.nth(f"{proto}.srcport", n)))
        ref.put("dst_port", _int(frame.nth(f"{proto}.dstport", n)))
        if proto == "tcp":
            flags = _int(frame.nth("tcp.flags", n))
            ref.put("tcp_flags", None if flags is None else flags & TCP_FLAGS_MASK)
    elif proto in ICMP_PROTOCOLS:
        ref.put("icmp_type", _int(frame.nth(f"{proto}.type", n)))
        ref.put("icmp_code", _int(frame.nth(f"{proto}.code", n)))


# -- the comparison ---------------------------------------------------------------------------


def _tso(pkt, payload: bytes) -> bool:
    """The mirrored IPv4 header says total length 0 (TCP segmentation offload): the decoder
    leaves the wire length unknown, tshark substitutes the number of bytes it has."""
    if pkt.ip_version != 4 or pkt.l3_offset is None:
        return False
    at = len(payload) - pkt.captured_len + pkt.l3_offset + 2
    return payload[at : at + 2] == b"\0\0"


def _same(name: str, ours, theirs) -> bool:
    if name in ("src_ip", "dst_ip"):
        return ipaddress.ip_address(ours) == ipaddress.ip_address(theirs)
    return ours == theirs


def disagreements(datagram: pcaps.Datagram, frame: TsharkFrame) -> list[str]:
    """Every field on which the decoder and tshark differ, one line each."""
    where = f"frame {datagram.frame} (UDP {datagram.dst_port}, {len(datagram.payload)} bytes"
    where += f" of {datagram.udp_length - 8})" if datagram.cut else ")"
    ref = reference(frame)
    if ref is None:
        return [f"{where}: tshark dissects no VXLAN/GENEVE ({':'.join(frame.tokens)})"]
    try:
        pkt = decode_datagram(datagram.payload, datagram.dst_port)
    except Malformed as exc:
        return [f"{where}: decoder raised {exc!r}, tshark dissects {':'.join(frame.tokens)}"]
    problems = []
    if pkt.encap != ref.encap:
        problems.append(f"{where}: encap: decoder {pkt.encap!r}, tshark {ref.encap!r}")
    for name, theirs in ref.fields.items():
        ours = getattr(pkt, name)
        if name == "wire_len" and ours is None and _tso(pkt, datagram.payload):
            continue
        if ours is None and theirs is not None:
            problems.append(f"{where}: {name}: decoder has no value, tshark {theirs!r}")
        elif not _same(name, ours, theirs):
            problems.append(f"{where}: {name}: decoder {ours!r}, tshark {theirs!r}")
    if not ref.has_ip and (pkt.ip_version is not None or pkt.src_addr is not None):
        problems.append(
            f"{where}: decoder found IPv{pkt.ip_version} where tshark sees no IP layer"
            f" ({':'.join(frame.tokens)})"
        )
    return problems


# -- the tests --------------------------------------------------------------------------------

CAPTURES = pcaps.capture_files()


@pytest.mark.parametrize(
    "capture", CAPTURES or [None], ids=[pcaps.capture_id(c) for c in CAPTURES] or ["no-captures"]
)
def test_decoder_agrees_with_tshark(capture: Path | None) -> None:
    if capture is None:
        pcaps.unavailable(f"no captures in {pcaps.PCAPS_DIR} (../shared/pcaps)")
    tshark = tshark_path()
    if tshark is None:
        pcaps.unavailable("tshark is not installed (apt-get install tshark)")
    datagrams = datagrams_of(capture)
    if not needs_tshark(capture):
        return  # nothing on 4789/6081, and the census agrees: nothing to compare

    frames = tshark_frames(tshark, capture)
    records = sum(1 for _ in pcaps.read_records(capture))
    assert len(frames) == records, f"{capture.name}: tshark {len(frames)} frames, dpkt {records}"
    by_number = {f.number: f for f in frames}

    # dpkt and tshark select the same frames: UDP to 4789/6081 right after the first IP layer
    ours = {d.frame: d.dst_port for d in datagrams}
    theirs = {f.number: p for f in frames if (p := outer_mirror_port(f)) is not None}
    assert ours == theirs, (
        f"{capture.name}: frames with UDP to 4789/6081 differ: only per dpkt"
        f" {sorted(ours.items() - theirs.items())},"
        f" only per tshark {sorted(theirs.items() - ours.items())}"
    )

    problems, compared = [], 0
    for datagram in datagrams:
        problems += disagreements(datagram, by_number[datagram.frame])
        compared += 1
    assert not problems, f"{capture.name}: decoder and tshark disagree:\n" + "\n".join(problems)

    # Nothing compared would be a vacuous pass: a VXLAN/GENEVE capture must yield datagrams.
    if is_mirror_capture(capture) or theirs:
        assert compared > 0, f"{capture.name}: a VXLAN/GENEVE capture, but 0 datagrams compared"


def test_the_captures_hold_mirror_traffic() -> None:
    """Guard against a reference test that passes by comparing nothing: the captures as a
    whole must yield datagrams for both encapsulations."""
    if not CAPTURES:
        pcaps.unavailable(f"no captures in {pcaps.PCAPS_DIR} (../shared/pcaps)")
    ports = {d.dst_port for c in CAPTURES for d in datagrams_of(c)}
    assert ports == set(pcaps.MIRROR_PORTS), f"mirror ports found in the captures: {sorted(ports)}"
