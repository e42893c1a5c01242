"""The decoder's one error type and the reason codes that metrics count.

Only structurally impossible input is malformed: a tunnel header that cannot be a mirror
encapsulation, an IP version nibble that is neither 4 nor 6, a header-length field smaller
than the header it describes. A copy that is merely cut short (AWS `PacketLength`, an MTU, a
capture snaplen) is never malformed: it decodes to the fields whose bytes are present.
"""

from __future__ import annotations

import enum


class Reason(str, enum.Enum):
    """Why a datagram was rejected. The value is the metric label (stable, snake_case)."""

    VXLAN_TRUNCATED = "vxlan_truncated"  # fewer than the 8 bytes of a VXLAN header
    VXLAN_NO_VNI_FLAG = "vxlan_no_vni_flag"  # I flag clear: no VNI, so no session (RFC 7348 5)
    VXLAN_GPE_VERSION = "vxlan_gpe_version"  # VXLAN-GPE version bits other than 0
    GENEVE_TRUNCATED = "geneve_truncated"  # fixed header or declared options cut short
    GENEVE_VERSION = "geneve_version"  # version other than 0 (RFC 8926 3.4)
    GENEVE_OPTION_LENGTH = "geneve_option_length"  # an option TLV runs past the options area
    IP_VERSION = "ip_version"  # version nibble not 4/6, or not the one the ethertype names
    IPV4_HEADER_LENGTH = "ipv4_header_length"  # IHL < 5
    IPV4_TOTAL_LENGTH = "ipv4_total_length"  # total length smaller than the header
    TCP_HEADER_LENGTH = "tcp_header_length"  # data offset < 5
    UDP_LENGTH = "udp_length"  # UDP length 1..7 (0 is the IPv6 jumbogram convention)


class Malformed(ValueError):
    """A datagram that cannot be a mirrored packet.

    `reason` is a `Reason` (count it), `offset` the byte offset in the UDP payload where the
    impossible field sits, `detail` a human sentence.
    """

    def __init__(self, reason: Reason, offset: int, detail: str) -> None:
        super().__init__(f"{reason.value} at offset {offset}: {detail}")
        self.reason = reason
        self.offset = offset
        self.detail = detail
