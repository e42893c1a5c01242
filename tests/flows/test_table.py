import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector import build
from collector.decode import decode_batch, decode_datagram
from collector.flows import FlowConfig, FlowTable, icmp_ports

MS = 1_000_000
S = 1_000_000_000
A, B = "10.0.0.1", "10.0.0.2"


def tcp(src, dst, sport, dport, flags, vni=5, payload=b"", cut=None, vlans=()):
    frame = build.ethernet(build.ipv4(build.tcp(payload, sport=sport, dport=dport, flags=flags),
                                      src=src, dst=dst), vlans=vlans)
    return decode_datagram(build.vxlan(build.truncate(frame, cut), vni=vni))


def run(table, packets, step=MS):
    ended = []
    for i, pkt in enumerate(packets):
        ended += table.add(pkt, i * step)
    return ended


HANDSHAKE = [
    (A, B, 40000, 443, build.SYN),
    (B, A, 443, 40000, build.SYN | build.ACK),
    (A, B, 40000, 443, build.ACK),
]


def test_initiator_is_the_syn_sender_even_when_the_syn_ack_arrives_first():
    table = FlowTable()
    run(table, [tcp(*HANDSHAKE[1]), tcp(*HANDSHAKE[0]), tcp(*HANDSHAKE[2])])
    (flow,) = table.drain()
    assert (flow.src_addr, flow.src_port, flow.dst_port) == (bytes([10, 0, 0, 1]), 40000, 443)
    assert (flow.packets, flow.rev_packets, flow.bytes, flow.rev_bytes) == (2, 1, 80, 40)
    assert (flow.tcp_flags, flow.rev_tcp_flags, flow.end_reason) == (0x12, 0x12, "shutdown")
    assert flow.first_seen_ns == 0 and flow.last_seen_ns == 2 * MS


def test_without_syn_the_earliest_sender_initiates_whatever_the_arrival_order():
    table = FlowTable()
    table.add(tcp(B, A, 443, 40000, build.ACK), 5 * MS)
    table.add(tcp(A, B, 40000, 443, build.ACK), 3 * MS)  # arrives later, sent earlier
    (flow,) = table.drain()
    assert (flow.src_port, flow.first_seen_ns, flow.last_seen_ns) == (40000, 3 * MS, 5 * MS)


def test_fin_both_ways_ends_the_flow_after_the_linger_with_the_last_ack():
    table = FlowTable(FlowConfig(close_linger=2))
    packets = [tcp(*p) for p in HANDSHAKE] + [
        tcp(A, B, 40000, 443, build.FIN | build.ACK),
        tcp(B, A, 443, 40000, build.FIN | build.ACK),
        tcp(A, B, 40000, 443, build.ACK),  # the last ACK joins the closed flow
    ]
    assert run(table, packets) == []
    assert table.expire(1 * S) == []
    (flow,) = table.expire(3 * S)
    assert (flow.end_reason, flow.packets, flow.rev_packets) == ("fin", 4, 2)
    assert table.exported["fin"] == 1 and len(table) == 0


def test_rst_ends_the_flow():
    table = FlowTable(FlowConfig(close_linger=1))
    run(table, [tcp(*HANDSHAKE[0]), tcp(B, A, 443, 40000, build.RST | build.ACK)])
    (flow,) = table.expire(2 * S)
    assert (flow.end_reason, flow.rev_tcp_flags) == ("rst", build.RST | build.ACK)


def test_idle_and_active_timeouts():
    table = FlowTable(FlowConfig(idle_timeout=10, active_timeout=60))
    table.add(tcp(*HANDSHAKE[0]), 0)
    assert table.expire(9 * S) == []
    (idle,) = table.expire(10 * S)
    assert idle.end_reason == "idle"
    # a packet every 5 s for 150 s: active timeout cuts it into 60 s pieces
    ended = run(table, [tcp(A, B, 40000, 443, build.ACK)] * 31, step=5 * S)
    ended += table.drain()
    assert [f.end_reason for f in ended] == ["active", "active", "shutdown"]
    assert [f.packets for f in ended] == [12, 12, 7]


def test_active_timeout_fires_on_the_clock_too():
    table = FlowTable(FlowConfig(idle_timeout=100, active_timeout=60))
    table.add(tcp(*HANDSHAKE[0]), 0)
    table.add(tcp(*HANDSHAKE[2]), 50 * S)
    (flow,) = table.expire(60 * S)
    assert (flow.end_reason, flow.packets) == ("active", 2)


