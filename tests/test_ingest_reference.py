"""The flows `collector ingest` writes, against tshark's dissection of the same capture.

Every capture in ../shared/pcaps and in fixtures/, and one generated here with the cases they
lack, is ingested (`collector.ingest`, the same path as live traffic), and the flows it wrote
are read back with SQL. tshark dissects the same file once, and the test derives from its
fields, frame by frame, the packet collector meters:

- a frame carrying IPv4/IPv6 UDP to 4789, 4790 or 6081 right after its link layer is a mirrored
  copy: exactly one mirror encapsulation is removed (VXLAN; GENEVE; GENEVE -> IP -> UDP 4789 ->
  VXLAN entirely, as a GWLB delivers), the VNI is the VXLAN VNI (GENEVE's when no VXLAN);
- any other frame is itself the mirrored packet, with no VNI;
- in that packet: the VLAN ids (802.1Q/802.1ad) of its Ethernet header, its ethertype, and in
  the first IPv4/IPv6 layer after them the addresses, protocol (after IPv6 extension headers),
  wire bytes (IPv4 total length, IPv6 40 + payload length: the header's word, even for a cut
  copy), TCP/UDP ports, and for ICMP/ICMPv6 Community ID's (type, counterpart type or code).

Then, per capture:

(a) per (VNI, VLAN ids, IP version, protocol, unordered address pair): packets and wire bytes,
    both directions summed, equal exactly;
(b) per TCP/UDP/ICMP flow (the same key with ports): packets and bytes in each direction equal
    exactly (rows are oriented initiator -> responder: both sides are compared as directed
    (source endpoint, destination endpoint) sums), with generous timeouts (one row per
    conversation);
(c) frames that are not IP (by their ethertype, as collector classifies them): packets and
    bytes (the frame's captured length) per (VNI, VLAN ids, ethertype);
(d) conservation: the packets in all rows = the frames tshark counts = records - skipped -
    malformed of the ingest counters;
and (a), (c), (d) again with idle and active timeouts of 1 ms, so that flows are exported in
many pieces: nothing is lost or counted twice through expiry.

Where collector deliberately meters a frame differently from what tshark shows, the derivation
applies a named adjustment (`ADJUSTMENTS`, explained in docs/differences.md), and the number of
frames each adjustment touched is pinned per capture (`EXPECTED_ADJUSTMENTS`): an adjustment
that starts to apply elsewhere, or stops applying, fails the test. tshark runs with IP
reassembly off, so that each frame shows its own headers (see docs/differences.md).

tshark costs 0.3 s of start-up per capture, so all captures are dissected at once, in the
background, one process per CPU, while the test ingests. Without tshark every case skips, and
without ../shared/pcaps its cases do (the fixtures only need tshark); under
COLLECTOR_REQUIRE_REFERENCE=1 they fail instead.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import subprocess
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

from collector import build
from collector.flows import FlowConfig
from collector.ingest import ingest
from collector.pipeline import Pipeline
from collector.query import connect
from tests import pcaps
from tests.pcaps import tshark_path

pytestmark = pytest.mark.reference

FIXTURES_DIR = Path(__file__).resolve().parents[1] / "fixtures"
MIRROR_PORTS = frozenset((4789, 4790, 6081))
GWLB_VXLAN_PORT = 4789
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
ICMP, TCP, UDP, ICMPV6 = 1, 6, 17, 58
FLOW_PROTOCOLS = (ICMP, TCP, UDP, ICMPV6)  # compared per flow and direction in (b)
# Community ID v1's request/reply pairs (github.com/corelight/community-id-spec): collector
# keys an ICMP message by (type, counterpart type) when it has one, else (type, code)
ICMP_PAIRS = {
    ICMP: [(8, 0), (13, 14), (15, 16), (10, 9), (17, 18)],  # echo, timestamp, info, router, mask
    ICMPV6: [(128, 129), (130, 131), (133, 134), (135, 136), (139, 140), (144, 145)],
}
COUNTERPART = {proto: {**dict(pairs), **{b: a for a, b in pairs}}
               for proto, pairs in ICMP_PAIRS.items()}
NS = 1_000_000_000
# FlowConfig's default: how long collector remembers a first fragment's ports
FRAGMENT_TIMEOUT_NS = int(FlowConfig().fragment_timeout * NS)

GENEROUS = FlowConfig(idle_timeout=1e9, active_timeout=1e9)  # one row per conversation
TINY = FlowConfig(idle_timeout=0.001, active_timeout=0.001)  # many rows per conversation

TSHARK_FIELDS = (
    "frame.number",
    "frame.protocols",
    "frame.time_epoch",
    "frame.cap_len",
    "sll.etype",
    "sll.ifindex",  # only in SLL2 (20-byte header); SLL has 16 bytes
    "eth.type",
    "eth.len",  # an 802.3 frame's length field (no ethertype)
    "vlan.id",
    "vlan.etype",
    "ieee8021ad.id",
    "udp.srcport",
    "udp.dstport",
    "udp.length",
    "vxlan.vni",
    "geneve.vni",
    "ip.src",
    "ip.dst",
    "ip.proto",
    "ip.len",
    "ip.id",
    "ip.flags.mf",
    "ip.frag_offset",
    "ipv6.src",
    "ipv6.dst",
    "ipv6.nxt",
    "ipv6.plen",
    "ipv6.hopopts.nxt",
    "ipv6.routing.nxt",
    "ipv6.fraghdr.nxt",
    "ipv6.dstopts.nxt",
    "ipv6.fraghdr.offset",
    "ipv6.fraghdr.more",
    "ipv6.fraghdr.ident",
    "tcp.srcport",
    "tcp.dstport",
    "icmp.type",
    "icmp.code",
    "icmpv6.type",
    "icmpv6.code",
)
# Per frame, as collector meters it: no reassembly (it would give the last fragment the
# reassembled datagram's upper layer, and leave the first one without ports).
TSHARK_OPTIONS = ("-n", "-o", "ip.defragment:FALSE", "-o", "ipv6.defragment:FALSE")

VLAN_TAGS = {"vlan": "vlan.id", "ieee8021ad": "ieee8021ad.id"}  # frame.protocols token -> id
IP_TOKENS = {"ip": ETH_IPV4, "ipv6": ETH_IPV6}
IPV6_EXTENSIONS = ("ipv6.hopopts", "ipv6.routing", "ipv6.fraghdr", "ipv6.dstopts")
IPV6_EXTENSION_NUMBERS = frozenset((0, 43, 44, 51, 60, 135, 139, 140))
ETHERNET_HEADER_LEN = 14
# Link layers of plain frames (not mirror copies): the length of the header collector replaces
# with a 14-byte Ethernet header (ingest synthesises one for every link type but Ethernet).
LOOPBACK_HEADER_LEN = 4
SLL_HEADER_LEN, SLL2_HEADER_LEN = 16, 20


# -- adjustments: where collector deliberately meters a frame differently from tshark ---------


FRAGMENT_JOIN = "fragment_join"
MPLS_OPAQUE = "mpls_opaque"
LLC_NO_ETHERTYPE = "llc_no_ethertype"
CUT_BEFORE_IP_LENGTH = "cut_before_ip_length"

ADJUSTMENTS = {
    FRAGMENT_JOIN: (
        "A non-first IP fragment has no L4 header, so tshark (reassembly off) shows no ports;"
        " collector meters it in its first fragment's flow when it saw that fragment less than"
        " fragment_timeout before (same VNI, VLAN, addresses, protocol, IP ID): the test gives"
        " it the first fragment's ports."
    ),
    MPLS_OPAQUE: (
        "tshark walks the MPLS label stack (0x8847) and dissects the IP packet or pseudowire"
        " under it; collector's decoder does not decode MPLS: the frame is a non-IP flow of"
        " ethertype 0x8847, its bytes the frame's captured length."
    ),
    LLC_NO_ETHERTYPE: (
        "An 802.3 frame (STP, IS-IS) has a length where Ethernet II has its type; tshark shows"
        " eth.len and LLC, collector records a non-IP flow with a NULL ethertype."
    ),
    CUT_BEFORE_IP_LENGTH: (
        "The copy ends before the IP length field: tshark shows no length, collector counts"
        " the IP bytes the copy holds (a lower bound; the packet is counted truncated)."
    ),
}
# Not an adjustment: IPv4 total length 0 (TCP segmentation offload). collector counts the IP
# bytes of the copy, tshark shows the frame's reported length from the IP header on as ip.len:
# the same number unless a snaplen also cut the frame (no capture has such a frame, and tshark
# gives no sign of TSO to detect it by). The generated capture has whole TSO frames.

# Frames each adjustment applies to, per capture; every capture not named here has none.
EXPECTED_ADJUSTMENTS: dict[str, dict[str, int]] = {
    # 4 IPv4 + 3 IPv6 second fragments, each right after its first fragment
    "frag/ndpi_dns_fragmented.pcap": {FRAGMENT_JOIN: 7},
    # a TCP segment in 3 IPv6 fragments (VLAN-tagged)
    "frag/suricata_frag-eth-vlan-ipv6-tcp.pcap": {FRAGMENT_JOIN: 2},
    "fixtures/plain-mixed.pcap": {FRAGMENT_JOIN: 2},  # one later IPv4 and one IPv6 fragment
    # 6 MPLS -> IPv4 ICMP, 10 MPLS pseudowire -> Ethernet -> VLAN -> IPv4 ICMP; 1 IS-IS (LLC)
    "mixed/tcpreplay_test.pcap": {MPLS_OPAQUE: 16, LLC_NO_ETHERTYPE: 1},
    "mixed/zeek_wikipedia.pcap": {LLC_NO_ETHERTYPE: 4},  # STP BPDUs
    "vlan/zeek_mixed-vlan-mpls.pcap": {MPLS_OPAQUE: 11},  # MPLS -> IPv4 TCP (telnet)
    # see edge_case_records: the copy cut inside the IP header; the fragment pair in order
    "generated/edge-cases.pcap": {CUT_BEFORE_IP_LENGTH: 1, FRAGMENT_JOIN: 1},
}


# -- tshark -----------------------------------------------------------------------------------


@dataclass
class TsharkFrame:
    number: int
    tokens: list[str]  # frame.protocols
    values: dict[str, list[str]]  # field -> its occurrences, in dissection order

    def nth(self, name: str, n: int) -> str | None:
        occurrences = self.values.get(name, [])
        return occurrences[n] if n < len(occurrences) else None

    def int_at(self, name: str, token_index: int) -> int | None:
        """The value of `name` in the layer at `token_index` (its protocol's occurrence)."""
        token = self.tokens[token_index]
        return _int(self.nth(name, self.before(token, token_index)))

    def before(self, token: str, index: int) -> int:
        """How many layers named `token` precede position `index`: the occurrence number of
        that layer's fields (each layer of a protocol adds one occurrence of each field)."""
        return self.tokens[:index].count(token)


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    return int(text, 16) if text.lower().startswith("0x") else int(text)


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


def _run_tshark(tshark: str, capture: Path) -> subprocess.CompletedProcess:
    return subprocess.run(tshark_command(tshark, capture), capture_output=True, text=True,
                          timeout=120)


@cache
def _tshark_jobs(tshark: str) -> dict[Path, Future]:
    """tshark on every capture at once, one process per CPU, started by the first test."""
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    jobs = {capture: pool.submit(_run_tshark, tshark, capture) for capture in all_captures()}
    pool.shutdown(wait=False)
    return jobs


def tshark_frames(tshark: str, capture: Path) -> list[TsharkFrame]:
    job = _tshark_jobs(tshark).get(capture)
    done = job.result() if job is not None else _run_tshark(tshark, capture)
    assert done.returncode == 0, (
        f"tshark failed on {capture} (exit {done.returncode}): {done.stderr}")
    return parse_tshark(done.stdout)


# -- what collector should meter, per tshark --------------------------------------------------


@dataclass
class Metered:
    """One frame as collector meters it, derived from tshark's fields."""

    number: int
    ts_ns: int
    mirror: bool  # a mirror copy (decapsulated), or a plain frame
    vni: int | None
    vlans: tuple[int | None, int | None]  # the mirrored frame's first two VLAN ids
    ethertype: int | None
    ip_version: int | None = None
    protocol: int | None = None
    src: str | None = None
    dst: str | None = None
    sport: int | None = None
    dport: int | None = None
    bytes: int | None = None  # IP wire bytes; a non-IP frame's captured length
    ip_id: int | None = None
    frag_offset: int = 0
    more_fragments: bool = False
    adjustments: list[str] = field(default_factory=list)

    @property
    def is_ip(self) -> bool:
        return self.ethertype in (ETH_IPV4, ETH_IPV6)


@dataclass
class Frame:
    """The frame collector meters (a plain frame, or the one inside the mirror copy), located
    in tshark's protocol tokens."""

    ethertype: int | None  # after the VLAN tags (an 802.3 frame: None)
    vlans: list[int | None]  # VLAN ids in collector's frame, outermost first
    network: int  # token index of the layer after the ethertype
    captured_len: int | None  # collector's captured_len of the frame (None: not derived)
    l3_offset: int  # where the network header starts in that frame
    llc: bool = False  # an 802.3 frame (length, LLC) rather than Ethernet II


def derive(frame: TsharkFrame) -> Metered | None:
    """The packet collector meters for `frame`, or None for a frame ingest skips (a link type
    it does not know, a loopback family that is not IP)."""
    ts_ns = _epoch_ns(frame.nth("frame.time_epoch", 0))
    plain = _plain_frame(frame, _int(frame.nth("frame.cap_len", 0)))
    if plain is None:
        return None
    tunnel = _mirror_tunnel(frame, plain)
    if tunnel is None:  # the frame is the mirrored packet itself
        return _meter(frame, ts_ns, False, None, plain)
    vni, mirrored = _decapsulate(frame, tunnel)
    return _meter(frame, ts_ns, True, vni, mirrored)


def _epoch_ns(text: str) -> int:
    seconds, _, fraction = text.partition(".")
    return int(seconds) * NS + int((fraction + "000000000")[:9])


def _plain_frame(frame: TsharkFrame, cap_len: int) -> Frame | None:
    """The captured frame as ingest hands it on when it is not a mirror copy, or None when
    ingest skips it. Other link types than Ethernet get a 14-byte Ethernet header instead of
    theirs (and lose the VLAN tags after it)."""
    tokens = frame.tokens
    link = tokens[0]
    if link == "eth":
        return _ethernet(frame, 0, cap_len)
    if link == "sll":
        # SLL/SLL2: the protocol field is an ethertype
        header = SLL2_HEADER_LEN if frame.nth("sll.ifindex", 0) is not None else SLL_HEADER_LEN
        at = 2 if tokens[1:2] == ["ethertype"] else 1
        at, ethertype, tags = _tags(frame, at, _int(frame.nth("sll.etype", 0)))
        captured = ETHERNET_HEADER_LEN + cap_len - header - 4 * len(tags)
        return Frame(ethertype, [], at, captured, ETHERNET_HEADER_LEN)
    if link in ("null", "raw") and tokens[1:2] and tokens[1] in IP_TOKENS:
        header = LOOPBACK_HEADER_LEN if link == "null" else 0
        captured = ETHERNET_HEADER_LEN + cap_len - header
        return Frame(IP_TOKENS[tokens[1]], [], 1, captured, ETHERNET_HEADER_LEN)
    return None


def _ethernet(frame: TsharkFrame, eth: int, captured_len: int | None) -> Frame:
    """The Ethernet frame whose header is the token at `eth`."""
    tokens = frame.tokens
    if tokens[eth + 1 : eth + 2] != ["ethertype"]:
        # 802.3: eth.len, one per Ethernet header that has no "ethertype" token
        n = sum(1 for i in range(eth)
                if tokens[i] == "eth" and tokens[i + 1 : i + 2] != ["ethertype"])
        return Frame(None, [], eth + 1, captured_len,
                     ETHERNET_HEADER_LEN, llc=True)
    # eth.type: one per Ethernet II header, i.e. per "eth" followed by "ethertype"
    n = sum(1 for i in range(eth) if tokens[i : i + 2] == ["eth", "ethertype"])
    at, ethertype, vlans = _tags(frame, eth + 2, _int(frame.nth("eth.type", n)))
    return Frame(ethertype, vlans, at, captured_len, ETHERNET_HEADER_LEN + 4 * len(vlans))


def _tags(frame: TsharkFrame, at: int, ethertype: int | None):
    """Walk the VLAN tags at `at`: (index after them, the ethertype after them, VLAN ids)."""
    tokens, vlans = frame.tokens, []
    while at < len(tokens) and tokens[at] in VLAN_TAGS:
        tag = tokens[at]
        vlans.append(frame.int_at(VLAN_TAGS[tag], at))
        # the type after an 802.1Q tag is vlan.etype; tshark has no field after an 802.1ad
        # tag: the next token names it
        ethertype = frame.int_at("vlan.etype", at) if tag == "vlan" else None
        at += 2 if tokens[at + 1 : at + 2] == ["ethertype"] else 1
    if ethertype is None and at < len(tokens):
        ethertype = IP_TOKENS.get(tokens[at])
    return at, ethertype, vlans


def _mirror_tunnel(frame: TsharkFrame, plain: Frame) -> int | None:
    """Token index of the mirror encapsulation (VXLAN/GENEVE) when the frame's first IP layer
    carries UDP to a mirror port, else None."""
    tokens, at = frame.tokens, plain.network
    if plain.ethertype not in (ETH_IPV4, ETH_IPV6) or tokens[at : at + 1] not in (["ip"], ["ipv6"]):
        return None
    l4 = at + 1
    while l4 < len(tokens) and tokens[l4] in IPV6_EXTENSIONS:
        l4 += 1
    if tokens[l4 : l4 + 1] != ["udp"] or frame.int_at("udp.dstport", l4) not in MIRROR_PORTS:
        return None
    assert tokens[l4 + 1 : l4 + 2] in (["vxlan"], ["geneve"]), (
        f"frame {frame.number}: UDP to a mirror port that tshark dissects as {tokens[l4 + 1:]}")
    return l4 + 1


def _decapsulate(frame: TsharkFrame, tunnel: int) -> tuple[int, Frame]:
    """Remove the one mirror encapsulation at `tunnel`: (VNI, the mirrored frame). The
    frame's captured length is the copy's, from the UDP length (a snaplen may have kept
    fewer bytes: ingest describes the copy AWS sent)."""
    tokens = frame.tokens
    if tokens[tunnel] == "vxlan":
        vni = frame.int_at("vxlan.vni", tunnel)
        return vni, _inner_frame(frame, tunnel + 1, frame.int_at("udp.length", tunnel - 1) - 16)
    vni = frame.int_at("geneve.vni", tunnel)
    inner = tunnel + 1
    # A Gateway Load Balancer: GENEVE -> IPv4/IPv6 -> UDP to 4789 -> VXLAN, all removed
    if (tokens[inner : inner + 1] in (["ip"], ["ipv6"])
            and tokens[inner + 1 : inner + 3] == ["udp", "vxlan"]
            and frame.int_at("udp.dstport", inner + 1) == GWLB_VXLAN_PORT):
        vni = frame.int_at("vxlan.vni", inner + 2)
        return vni, _inner_frame(frame, inner + 3, frame.int_at("udp.length", inner + 1) - 16)
    # Right after GENEVE: its header length (options) is not among the fields; no capture
    # needs the captured length of such a frame yet (see _meter).
    return vni, _inner_frame(frame, inner, None)


def _inner_frame(frame: TsharkFrame, start: int, captured_len: int | None) -> Frame:
    """The mirrored frame at token `start`: Ethernet, or IPv4/IPv6 (GENEVE protocol type)."""
    if frame.tokens[start : start + 1] == ["eth"]:
        return _ethernet(frame, start, captured_len)
    layer = frame.tokens[start] if start < len(frame.tokens) else None
    return Frame(IP_TOKENS.get(layer), [], start, captured_len, 0)


def _meter(frame: TsharkFrame, ts_ns: int, mirror: bool, vni: int | None, found: Frame) -> Metered:
    tokens, at = frame.tokens, found.network
    vlans = (found.vlans + [None, None])[:2]
    pkt = Metered(frame.number, ts_ns, mirror, vni, (vlans[0], vlans[1]), found.ethertype)
    if found.llc:
        pkt.adjustments.append(LLC_NO_ETHERTYPE)
    if not pkt.is_ip:
        if tokens[at : at + 1] == ["mpls"]:
            pkt.adjustments.append(MPLS_OPAQUE)
        assert found.captured_len is not None, (
            f"frame {frame.number}: a non-IP frame right after GENEVE: its captured length"
            " needs the GENEVE header length, which the test does not derive yet")
        pkt.bytes = found.captured_len
        return pkt
    if tokens[at : at + 1] == ["ip"]:
        _ipv4(frame, at, pkt)
    elif tokens[at : at + 1] == ["ipv6"]:
        _ipv6(frame, at, pkt)
    if pkt.bytes is None:  # no length field (cut before it, or no IP layer at all)
        pkt.adjustments.append(CUT_BEFORE_IP_LENGTH)
        assert found.captured_len is not None
        pkt.bytes = max(0, found.captured_len - found.l3_offset)
    return pkt


def _ipv4(frame: TsharkFrame, at: int, pkt: Metered) -> None:
    n = frame.before("ip", at)
    pkt.ip_version = 4
    pkt.src, pkt.dst = _address(frame.nth("ip.src", n)), _address(frame.nth("ip.dst", n))
    pkt.protocol = _int(frame.nth("ip.proto", n))
    pkt.bytes = _int(frame.nth("ip.len", n))
    pkt.ip_id = _int(frame.nth("ip.id", n))
    pkt.frag_offset = _int(frame.nth("ip.frag_offset", n)) or 0
    pkt.more_fragments = _int(frame.nth("ip.flags.mf", n)) == 1
    _ports(frame, at + 1, pkt)


def _ipv6(frame: TsharkFrame, at: int, pkt: Metered) -> None:
    tokens = frame.tokens
    n = frame.before("ipv6", at)
    pkt.ip_version = 6
    pkt.src, pkt.dst = _address(frame.nth("ipv6.src", n)), _address(frame.nth("ipv6.dst", n))
    payload = _int(frame.nth("ipv6.plen", n))
    assert payload != 0, (f"frame {frame.number}: an IPv6 jumbogram (collector counts its"
                          " captured IP bytes): no capture had one, derive it when one does")
    pkt.bytes = None if payload is None else 40 + payload
    # the upper-layer protocol is the Next Header of the last extension header, if any
    proto = _int(frame.nth("ipv6.nxt", n))
    upper = at + 1
    while upper < len(tokens) and tokens[upper] in IPV6_EXTENSIONS:
        ext = tokens[upper]
        proto = frame.int_at(f"{ext}.nxt", upper)
        if ext == "ipv6.fraghdr":
            pkt.frag_offset = frame.int_at("ipv6.fraghdr.offset", upper) or 0
            pkt.more_fragments = frame.int_at("ipv6.fraghdr.more", upper) == 1
            pkt.ip_id = frame.int_at("ipv6.fraghdr.ident", upper)
        upper += 1
    pkt.protocol = None if proto in IPV6_EXTENSION_NUMBERS else proto
    _ports(frame, upper, pkt)


def _ports(frame: TsharkFrame, at: int, pkt: Metered) -> None:
    """TCP/UDP ports; for ICMP/ICMPv6, the Community ID convention's (type, counterpart
    type) or (type, code)."""
    layer = frame.tokens[at] if at < len(frame.tokens) else None
    if layer in ("tcp", "udp"):
        pkt.sport = frame.int_at(f"{layer}.srcport", at)
        pkt.dport = frame.int_at(f"{layer}.dstport", at)
    elif layer in ("icmp", "icmpv6"):
        icmp_type = frame.int_at(f"{layer}.type", at)
        counterpart = COUNTERPART[ICMP if layer == "icmp" else ICMPV6].get(icmp_type)
        pkt.sport = icmp_type
        pkt.dport = counterpart if counterpart is not None else frame.int_at(f"{layer}.code", at)


def _address(text: str | None) -> str | None:
    return None if text is None else str(ipaddress.ip_address(text))


def join_fragments(packets: list[Metered]) -> None:
    """Collector's rule for later fragments (the FRAGMENT_JOIN adjustment), in capture order:
    a first fragment's ports are remembered for FRAGMENT_TIMEOUT_NS, per VNI, outer VLAN,
    IP version, protocol, addresses and IP ID."""
    first: dict[tuple, tuple[int | None, int | None, int]] = {}
    for pkt in packets:
        if pkt.ip_version is None:
            continue
        key = (pkt.vni, pkt.vlans[0], pkt.ip_version, pkt.protocol, pkt.src, pkt.dst, pkt.ip_id)
        if pkt.frag_offset:
            seen = first.get(key)
            if seen is not None and pkt.ts_ns - seen[2] <= FRAGMENT_TIMEOUT_NS:
                pkt.sport, pkt.dport = seen[0], seen[1]
                pkt.adjustments.append(FRAGMENT_JOIN)
        elif pkt.more_fragments and pkt.src is not None and pkt.dst is not None:
            first[key] = (pkt.sport, pkt.dport, pkt.ts_ns)


@dataclass
class Reference:
    frames: int
    packets: list[Metered]  # the frames ingest meters
    skipped: int  # frames ingest skips


def reference(frames: list[TsharkFrame]) -> Reference:
    packets = [p for p in map(derive, frames) if p is not None]
    join_fragments(packets)
    return Reference(len(frames), packets, len(frames) - len(packets))


# -- collector's flows ------------------------------------------------------------------------

FLOW_COLUMNS = ("vni", "vlan_id", "inner_vlan_id", "ethertype", "ip_version", "protocol",
                "src_addr", "dst_addr", "src_port", "dst_port", "packets", "bytes",
                "rev_packets", "rev_bytes", "end_reason")


@dataclass
class Ingested:
    rows: list[dict]
    records: int
    mirror_datagrams: int
    plain_packets: int
    skipped: int
    malformed: dict[str, int]


class Dataset:
    """One dataset for the whole module, each ingest under its own collector id, and one
    DuckDB connection over it: connecting (views, the inet extension) costs several times
    what ingesting a small capture does. A connection sees the files written after it was
    opened (README, "Query"); a run whose rows went missing would fail the conservation
    check."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs = 0
        self._con = None

    def ingest(self, capture: Path, config: FlowConfig) -> Ingested:
        self.runs += 1
        collector_id = f"run{self.runs}"
        pipeline = Pipeline(self.root, collector_id=collector_id, flow_config=config)
        result = ingest([capture], pipeline, vni=None)
        if self._con is None:
            self._con = connect(self.root)
        # (timestamps as integers: a TIMESTAMPTZ value would need pytz)
        span = "epoch_us(last_seen) - epoch_us(first_seen)"
        rows = self._con.execute(
            f"SELECT {', '.join(FLOW_COLUMNS)}, {span} FROM flows WHERE collector_id = ?",
            [collector_id]).fetchall()
        return Ingested([dict(zip(FLOW_COLUMNS + ("span_us",), row)) for row in rows],
                        result.records, result.mirror_datagrams, result.plain_packets,
                        result.skipped, dict(pipeline.counters.malformed))

    def close(self) -> None:
        if self._con is not None:
            self._con.close()


# -- the comparisons --------------------------------------------------------------------------


def _pair(a, b) -> tuple:
    """An unordered pair, in a fixed order (None sorts first)."""
    return (a, b) if _order(a) <= _order(b) else (b, a)


def _order(value) -> tuple:
    if value is None:
        return (0,)
    if isinstance(value, tuple):
        return tuple(_order(v) for v in value)
    return (1, value)


def _sums_from_rows(rows: list[dict], key_of) -> dict:
    sums: dict = defaultdict(lambda: [0, 0])
    for row in rows:
        key = key_of(row)
        if key is not None:
            sums[key][0] += row["packets"] + row["rev_packets"]
            sums[key][1] += row["bytes"] + row["rev_bytes"]
    return {k: tuple(v) for k, v in sums.items()}


def _sums_from_packets(packets: list[Metered], key_of) -> dict:
    sums: dict = defaultdict(lambda: [0, 0])
    for pkt in packets:
        key = key_of(pkt)
        if key is not None:
            sums[key][0] += 1
            sums[key][1] += pkt.bytes
    return {k: tuple(v) for k, v in sums.items()}


def ip_totals(rows: list[dict], packets: list[Metered]) -> tuple[dict, dict]:
    """(a): (packets, bytes) per (VNI, VLAN ids, IP version, protocol, address pair)."""

    def of_row(row):
        if row["ethertype"] not in (ETH_IPV4, ETH_IPV6):
            return None
        pair = _pair(_address(row["src_addr"]), _address(row["dst_addr"]))
        return (row["vni"], row["vlan_id"], row["inner_vlan_id"], row["ip_version"],
                row["protocol"], pair)

    def of_packet(pkt):
        if not pkt.is_ip:
            return None
        return (pkt.vni, *pkt.vlans, pkt.ip_version, pkt.protocol, _pair(pkt.src, pkt.dst))

    return _sums_from_rows(rows, of_row), _sums_from_packets(packets, of_packet)


def non_ip_totals(rows: list[dict], packets: list[Metered]) -> tuple[dict, dict]:
    """(c): (packets, captured bytes) per (VNI, VLAN ids, ethertype) of non-IP frames."""

    def of_row(row):
        if row["ethertype"] in (ETH_IPV4, ETH_IPV6):
            return None
        return (row["vni"], row["vlan_id"], row["inner_vlan_id"], row["ethertype"])

    def of_packet(pkt):
        return None if pkt.is_ip else (pkt.vni, *pkt.vlans, pkt.ethertype)

    return _sums_from_rows(rows, of_row), _sums_from_packets(packets, of_packet)


def directed_flows(rows: list[dict], packets: list[Metered]) -> tuple[dict, dict]:
    """(b): per TCP/UDP/ICMP flow key and direction (source endpoint, destination endpoint):
    (packets, bytes)."""
    ours: dict = defaultdict(lambda: [0, 0])
    for row in rows:
        if row["protocol"] not in FLOW_PROTOCOLS or row["ethertype"] not in (ETH_IPV4, ETH_IPV6):
            continue
        src = (_address(row["src_addr"]), row["src_port"])
        dst = (_address(row["dst_addr"]), row["dst_port"])
        flow = (row["vni"], row["vlan_id"], row["inner_vlan_id"], row["ip_version"],
                row["protocol"], _pair(src, dst))
        for direction, packets_, bytes_ in ((src, dst), row["packets"], row["bytes"]), \
                ((dst, src), row["rev_packets"], row["rev_bytes"]):
            if packets_:
                ours[(flow, direction)][0] += packets_
                ours[(flow, direction)][1] += bytes_
    theirs: dict = defaultdict(lambda: [0, 0])
    for pkt in packets:
        if pkt.protocol not in FLOW_PROTOCOLS or not pkt.is_ip:
            continue
        src, dst = (pkt.src, pkt.sport), (pkt.dst, pkt.dport)
        flow = (pkt.vni, *pkt.vlans, pkt.ip_version, pkt.protocol, _pair(src, dst))
        theirs[(flow, (src, dst))][0] += 1
        theirs[(flow, (src, dst))][1] += pkt.bytes
    return ({k: tuple(v) for k, v in ours.items()}, {k: tuple(v) for k, v in theirs.items()})


def differences(what: str, ours: dict, theirs: dict, limit: int = 30) -> list[str]:
    """One line per key whose (packets, bytes) differ: collector's and tshark's values."""
    lines = []
    for key in sorted(ours.keys() | theirs.keys(), key=_order):
        mine, ref = ours.get(key), theirs.get(key)
        if mine != ref:
            lines.append(f"{what} {key}: collector (packets, bytes) {mine}, tshark {ref}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


# -- a generated capture: cases none of the real captures has -----------------------------------

EDGE_ID = "generated/edge-cases.pcap"
EDGE_START_S = 1767225600  # 2026-01-01T00:00:00Z


def _outer_vxlan(frame: bytes, vni: int) -> bytes:
    """A mirror copy as AWS sends it: Ethernet / IPv4 / UDP to 4789 / VXLAN / `frame`."""
    datagram = build.udp(build.vxlan(frame, vni=vni), sport=65000, dport=build.VXLAN_PORT)
    return build.ethernet(build.ipv4(datagram, src="10.0.1.10", dst="10.0.2.20", proto=UDP))


def edge_case_records() -> list[tuple[int, bytes]]:
    """(µs since EDGE_START_S, frame): each case is one or two frames."""
    tcp = build.tcp(b"x" * 100, sport=40000, dport=443, flags=build.ACK)
    whole = build.ethernet(build.ipv4(tcp, src="10.0.0.1", dst="10.0.0.2"))
    tso = build.ethernet(build.ipv4(tcp, src="10.0.0.1", dst="10.0.0.2", total_length=0))
    lldp = build.ethernet(bytes(46), ethertype=0x88CC)
    datagram = build.udp(bytes(40), sport=5353, dport=5353)  # 48 bytes: fragments of 24 + 24

    def fragment4(offset: int, more: bool, ident: int) -> bytes:
        ip = build.ipv4(datagram[offset : offset + 24], src="10.0.0.3", dst="10.0.0.4",
                        proto=UDP, ident=ident, more_fragments=more, frag_offset=offset)
        return build.ethernet(ip)

    def fragment6(offset: int, more: bool) -> bytes:
        ip = build.ipv6(datagram[offset : offset + 24], src="fd00::3", dst="fd00::4",
                        next_header=UDP, extensions=[build.ipv6_fragment(offset, more, 77)])
        return build.ethernet(ip, ethertype=ETH_IPV6)

    return [
        # PacketLength 16: 14 Ethernet + 2 IP bytes, cut before the total length
        (0, _outer_vxlan(build.truncate(whole, 16), vni=5)),  # CUT_BEFORE_IP_LENGTH
        (1_000, _outer_vxlan(lldp, vni=5)),  # a non-IP frame in a mirror copy
        (2_000, tso),  # IPv4 total length 0, whole: no adjustment needed
        (3_000, _outer_vxlan(tso, vni=5)),
        # a later fragment before its first: it keeps NULL ports, as tshark shows it
        (4_000, fragment4(24, False, ident=1)), (5_000, fragment4(0, True, ident=1)),
        # in order, 1 ms apart: joined (FRAGMENT_JOIN)
        (6_000, fragment4(0, True, ident=2)), (7_000, fragment4(24, False, ident=2)),
        # in order, 40 s apart: past the 30 s fragment timeout, not joined
        (8_000, fragment6(0, True)), (40_008_000, fragment6(24, False)),
    ]


def write_edge_capture(path: Path) -> Path:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
    for offset_us, frame in edge_case_records():
        sec, usec = divmod(offset_us, 1_000_000)
        out.append(struct.pack("<IIII", EDGE_START_S + sec, usec, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))
    return path


# -- the tests --------------------------------------------------------------------------------


def fixture_captures() -> list[Path]:
    return sorted(FIXTURES_DIR.glob("*.pcap"))


def all_captures() -> list[Path]:
    return pcaps.capture_files() + fixture_captures()


def _capture_id(path: Path) -> str:
    if path.is_relative_to(FIXTURES_DIR):
        return f"fixtures/{path.name}"
    return pcaps.capture_id(path)


SHARED = pcaps.capture_files()
PARAMS = [pytest.param(p, id=_capture_id(p)) for p in SHARED + fixture_captures()]
PARAMS.append(pytest.param(EDGE_ID, id=EDGE_ID))
if not SHARED:
    PARAMS.append(pytest.param(None, id="shared-captures-missing"))


@pytest.fixture(scope="module")
def tshark() -> str:
    found = tshark_path()
    if found is None:
        pcaps.unavailable("tshark is not installed (apt-get install tshark)")
    return found


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = Dataset(tmp_path_factory.mktemp("ingest-reference") / "data")
    yield data
    data.close()


@pytest.mark.parametrize("capture", PARAMS)
def test_ingested_flows_agree_with_tshark(capture: Path | str | None, tshark: str,
                                          dataset: Dataset):
    if capture is None:
        pcaps.unavailable(f"no captures in {pcaps.PCAPS_DIR} (../shared/pcaps)")
    if capture == EDGE_ID:
        name, capture = EDGE_ID, write_edge_capture(dataset.root.with_name("edge-cases.pcap"))
    else:
        name = _capture_id(capture)
    _tshark_jobs(tshark)  # the first test starts tshark on every capture
    generous = dataset.ingest(capture, GENEROUS)
    tiny = dataset.ingest(capture, TINY)
    ref = reference(tshark_frames(tshark, capture))

    # (d) conservation: every frame is in exactly one row, under both configurations
    assert generous.malformed == {}, f"{name}: malformed datagrams {generous.malformed}"
    assert (generous.records, generous.skipped) == (ref.frames, ref.skipped), (
        f"{name}: ingest read {generous.records} records and skipped {generous.skipped};"
        f" tshark shows {ref.frames} frames, of which ingest should skip {ref.skipped}")
    mirrors = sum(p.mirror for p in ref.packets)
    plain = len(ref.packets) - mirrors
    assert (generous.mirror_datagrams, generous.plain_packets) == (mirrors, plain), (
        f"{name}: ingest found {generous.mirror_datagrams} mirror copies and"
        f" {generous.plain_packets} plain packets, tshark {mirrors} and {plain}")
    for run, label in ((generous, "generous"), (tiny, "tiny")):
        metered = sum(r["packets"] + r["rev_packets"] for r in run.rows)
        ingested = run.records - run.skipped - sum(run.malformed.values())
        assert metered == ingested == len(ref.packets), (
            f"{name} ({label} timeouts): rows hold {metered} packets, ingest counted {ingested},"
            f" tshark frames metered {len(ref.packets)}")

    problems = []
    # (a) IP totals, (c) non-IP totals: under both configurations
    for run, label in ((generous, "generous"), (tiny, "tiny timeouts")):
        problems += differences(f"(a, {label}) IP", *ip_totals(run.rows, ref.packets))
        problems += differences(f"(c, {label}) non-IP", *non_ip_totals(run.rows, ref.packets))
    # (b) TCP/UDP/ICMP flows by direction
    problems += differences("(b) flow", *directed_flows(generous.rows, ref.packets))
    assert not problems, f"{name}: collector's flows and tshark disagree:\n" + "\n".join(problems)

    applied = dict(Counter(a for p in ref.packets for a in p.adjustments))
    expected = EXPECTED_ADJUSTMENTS.get(name, {})
    assert applied == expected, f"{name}: adjustments applied {applied}, expected {expected}"

    # The tiny timeouts did cut conversations: when one lasted more than 1 ms, there are more
    # rows (else the second run would prove nothing about expiry).
    if any(row["span_us"] > 1000 for row in generous.rows):
        assert len(tiny.rows) > len(generous.rows), f"{name}: 1 ms timeouts exported no more rows"


def test_every_adjustment_is_pinned_and_documented() -> None:
    """Each named adjustment applies to some capture, each pinned capture is one the test
    runs, and docs/differences.md has a section naming each adjustment."""
    unknown = set(EXPECTED_ADJUSTMENTS) - {param.id for param in PARAMS}
    if not SHARED:  # without ../shared/pcaps only the other ids can be checked
        unknown = {name for name in unknown if name.startswith(("fixtures/", "generated/"))}
    assert not unknown, f"pinned adjustments for captures the test does not run: {unknown}"
    pinned = {name for counts in EXPECTED_ADJUSTMENTS.values() for name in counts}
    assert pinned == set(ADJUSTMENTS)
    docs = (FIXTURES_DIR.parent / "docs" / "differences.md").read_text()
    assert [name for name in ADJUSTMENTS if f"`{name}`" not in docs] == []
