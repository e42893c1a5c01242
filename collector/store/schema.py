"""The on-disk schema: one explicit pyarrow schema per table, versioned apart from releases.

The flows columns named in the SQL contract are never renamed or dropped; new columns may be
added (readers use union-by-name, so older files stay readable). `SCHEMA_VERSION` is written
into every file's key-value metadata.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"
METADATA = {b"collector.schema_version": SCHEMA_VERSION.encode()}
TIMESTAMP = pa.timestamp("us", tz="UTC")


def _field(name: str, type_: pa.DataType, doc: str | None = None) -> pa.Field:
    """A nullable column; `doc` is kept in the field metadata (and the README)."""
    return pa.field(name, type_, metadata={"doc": doc} if doc else None)

FLOWS = pa.schema(
    [
        _field("vni", pa.int32(), doc="mirror session VNI (NULL: not a mirrored copy / unknown)"),
        _field("session_id", pa.string(), doc="TrafficMirrorSessionId of the VNI"),
        _field("network_interface_id", pa.string(), doc="the mirrored (source) ENI"),
        _field("collector_id", pa.string(), doc="the appliance that metered the flow"),
        _field("vlan_id", pa.int16(), doc="VLAN id of the mirrored frame (outermost tag)"),
        _field("inner_vlan_id", pa.int16(), doc="second VLAN tag (QinQ)"),
        _field("ethertype", pa.int32(), doc="of the mirrored frame: 2048 IPv4, 34525 IPv6, ..."),
        _field("ip_version", pa.int8()),
        _field("protocol", pa.int16(), doc="transport after IPv6 extension headers"),
        _field("src_addr", pa.string(), doc="initiator address (NULL: cut from the copy)"),
        _field("dst_addr", pa.string(), doc="responder address"),
        _field("src_port", pa.int32(), doc="ICMP: type"),
        _field("dst_port", pa.int32(), doc="ICMP: counterpart type, or code"),
        _field("first_seen", TIMESTAMP),
        _field("last_seen", TIMESTAMP),
        _field("packets", pa.int64(), doc="initiator to responder"),
        _field("bytes", pa.int64(), doc="IP-layer wire bytes, from the IP header even when cut"),
        _field("rev_packets", pa.int64(), doc="responder to initiator"),
        _field("rev_bytes", pa.int64()),
        _field("captured_bytes", pa.int64(), doc="mirrored frame bytes received, initiator side"),
        _field("rev_captured_bytes", pa.int64()),
        _field("truncated_packets", pa.int64(), doc="copies holding less than the packet"),
        _field("rev_truncated_packets", pa.int64()),
        _field("tcp_flags", pa.int16(), doc="OR of TCP flags (VPC Flow Logs values, NS = 256)"),
        _field("rev_tcp_flags", pa.int16()),
        _field("end_reason", pa.string(), doc="idle, active, fin, rst, evicted, shutdown, flush, crash"),
        _field("community_id", pa.string(), doc="Community ID v1 (Zeek, Suricata, Arkime)"),
    ],
    metadata=METADATA,
)

PACKETS = pa.schema(
    [
        _field("ts", TIMESTAMP),
        _field("vni", pa.int32()),
        _field("session_id", pa.string()),
        _field("collector_id", pa.string()),
        _field("ip_version", pa.int8()),
        _field("protocol", pa.int16()),
        _field("src_addr", pa.string()),
        _field("dst_addr", pa.string()),
        _field("src_port", pa.int32()),
        _field("dst_port", pa.int32()),
        _field("wire_len", pa.int32()),
        _field("captured_len", pa.int32()),
        _field("truncated", pa.bool_()),
        _field("tcp_flags", pa.int16()),
        _field("frame", pa.binary(), doc="the first --packet-bytes of the mirrored frame"),
    ],
    metadata=METADATA,
)

SESSIONS = pa.schema(
    [
        _field("vni", pa.int32()),
        _field("session_id", pa.string()),
        _field("network_interface_id", pa.string()),
        _field("target_id", pa.string()),
        _field("target_type", pa.string()),
        _field("target_resource", pa.string()),
        _field("filter_id", pa.string()),
        _field("session_number", pa.int32()),
        _field("packet_length", pa.int32(), doc="NULL: whole packets"),
        _field("description", pa.string()),
        _field("owner_id", pa.string()),
        _field("tags", pa.map_(pa.string(), pa.string())),
        _field("collector_id", pa.string()),
        _field("loaded_at", TIMESTAMP),
    ],
    metadata=METADATA,
)

TABLES = {"flows": FLOWS, "packets": PACKETS, "sessions": SESSIONS}
