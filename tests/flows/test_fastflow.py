"""The compiled path (collector._fastflow via collector.flows.fast) must give exactly what the
pure-Python reference gives: the same decoded columns for every row at every cut, and the same
ended flows (in the same order), counters and Parquet rows for any packet sequence."""

import ipaddress
import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector import build
from collector.decode import PacketBatch, decode_batch
from collector.flows import FlowConfig, FlowTable, fast
from collector.sessions import MirrorSession, SessionRegistry
from collector.store.rows import flows_batch

pytestmark = pytest.mark.skipif(not fast.available(), reason="collector._fastflow not built")

S = 1_000_000_000
SCTP, DCCP, UDPLITE, GRE = 132, 33, 136, 47
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)


# -- generated traffic -----------------------------------------------------------------------
# The generators take a `Pick`: hypothesis draws (shrinkable) for the decoder tests, a seeded
# random.Random for the long flow sequences (drawing thousands of values through hypothesis
# strategies costs most of a test's time).


class Pick:
    def __init__(self, draw=None, rng=None, vlan_ids=None):
        self.draw, self.rng = draw, rng
        self.vlan_ids = vlan_ids  # None: any

    def one(self, options):
        options = tuple(options)
        return self.rng.choice(options) if self.rng else self.draw(st.sampled_from(options))

    def integer(self, low, high):
        return self.rng.randint(low, high) if self.rng else self.draw(st.integers(low, high))

    def data(self, low, high):
        if self.rng:
            return self.rng.randbytes(self.rng.randint(low, high))
        return self.draw(st.binary(min_size=low, max_size=high))

    def address(self, version):
        if self.rng:
            return str(ipaddress.ip_address(self.rng.randbytes(4 if version == 4 else 16)))
        return str(self.draw(st.ip_addresses(v=version)))


def l4_segment(pick, proto, ports):
    sport, dport = ports
    if proto == build.TCP:
        options = pick.one((b"", b"\x01\x01\x01\x01", b"\x02\x04\x05\xb4" * 3))
        flags = pick.one((build.SYN, build.SYN | build.ACK, build.ACK, build.RST, build.RST | build.ACK,
                          build.PSH | build.ACK, 0x100 | build.ACK) + (build.FIN | build.ACK,) * 4)
        segment = build.tcp(pick.data(0, 24), sport=sport, dport=dport, flags=flags, options=options)
        if pick.integer(0, 15) == 0:  # data offset < 5: malformed
            segment = segment[:12] + bytes([pick.integer(0, 4) << 4]) + segment[13:]
        return segment
    if proto == build.UDP:
        length = pick.one((None, None, None, 0, 3))  # 3: malformed, 0: jumbogram
        return build.udp(pick.data(0, 24), sport=sport, dport=dport, length=length)
    if proto in (build.ICMP, build.ICMPV6):
        return build.icmp(pick.one((0, 3, 8, 11, 13, 14, 128, 129, 133, 135, 136, 200)),
                          pick.integer(0, 3), pick.data(4, 12))
    if proto in (SCTP, DCCP, UDPLITE):
        return struct.pack("!HH", sport, dport) + pick.data(0, 16)
    return pick.data(0, 20)


