"""Ethernet II with any number of 802.1Q / 802.1ad VLAN tags.

AWS sends untagged frames without FCS, but a mirrored instance may tag its own traffic, and
captures from elsewhere do: every tag is walked, and its 12-bit VLAN id kept.
"""

from __future__ import annotations

from collector.decode.packet import Packet

HEADER_LEN = 14
MIN_ETHERTYPE = 0x0600  # below it the field is an 802.3 length: an LLC frame, no ethertype
# 802.1Q C-tag, 802.1ad S-tag, and the pre-standard QinQ TPID that Wireshark also honours
VLAN_TPIDS = frozenset((0x8100, 0x88A8, 0x9100))


def parse(buf, off: int, end: int, pkt: Packet) -> int | None:
    """Fill MACs, VLAN ids and ethertype; return the offset after the ethertype, or None
    when the frame ends before it."""
    if end - off >= 6:
        pkt.eth_dst = bytes(buf[off : off + 6])
    if end - off >= 12:
        pkt.eth_src = bytes(buf[off + 6 : off + 12])
    type_at = off + 12
    vlans = []
    while type_at + 2 <= end:
        ethertype = (buf[type_at] << 8) | buf[type_at + 1]
        if ethertype not in VLAN_TPIDS:
            pkt.vlans = tuple(vlans)
            # An 802.3 frame (STP, IS-IS) carries its length here: it has no ethertype.
            pkt.ethertype = ethertype if ethertype >= MIN_ETHERTYPE else None
            return type_at + 2
        if type_at + 4 > end:
            break  # the tag's TCI was cut: its VLAN id is unknown
        vlans.append(((buf[type_at + 2] << 8) | buf[type_at + 3]) & 0x0FFF)
        type_at += 4
    pkt.vlans = tuple(vlans)
    return None
