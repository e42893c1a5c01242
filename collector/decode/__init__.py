"""Sans-I/O decoder for what a mirroring target receives.

`decode_datagram(payload, port)` turns one UDP payload into a `Packet` (fields None where the
copy was cut) or raises `Malformed` with a `Reason`. `decode_batch` does the same for many
datagrams at once, columnar, for the receive path.
"""

from collector.decode.datagram import (
    GENEVE_PORT,
    VXLAN_GPE_PORT,
    VXLAN_PORT,
    decode_datagram,
    decode_frame,
)
from collector.decode.errors import Malformed, Reason
from collector.decode.packet import Packet

__all__ = [
    "GENEVE_PORT",
    "VXLAN_GPE_PORT",
    "VXLAN_PORT",
    "Malformed",
    "Packet",
    "Reason",
    "decode_datagram",
    "decode_frame",
]

from collector.decode.batch import ENCAPS, REASONS, PacketBatch, decode_batch  # noqa: E402

__all__ += ["ENCAPS", "REASONS", "PacketBatch", "decode_batch"]