def ip_packet(pick, addresses=None, ports=None, tcp=1):
    """An IPv4/IPv6 packet with options, extension headers, fragments; (packet, version)."""
    version = pick.one((4, 4, 6))
    if addresses is None:
        src, dst = pick.address(version), pick.address(version)
    else:
        src, dst = pick.one(addresses[version])
        if pick.integer(0, 1):  # the other direction
            src, dst, ports = dst, src, ports[::-1]
    ports = ports or (pick.integer(0, 65535), pick.integer(0, 65535))
    proto = pick.one((build.TCP,) * tcp + (build.UDP, build.ICMPV6 if version == 6 else build.ICMP, SCTP,
                      DCCP, UDPLITE, GRE, build.ICMP))
    l4 = l4_segment(pick, proto, ports)
    ident = pick.one((0, 7, 99, 0xFFFF))
    fragment = pick.one((None, None, None, "first", "later"))
    if version == 4:
        options = pick.one((b"", b"", b"\x01" * 4, b"\x94\x04\x00\x00" * 3))
        total = pick.one((None, None, None, None, 0, 10, 5000))
        return build.ipv4(l4, src=src, dst=dst, proto=proto, ident=ident, options=options,
                          total_length=total, more_fragments=fragment == "first",
                          frag_offset=48 if fragment == "later" else 0,
                          ttl=pick.integer(0, 255)), 4
    extensions = [(pick.one((0, 43, 60, 51, 135)), pick.data(0, 14))
                  for _ in range(pick.one((0, 0, 1, 2)))]
    if fragment is not None:
        extensions.append(build.ipv6_fragment(48 if fragment == "later" else 0,
                                              fragment == "first", ident * 65537))
    packet = build.ipv6(l4, src=src, dst=dst, next_header=proto, extensions=extensions)
    if pick.integer(0, 9) == 0:  # payload length 0: a jumbogram
        packet = packet[:4] + b"\0\0" + packet[6:]
    return packet, 6


def frame(pick, addresses=None, ports=None, tcp=1):
    """An Ethernet frame (0..3 VLAN tags, any TPID) or a bare IP packet; (frame, version)."""
    kind = pick.one(("ip",) * 8 + ("arp", "llc", "wrong-version", "random"))
    vlans = [(pick.one(VLAN_TPIDS), 0, pick.one(pick.vlan_ids) if pick.vlan_ids else pick.integer(0, 4095))
             for _ in range(pick.one((0, 0, 0, 1, 2, 3)))]
    if kind == "random":
        return pick.data(0, 90), None
    if kind == "arp":
        return build.ethernet(bytes(28), ethertype=build.ETH_ARP, vlans=vlans), None
    if kind == "llc":
        return build.ethernet(b"\x42\x42\x03" + bytes(20), ethertype=23, vlans=vlans), None
    packet, version = ip_packet(pick, addresses, ports, tcp)
    ethertype = build.ETH_IPV4 if version == 4 else build.ETH_IPV6
    if kind == "wrong-version":
        ethertype = build.ETH_IPV6 if version == 4 else build.ETH_IPV4
    return build.ethernet(packet, ethertype=ethertype, vlans=vlans), version


def _ipv6_gwlb(frame: bytes, vni: int) -> bytes:
    inner = build.ipv6(build.udp(build.vxlan(frame, vni=vni), dport=build.VXLAN_PORT),
                       next_header=build.UDP)
    return build.geneve(inner, protocol=build.ETH_IPV6, options=build.aws_gwlb_options())


def datagram(pick, addresses=None, ports=None, vnis=None, tcp=1):
    """(UDP payload, port): VXLAN, VXLAN-GPE, GENEVE and GWLB GENEVE+VXLAN, cut and mutated."""
    inner, version = frame(pick, addresses, ports, tcp)
    vni = pick.one(vnis) if vnis else pick.integer(0, 2**24 - 1)
    encap = pick.one(("vxlan",) * 6 + ("gpe", "geneve", "geneve-ip", "gwlb", "gwlb6"))
    if encap == "vxlan":
        flags = pick.one((0x08,) * 6 + (0x0C, 0x00, 0x88))
        payload, port = build.vxlan(inner, vni=vni, flags=flags), 4789
    elif encap == "gpe":
        next_protocol = pick.one((0, 1, 2, 3, 9))
        header = bytes([pick.one((0x0C, 0x08, 0x2C)), 0, 0, next_protocol]) + vni.to_bytes(3, "big") + b"\0"
        if next_protocol in (1, 2) and inner[12:14] in (b"\x08\x00", b"\x86\xdd"):
            inner = inner[14:]
        payload, port = header + inner, 4790
    elif encap == "geneve":
        options = pick.one((b"", build.aws_gwlb_options()))
        payload, port = build.geneve(inner, vni=vni, protocol=0x6558, options=options), 6081
    elif encap == "geneve-ip":
        protocol = build.ETH_IPV6 if version == 6 else build.ETH_IPV4
        payload, port = build.geneve(inner[14:], vni=vni, protocol=protocol), 6081
    elif encap == "gwlb":
        payload, port = build.gwlb_mirror(inner, vni=vni), 6081
    else:
        payload, port = _ipv6_gwlb(inner, vni), 6081
    cut = pick.one((None, None, None, 25, "any"))
    if cut is not None:
        cut = pick.integer(0, len(payload)) if cut == "any" else len(payload) - len(inner) + 25
        payload = payload[:cut]
    payload = bytearray(payload)
    for _ in range(pick.one((0,) * 6 + (1, 3))):
        if payload:
            payload[pick.integer(0, len(payload) - 1)] = pick.integer(0, 255)
    return bytes(payload), port