def test_capacity_evicts_the_least_recently_seen():
    table = FlowTable(FlowConfig(max_flows=2))
    ended = run(table, [tcp(A, B, port, 443, build.SYN) for port in (1, 2, 1, 3)])
    assert [(f.end_reason, f.src_port) for f in ended] == [("evicted", 2)]
    assert table.evicted == 1 and len(table) == 2


def test_vni_and_vlan_are_part_of_the_key():
    table = FlowTable()
    run(table, [tcp(*HANDSHAKE[0], vni=1), tcp(*HANDSHAKE[1], vni=2),
                tcp(*HANDSHAKE[0], vni=1, vlans=(7,))])
    flows = sorted(table.drain(), key=lambda f: (f.vni, f.vlan_id or 0))
    assert [(f.vni, f.vlan_id, f.packets + f.rev_packets) for f in flows] == [(1, None, 1), (1, 7, 1), (2, None, 1)]


def test_seed_copies_without_addresses_are_counted_with_null_keys():
    table = FlowTable()
    run(table, [tcp(*HANDSHAKE[0], payload=b"x" * 100, cut=25), tcp(*HANDSHAKE[1], cut=25)])
    (flow,) = table.drain()
    assert (flow.protocol, flow.src_addr, flow.dst_addr, flow.src_port) == (6, None, None, None)
    assert (flow.packets, flow.bytes, flow.captured_bytes, flow.truncated_packets) == (2, 180, 50, 2)


def test_later_fragments_join_their_first_fragment():
    first = build.ipv4(build.udp(b"x" * 32, sport=5353, dport=53), proto=build.UDP, ident=99,
                       more_fragments=True)
    later = build.ipv4(b"y" * 40, proto=build.UDP, ident=99, frag_offset=48)
    orphan = build.ipv4(b"z" * 40, proto=build.UDP, ident=100, frag_offset=48)
    table = FlowTable()
    for i, packet in enumerate((first, later, orphan)):
        table.add(decode_datagram(build.vxlan(build.ethernet(packet), vni=1)), i * MS)
    flows = sorted(table.drain(), key=lambda f: f.src_port or 0)
    assert [(f.src_port, f.dst_port, f.packets) for f in flows] == [(None, None, 1), (5353, 53, 2)]


def test_icmp_echo_request_and_reply_form_one_flow():
    def icmp(src, dst, icmp_type):
        frame = build.ethernet(build.ipv4(build.icmp(icmp_type, 0), src=src, dst=dst, proto=1))
        return decode_datagram(build.vxlan(frame, vni=1))

    table = FlowTable()
    run(table, [icmp(A, B, 8), icmp(B, A, 0), icmp(B, A, 3)])
    flows = sorted(table.drain(), key=lambda f: f.src_port)
    assert [(f.src_port, f.dst_port, f.packets, f.rev_packets) for f in flows] == [(3, 0, 1, 0), (8, 0, 1, 1)]
    assert icmp_ports(6, 128, 0) == (128, 129) and icmp_ports(4, 3, 13) == (3, 13)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="idle_timeout"):
        FlowConfig(idle_timeout=-1)
    with pytest.raises(ValueError, match="max_flows"):
        FlowConfig(max_flows=0)


def test_batch_and_per_packet_metering_agree():
    datagrams = [build.vxlan(build.mirrored_frame(build.FrameSpec(sport=p % 7, tcp_flags=f)).data, vni=p % 3)
                 for p, f in zip(range(60), [build.SYN, build.ACK, build.FIN, build.RST] * 15)]
    buf = np.zeros((len(datagrams), 128), dtype=np.uint8)
    for i, d in enumerate(datagrams):
        buf[i, : len(d)] = np.frombuffer(d, dtype=np.uint8)
    ts = np.arange(len(datagrams), dtype=np.int64) * MS
    one, two = FlowTable(), FlowTable()
    batched = one.add_batch(decode_batch(buf, [len(d) for d in datagrams]), ts) + one.drain()
    single = [f for i, d in enumerate(datagrams) for f in two.add(decode_datagram(d), int(ts[i]))]
    assert batched == single + two.drain()


