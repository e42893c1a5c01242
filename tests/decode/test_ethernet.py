import pytest

from collector import build
from collector.decode import decode_datagram

IP = build.ipv4(build.udp(b"x", sport=1, dport=2), proto=build.UDP)


def decode(frame):
    return decode_datagram(build.vxlan(frame, vni=1))


def test_untagged_frame():
    pkt = decode(build.ethernet(IP))
    assert (pkt.eth_dst, pkt.eth_src) == (build.DEFAULT_DST_MAC, build.DEFAULT_SRC_MAC)
    assert (pkt.vlans, pkt.ethertype, pkt.l3_offset, pkt.dst_port) == ((), 0x0800, 14, 2)


@pytest.mark.parametrize(
    "vlans",
    [
        (100,),
        ((0x88A8, 0, 10), (0x8100, 0, 20)),  # 802.1ad S-tag then C-tag
        ((0x9100, 3, 4095), 7, 0),  # pre-standard QinQ TPID, PCP bits ignored in the id
        tuple(range(1, 9)),  # any number of tags
    ],
)
def test_vlan_tags_are_walked(vlans):
    pkt = decode(build.ethernet(IP, vlans=vlans))
    ids = tuple(v[2] if isinstance(v, tuple) else v for v in vlans)
    assert pkt.vlans == ids
    assert (pkt.ethertype, pkt.l3_offset, pkt.dst_port) == (0x0800, 14 + 4 * len(ids), 2)


def test_cut_inside_a_tag_keeps_the_complete_tags():
    frame = build.ethernet(IP, vlans=(5, 6))
    pkt = decode(frame[:18])  # first tag complete, second tag's TPID only
    assert (pkt.vlans, pkt.ethertype, pkt.truncated) == ((5,), None, True)


@pytest.mark.parametrize("cut, dst, src", [(0, None, None), (5, None, None), (6, True, None), (12, True, True)])
def test_mac_addresses_appear_with_their_bytes(cut, dst, src):
    pkt = decode(build.ethernet(IP)[:cut])
    assert (pkt.eth_dst is not None or None, pkt.eth_src is not None or None) == (dst, src)
    assert pkt.truncated and pkt.captured_len == cut


@pytest.mark.parametrize("ethertype", [0x0806, 0x88CC, 0x8847])
def test_non_ip_frames_are_reported_by_ethertype(ethertype):
    pkt = decode(build.ethernet(b"\0" * 28, ethertype=ethertype))
    assert (pkt.ethertype, pkt.ip_version, pkt.l3_offset, pkt.truncated) == (ethertype, None, None, False)


def test_an_8023_frame_has_a_length_not_an_ethertype():
    llc = b"\x42\x42\x03" + b"\0" * 36  # an STP BPDU behind its LLC header
    pkt = decode(build.ethernet(llc, ethertype=len(llc)))
    assert (pkt.ethertype, pkt.ip_version, pkt.truncated, pkt.captured_len) == (None, None, False, 53)
    assert decode(build.ethernet(llc, ethertype=0x0600)).ethertype == 0x0600