@st.composite
def datagrams(draw):
    return datagram(Pick(draw))


def slab(payloads, width, seed=0):
    """Receive slots: row i holds payload i's first `width` bytes, then stale random bytes."""
    buf = np.random.default_rng(seed).integers(0, 256, (len(payloads), width), dtype=np.uint8)
    for i, payload in enumerate(payloads):
        head = payload[:width]
        buf[i, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    return buf, np.array([len(p) for p in payloads], dtype=np.int64)


def assert_same_columns(want, got, context=""):
    for name in fast._COLUMNS:
        a, b = getattr(want, name), getattr(got, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), (
            name, context, np.flatnonzero(a != b)[:5].tolist(), a[a != b][:5], b[a != b][:5])


# -- decode ----------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datagram=datagrams(), width=st.sampled_from((8, 40, 96, 128, 256)), seed=st.integers(0, 99))
def test_decoded_columns_equal_the_reference_at_every_cut(datagram, width, seed):
    payload, port = datagram
    copies = [payload[:k] for k in range(len(payload) + 1)]  # the copy AWS sent, every length
    buf, lengths = slab(copies, width, seed)
    assert_same_columns(decode_batch(buf, lengths, port), fast.decode_batch(buf, lengths, port))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(datagrams(), min_size=1, max_size=20), width=st.integers(0, 200),
       seed=st.integers(0, 2**32))
def test_rows_with_fewer_bytes_than_the_datagram_equal_the_reference(batch, width, seed):
    """A snaplen leaves `present` bytes of a longer datagram: the rest of the row is stale."""
    rng = random.Random(seed)
    for port in (4789, 4790, 6081):
        payloads = [p for p, _ in batch]
        present = np.array([rng.randint(0, len(p)) for i, p in enumerate(payloads)])
        buf, lengths = slab([p[: max(k, 0)] for p, k in zip(payloads, present)], width, seed)
        lengths = np.array([len(p) for p in payloads])
        assert_same_columns(decode_batch(buf, lengths, port, present),
                            fast.decode_batch(buf, lengths, port, present), port)


@given(batch=st.lists(st.binary(max_size=120), min_size=1, max_size=12),
       port=st.sampled_from((4789, 4790, 6081)))
def test_random_bytes_equal_the_reference(batch, port):
    buf, lengths = slab(batch, 128)
    assert_same_columns(decode_batch(buf, lengths, port), fast.decode_batch(buf, lengths, port))


def test_slabs_of_any_layout_and_bad_arguments():
    payloads = [build.vxlan(build.mirrored_frame(build.FrameSpec(sport=p)).data, vni=p) for p in range(6)]
    buf, lengths = slab(payloads, 128)
    want = decode_batch(buf, lengths)
    assert_same_columns(want, fast.decode_batch(np.asfortranarray(buf), lengths.tolist()))
    wide = np.zeros((6, 256), dtype=np.uint8)
    wide[:, :128] = buf
    assert_same_columns(want, fast.decode_batch(wide[:, :128], lengths))  # strided rows
    assert_same_columns(decode_batch(buf[::2], lengths[::2]), fast.decode_batch(buf[::2], lengths[::2]))
    with pytest.raises(ValueError, match="2-D uint8"):
        fast.decode_batch(np.zeros(10, dtype=np.uint8), [10])
    with pytest.raises(ValueError, match="3 lengths for 2 rows"):
        fast.decode_batch(np.zeros((2, 10), dtype=np.uint8), [1, 2, 3])
    with pytest.raises(ValueError, match="no mirror encapsulation on UDP port 53"):
        fast.decode_batch(buf, lengths, 53)