@given(
    events=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.sampled_from(
        [build.SYN, build.ACK, build.FIN | build.ACK, build.RST, build.SYN | build.ACK]),
        st.integers(0, 30), st.integers(0, 3)), max_size=60),
    idle=st.integers(1, 20), active=st.integers(1, 40), linger=st.integers(1, 5),
    max_flows=st.integers(1, 6),
)
def test_packets_and_bytes_are_conserved_whatever_the_timeouts(events, idle, active, linger, max_flows):
    table = FlowTable(FlowConfig(idle_timeout=idle, active_timeout=active, close_linger=linger,
                                 max_flows=max_flows))
    ended, sent_packets, sent_bytes, now = [], 0, 0, 0
    for client, server, flags, gap, cut in events:
        now += gap * S // 2
        pkt = tcp(f"10.0.0.{client}", f"10.0.1.{server}", 1000 + client, 80, flags,
                  payload=b"p" * (client * 10), cut=(None, 25, 40, 60)[cut])
        sent_packets += 1
        sent_bytes += pkt.wire_len
        ended += table.add(pkt, now)
        if gap % 3 == 0:
            ended += table.expire(now)
        if gap % 7 == 1:  # the interim export of serve's flushes
            ended += table.checkpoint()
    ended += table.drain()
    assert sum(f.packets + f.rev_packets for f in ended) == sent_packets == table.packets
    assert sum(f.bytes + f.rev_bytes for f in ended) == sent_bytes
    assert len(table) == 0 and sum(table.exported.values()) == len(ended)


def test_a_flow_ends_when_its_next_packet_comes_after_the_timeout_without_any_tick():
    table = FlowTable(FlowConfig(idle_timeout=10, close_linger=2))
    ended = run(table, [tcp(*HANDSHAKE[0]), tcp(*HANDSHAKE[0])], step=11 * S)
    assert [f.end_reason for f in ended] == ["idle"]
    closed = [tcp(A, B, 40000, 443, build.FIN), tcp(B, A, 443, 40000, build.FIN),
              tcp(*HANDSHAKE[0])]  # the ports reused 3 s after the close: a new connection
    ended = run(FlowTable(FlowConfig(close_linger=2)), closed, step=3 * S)
    assert [(f.end_reason, f.packets + f.rev_packets) for f in ended] == [("fin", 2)]


def test_checkpoint_exports_each_open_flows_piece_and_keeps_counting_from_zero():
    table = FlowTable()
    run(table, [tcp(*p) for p in HANDSHAKE])
    (first,) = table.checkpoint()
    assert (first.packets, first.rev_packets, first.end_reason) == (2, 1, "active")
    assert (first.first_seen_ns, first.last_seen_ns, first.tcp_flags) == (0, 2 * MS, 0x12)
    assert table.checkpoint() == [] and len(table) == 1  # nothing new: no row, flow kept
    table.add(tcp(B, A, 443, 40000, build.ACK, payload=b"x" * 100), 10 * S)
    (second,) = table.drain()
    # only the responder spoke in this piece: the orientation is still the connection's
    assert (second.src_port, second.dst_port) == (40000, 443)
    assert (second.packets, second.rev_packets, second.rev_bytes) == (0, 1, 140)
    assert (second.first_seen_ns, second.last_seen_ns, second.rev_tcp_flags) == (10 * S, 10 * S, 0x10)
    assert table.exported["active"] == 1 and table.exported["shutdown"] == 1


def test_checkpoint_keeps_the_orientation_of_a_flow_without_syn():
    table = FlowTable()
    table.add(tcp(B, A, 443, 40000, build.ACK), 1 * MS)  # the server spoke first
    (first,) = table.checkpoint()
    table.add(tcp(A, B, 40000, 443, build.ACK), 2 * MS)
    (second,) = table.drain()
    assert (first.src_port, second.src_port, second.rev_packets) == (443, 443, 1)


def test_a_checkpointed_flow_that_goes_quiet_ends_without_an_empty_row():
    table = FlowTable(FlowConfig(idle_timeout=10, close_linger=2))
    closed = [tcp(*p) for p in HANDSHAKE] + [tcp(A, B, 40000, 443, build.FIN | build.ACK),
                                             tcp(B, A, 443, 40000, build.FIN | build.ACK)]
    run(table, closed)
    run(table, [tcp(A, B, 50000, 80, build.ACK)])  # another flow, open
    rows = table.checkpoint()
    assert sorted(f.end_reason for f in rows) == ["active", "fin"]
    assert table.expire(60 * S) == [] and len(table) == 0  # both ended, nothing left to say
    assert table.exported == {**dict.fromkeys(table.exported, 0), "active": 1, "fin": 1}