# -- flows -----------------------------------------------------------------------------------

ADDRESSES = {4: [("10.0.0.1", "10.0.0.2"), ("10.0.0.1", "10.0.0.3"), ("10.0.0.1", "10.0.0.1")],
             6: [("fd00::1", "fd00::2"), ("::ffff:10.0.0.1", "fd00::1:0:0:2")]}
PORTS = [(40000, 443), (53, 53), (8, 0)]
IDLE, ACTIVE, LINGER, FRAGMENT = 10, 25, 2, 5
# gaps between packets: the timeouts exactly, one nanosecond either side, and reordering
GAPS = [0, 0, 1, S // 2, S, LINGER * S - 1, LINGER * S, IDLE * S - 1, IDLE * S, IDLE * S + 1,
        FRAGMENT * S, FRAGMENT * S + 1, ACTIVE * S, -1, -S, -LINGER * S]


@st.composite
def traffic(draw):
    """Steps: ("batch", [(payload, ts)...]), ("expire", now) or ("checkpoint", None); one port
    for every batch."""
    port = draw(st.sampled_from((4789, 4789, 6081)))
    pick = Pick(rng=random.Random(draw(st.integers(0, 2**32))), vlan_ids=(0, 5))
    steps, now = [], 10**12
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.integers(0, 5)) == 0:
            steps.append(("checkpoint", None))
            continue
        if draw(st.integers(0, 3)) == 0:
            now += draw(st.sampled_from(GAPS))
            steps.append(("expire", now))
            continue
        rows = []
        for gap in draw(st.lists(st.sampled_from(GAPS), min_size=1, max_size=12)):
            ports = pick.one(PORTS)
            payload, payload_port = datagram(pick, ADDRESSES, ports, vnis=(1, 2), tcp=12)
            if payload_port != port and port == 4789:  # keep the batch on one port
                payload = build.vxlan(payload[-60:], vni=1)
            now += gap
            rows.append((payload, now))
        steps.append(("batch", rows))
    return port, steps


REGISTRY = SessionRegistry([MirrorSession(session_id="tms-1", vni=1, session_number=1,
                                          network_interface_id="eni-1", target_id="tmt-1",
                                          filter_id="tmf-1")])


def run_both(port, steps, config, final="shutdown"):
    reference, compiled = FlowTable(config), fast.FastFlowTable(config)
    got_rows, want_rows = [], []
    for kind, value in steps:
        if kind == "expire":
            want, got = reference.expire(value), compiled.expire(value)
        elif kind == "checkpoint":
            assert compiled.snapshot().flows() == reference.snapshot()
            want, got = reference.checkpoint(), compiled.checkpoint()
        else:
            buf, lengths = slab([p for p, _ in value], 160)
            ts = np.array([t for _, t in value], dtype=np.int64)
            batch = decode_batch(buf, lengths, port)
            want, got = reference.add_batch(batch, ts), compiled.add_batch(fast.decode_batch(buf, lengths, port), ts)
        assert got.flows() == want, kind
        assert (len(compiled), compiled.packets, compiled.exported) == (
            len(reference), reference.packets, reference.exported)
        want_rows.append(flows_batch(want, REGISTRY, "c1"))
        if len(got):
            got_rows.append(got.record_batch(REGISTRY, "c1"))
    want, got = reference.drain(final), compiled.drain(final)
    assert got.flows() == want
    assert (len(compiled), compiled.packets, compiled.exported) == (0, reference.packets, reference.exported)
    want_rows.append(flows_batch(want, REGISTRY, "c1"))
    if len(got):
        got_rows.append(got.record_batch(REGISTRY, "c1"))
    want_rows = [r for r in want_rows if r.num_rows]
    assert len(got_rows) == len(want_rows)
    for a, b in zip(want_rows, got_rows):
        assert a.equals(b), (a.to_pylist(), b.to_pylist())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=traffic(), max_flows=st.sampled_from((1, 3, 1000, 1000)),
       max_fragments=st.sampled_from((1, 2, 100)), final=st.sampled_from(("shutdown", "flush")),
       active=st.sampled_from((ACTIVE, 3)))
def test_flows_and_counters_equal_the_reference(case, max_flows, max_fragments, final, active):
    config = FlowConfig(idle_timeout=IDLE, active_timeout=active, close_linger=LINGER,
                        fragment_timeout=FRAGMENT, max_flows=max_flows, max_fragments=max_fragments)
    run_both(*case, config, final)


@given(case=traffic(), linger=st.sampled_from((1, 15)))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_close_linger_longer_than_idle_equal_the_reference(case, linger):
    """expire() walks with min(idle, linger): both orders of the two."""
    run_both(*case, FlowConfig(idle_timeout=IDLE, active_timeout=ACTIVE, close_linger=linger,
                               fragment_timeout=FRAGMENT, max_flows=4))


@st.composite
def conversations(draw):
    """TCP between two hosts (two port pairs): SYN/FIN/RST in any order, at the timeouts."""
    steps, now = [], 10**12
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 4)) == 0:
            steps.append(("checkpoint", None))
            continue
        if draw(st.integers(0, 3)) == 0:
            now += draw(st.sampled_from(GAPS))
            steps.append(("expire", now))
            continue
        rows = []
        for gap, back, flags, sport, cut in draw(st.lists(st.tuples(
                st.sampled_from(GAPS), st.booleans(),
                st.sampled_from((build.SYN, build.SYN | build.ACK, build.ACK, build.FIN | build.ACK,
                                 build.FIN, build.RST, build.RST | build.ACK)),
                st.sampled_from((40000, 40001)), st.sampled_from((None, None, None, 25, 40))),
                min_size=1, max_size=10)):
            a, b, ports = ("10.0.0.1", "10.0.0.2", (sport, 443))
            if back:
                a, b, ports = b, a, ports[::-1]
            packet = build.ipv4(build.tcp(b"d" * 10, sport=ports[0], dport=ports[1], flags=flags), src=a, dst=b)
            now += gap
            rows.append((build.vxlan(build.truncate(build.ethernet(packet), cut), vni=1), now))
        steps.append(("batch", rows))
    return 4789, steps


@settings(max_examples=100, deadline=None)
@given(case=conversations(), max_flows=st.sampled_from((1, 2, 1000)), linger=st.sampled_from((LINGER, 15)))
def test_tcp_closes_equal_the_reference(case, max_flows, linger):
    run_both(*case, FlowConfig(idle_timeout=IDLE, active_timeout=ACTIVE, close_linger=linger,
                               max_flows=max_flows))


def test_tcp_session_fragments_icmp_and_eviction_by_hand():
    def vx(packet, vlans=()):
        ethertype = build.ETH_IPV6 if packet[0] >> 4 == 6 else build.ETH_IPV4
        return build.vxlan(build.ethernet(packet, ethertype=ethertype, vlans=vlans), vni=1), 4789
    A, B = "10.0.0.1", "10.0.0.2"
    seq = [
        build.ipv4(build.tcp(sport=443, dport=40000, flags=build.SYN | build.ACK), src=B, dst=A),
        build.ipv4(build.tcp(sport=40000, dport=443, flags=build.SYN), src=A, dst=B),
        build.ipv4(build.tcp(sport=40000, dport=443, flags=build.FIN | build.ACK), src=A, dst=B),
        build.ipv4(build.tcp(sport=443, dport=40000, flags=build.FIN | build.ACK), src=B, dst=A),
        build.ipv4(build.udp(b"x" * 32, sport=5353, dport=53), proto=build.UDP, ident=9, more_fragments=True),
        build.ipv4(b"y" * 40, proto=build.UDP, ident=9, frag_offset=48),
        build.ipv4(build.icmp(8, 0), proto=build.ICMP), build.ipv4(build.icmp(0, 0), src=B, dst=A, proto=build.ICMP),
        build.ipv6(build.icmp(128, 0), next_header=build.ICMPV6),
        build.ipv6(build.udp(b"z" * 20, sport=1, dport=2), next_header=build.UDP,
                   extensions=[build.ipv6_fragment(0, True, 77)]),
        build.ipv6(b"w" * 16, next_header=build.UDP, extensions=[build.ipv6_fragment(24, False, 77)]),
    ]
    rows = [(vx(p)[0], i * S // 10) for i, p in enumerate(seq)]
    rows.append((vx(seq[1], vlans=(5, 6))[0], 3 * S))
    for max_flows in (1, 3, 100):
        run_both(4789, [("batch", rows), ("expire", 2 * S), ("batch", rows[:3])],
                 FlowConfig(close_linger=1, max_flows=max_flows))


def test_ended_flows_and_packets_reach_parquet_identically(tmp_path, monkeypatch):
    """Pipeline.feed through both paths writes the same flow and packet rows and counters."""
    import pyarrow.parquet as pq

    from collector.pipeline import Pipeline

    payloads = []
    for i in range(300):
        spec = build.FrameSpec(ip_version=4 if i % 3 else 6, src="10.0.0.1" if i % 3 else "fd00::1",
                               dst=f"10.0.1.{i % 7}" if i % 3 else f"fd00::{i % 7 + 2}",
                               sport=1000 + i % 11, tcp_flags=(build.SYN, build.ACK, build.FIN)[i % 3])
        frame = build.mirrored_frame(spec).data
        payloads.append(build.vxlan(frame[:25] if i % 10 == 0 else frame, vni=i % 2 + 1))
    payloads[5] = b"\x00" * 20  # malformed
    buf, lengths = slab(payloads, 128)
    ts = np.arange(len(payloads), dtype=np.int64) * (S // 10)
    results = {}
    for compiled in (True, False):
        monkeypatch.setattr(fast, "available", lambda: compiled)
        out = tmp_path / str(compiled)
        pipeline = Pipeline(out, collector_id="c", registry=REGISTRY, packets=True, packet_bytes=40,
                            flow_config=FlowConfig(idle_timeout=3, max_flows=5))
        assert pipeline.compiled == compiled
        for k in range(0, 300, 64):
            pipeline.feed(buf[k : k + 64], lengths[k : k + 64], ts[k : k + 64])
            pipeline.tick(int(ts[min(k + 63, 299)]))
        pipeline.close()
        tables = [sorted(repr(sorted(r.items())) for r in pq.read_table(out / t).to_pylist())
                  for t in ("flows", "packets")]
        results[compiled] = (pipeline.counters, dict(pipeline.flows.exported), tables)
    assert results[True] == results[False]
    assert results[True][0].flows_exported > 20


def test_pure_python_switch_gives_the_reference_path(tmp_path):
    from collector.pipeline import Pipeline

    script = ("from collector.flows import fast; from collector.pipeline import Pipeline; import tempfile\n"
              "p = Pipeline(tempfile.mkdtemp(), collector_id='c')\n"
              "print(fast.available(), p.compiled, type(p.flows).__name__)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env=dict(os.environ, COLLECTOR_PURE_PYTHON="1"))
    assert done.stdout.strip() == "False False FlowTable"
    assert fast.available() and isinstance(Pipeline(tmp_path, collector_id="c").flows, fast.FastFlowTable)


@given(raw=st.binary(min_size=16, max_size=16), zeros=st.sets(st.integers(0, 7)))
def test_address_text_is_pythons(raw, zeros):
    words = bytearray(raw)
    for w in zeros:
        words[2 * w : 2 * w + 2] = b"\0\0"
    offsets, data = fast._ext.ip_texts(bytes(words) * 2, bytes([6, 4]), b"\1\1")
    offsets = np.frombuffer(offsets, dtype=np.int32)
    texts = [data[offsets[i]:offsets[i + 1]].decode() for i in range(2)]
    if words[:12] != bytes(10) + b"\xff\xff":  # mapped: Python's own text, see fast.py
        assert texts[0] == str(ipaddress.ip_address(bytes(words)))
    assert texts[1] == str(ipaddress.ip_address(bytes(words[12:])))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(datagrams(), min_size=1, max_size=20), compiled=st.booleans())
def test_counters_count_every_datagram_once(tmp_path_factory, batch, compiled):
    """Pipeline.counters against a per-datagram tally of the reference decoder's results."""
    from collections import Counter

    from collector.decode import Malformed, decode_datagram
    from collector.pipeline import Pipeline

    for port in (4789, 6081):
        payloads = [p for p, _ in batch]
        want = Counter()
        packets, wire_bytes, malformed = Counter(), Counter(), Counter()
        for payload in payloads:
            try:
                pkt = decode_datagram(payload, port)
            except Malformed as err:
                malformed[err.reason.value] += 1
                continue
            want["decoded"] += 1
            want["truncated"] += pkt.truncated
            vni = -1 if pkt.vni is None else pkt.vni
            packets[vni] += 1
            wire_bytes[vni] += pkt.wire_len or 0
        pipeline = Pipeline(tmp_path_factory.mktemp("p"), collector_id="c")
        pipeline.compiled = compiled and fast.available()
        buf, lengths = slab(payloads, 512)
        pipeline.feed(buf, lengths, np.arange(len(payloads)), port)
        c = pipeline.counters
        assert (c.datagrams, c.bytes, c.decoded, c.truncated) == (
            len(payloads), sum(map(len, payloads)), want["decoded"], want["truncated"])
        assert (c.malformed, c.session_packets, c.session_bytes) == (malformed, packets, wire_bytes)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(datagrams(), min_size=1, max_size=16), width=st.sampled_from((16, 64, 200)),
       packet_bytes=st.sampled_from((0, 1, 40, 256)), with_buf=st.booleans())
def test_packets_rows_equal_the_reference(batch, width, packet_bytes, with_buf):
    from collector.store.rows import packets_batch

    for port in (4789, 6081):
        buf, lengths = slab([p for p, _ in batch], width)
        decoded = decode_batch(buf, lengths, port)
        rows = np.flatnonzero(decoded.reason == 0)
        ts = np.arange(len(batch), dtype=np.int64) * 1_234_567
        frames = []
        for i in rows.tolist():  # as Pipeline._write_packets cuts them
            start = int(lengths[i]) - int(decoded.captured_len[i])
            stop = min(start + packet_bytes, int(lengths[i]), width)
            frames.append(buf[i, start:stop].tobytes() if with_buf and stop > start else b"")
        want = packets_batch(decoded, rows, ts, frames, REGISTRY, "c1")
        got = fast.packets_record_batch(decoded, rows, ts, buf if with_buf else None, lengths,
                                        packet_bytes, REGISTRY, "c1")
        assert got.equals(want), (got.to_pylist(), want.to_pylist())


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 3), st.sampled_from((-1, 0, 7, 7, 7, 2**24 - 1, 5)),
                               st.sampled_from((-1, 0, 40, 1500, 9001)), st.booleans()),
                     max_size=300))
def test_batch_counters_equal_the_numpy_reference(rows):
    from collector.decode.batch import REASONS
    from collector.pipeline import _batch_counts

    batch = PacketBatch.empty(len(rows))
    for i, (reason, vni, wire, cut) in enumerate(rows):
        batch.reason[i], batch.vni[i], batch.wire_len[i], batch.truncated[i] = reason, vni, wire, cut
    assert fast.batch_counts(batch, len(REASONS)) == _batch_counts(batch)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=traffic())
def test_ended_flows_joined_give_the_rows_of_each_part(case):
    """Pipeline writes the compiled table's small takes as one batch: the same rows."""
    import pyarrow as pa

    port, steps = case
    table = fast.FastFlowTable(FlowConfig(idle_timeout=IDLE, active_timeout=3, close_linger=LINGER))
    parts = []
    for kind, value in steps:
        if kind == "expire":
            parts.append(table.expire(value))
        elif kind == "checkpoint":
            parts.append(table.checkpoint())
        else:
            buf, lengths = slab([p for p, _ in value], 160)
            ts = np.array([t for _, t in value], dtype=np.int64)
            parts.append(table.add_batch(fast.decode_batch(buf, lengths, port), ts))
    parts.append(table.drain())
    joined = fast.EndedFlows.concat(parts)
    want = [p.record_batch(REGISTRY, "c1") for p in parts if len(p)]
    assert len(joined) == sum(map(len, parts))
    if want:
        assert joined.record_batch(REGISTRY, "c1").equals(
            pa.Table.from_batches(want).combine_chunks().to_batches()[0])
