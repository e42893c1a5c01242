"""Turning metered values into Arrow rows of the on-disk schemas."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from collector.decode.batch import PacketBatch
from collector.flows.community_id import community_id
from collector.flows.table import EndedFlow
from collector.sessions import MirrorSession, SessionRegistry
from collector.store.schema import FLOWS, PACKETS, SESSIONS


def _text(addr: bytes | None) -> str | None:
    return None if addr is None else str(ipaddress.ip_address(addr))


def flows_batch(ended: Sequence[EndedFlow], registry: SessionRegistry | None,
                collector_id: str) -> pa.RecordBatch:
    """Rows of the flows table, with each VNI's session and the flow's Community ID."""
    sessions = {}
    columns: dict[str, list] = {name: [] for name in FLOWS.names}
    for flow in ended:
        if flow.vni not in sessions:
            sessions[flow.vni] = registry.lookup(flow.vni) if registry and flow.vni is not None else None
        session = sessions[flow.vni]
        values = {
            "vni": flow.vni,
            "session_id": session.session_id if session else None,
            "network_interface_id": session.network_interface_id if session else None,
            "collector_id": collector_id,
            "vlan_id": flow.vlan_id,
            "inner_vlan_id": flow.inner_vlan_id,
            "ethertype": flow.ethertype,
            "ip_version": flow.ip_version,
            "protocol": flow.protocol,
            "src_addr": _text(flow.src_addr),
            "dst_addr": _text(flow.dst_addr),
            "src_port": flow.src_port,
            "dst_port": flow.dst_port,
            "first_seen": flow.first_seen_ns // 1000,
            "last_seen": flow.last_seen_ns // 1000,
            "packets": flow.packets,
            "bytes": flow.bytes,
            "rev_packets": flow.rev_packets,
            "rev_bytes": flow.rev_bytes,
            "captured_bytes": flow.captured_bytes,
            "rev_captured_bytes": flow.rev_captured_bytes,
            "truncated_packets": flow.truncated_packets,
            "rev_truncated_packets": flow.rev_truncated_packets,
            "tcp_flags": flow.tcp_flags,
            "rev_tcp_flags": flow.rev_tcp_flags,
            "end_reason": flow.end_reason,
            "community_id": community_id(flow.protocol, flow.src_addr, flow.dst_addr,
                                         flow.src_port, flow.dst_port),
        }
        for name, value in values.items():
            columns[name].append(value)
    return pa.RecordBatch.from_pydict(columns, schema=FLOWS)


def packets_batch(batch: PacketBatch, rows: np.ndarray, ts_ns: np.ndarray, frames: list[bytes],
                  registry: SessionRegistry | None, collector_id: str) -> pa.RecordBatch:
    """Rows of the packets table for the decoded `rows` of `batch`; `frames[i]` holds the
    kept bytes of row rows[i]'s mirrored frame."""

    def optional(column: np.ndarray) -> pa.Array:
        values = column[rows]
        return pa.array(values, mask=values < 0)

    vni = batch.vni[rows]
    session_ids = []
    for v in vni.tolist():
        session = registry.lookup(v) if registry is not None and v >= 0 else None
        session_ids.append(session.session_id if session else None)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(ts_ns[rows] // 1000, type=pa.int64()).cast(PACKETS.field("ts").type),
            optional(batch.vni),
            pa.array(session_ids, type=pa.string()),
            pa.array([collector_id] * len(rows), type=pa.string()),
            optional(batch.ip_version),
            optional(batch.ip_proto),
            pa.array([_text(a) for a in batch.addresses("src", rows)], type=pa.string()),
            pa.array([_text(a) for a in batch.addresses("dst", rows)], type=pa.string()),
            optional(batch.src_port),
            optional(batch.dst_port),
            optional(batch.wire_len),
            pa.array(batch.captured_len[rows]),
            pa.array(batch.truncated[rows]),
            optional(batch.tcp_flags),
            pa.array(frames, type=pa.binary()),
        ],
        schema=PACKETS,
    )


def sessions_batch(registry: SessionRegistry, collector_id: str, loaded_at_ns: int) -> pa.RecordBatch:
    """The sessions in force, stored with the data so a dataset is self-describing."""
    rows = [_session_row(s, collector_id, loaded_at_ns // 1000) for s in registry]
    return pa.RecordBatch.from_pylist(rows, schema=SESSIONS)


def _session_row(session: MirrorSession, collector_id: str, loaded_at_us: int) -> dict:
    return {
        "vni": session.vni, "session_id": session.session_id,
        "network_interface_id": session.network_interface_id, "target_id": session.target_id,
        "target_type": session.target_type, "target_resource": session.target_resource,
        "filter_id": session.filter_id, "session_number": session.session_number,
        "packet_length": session.packet_length, "description": session.description,
        "owner_id": session.owner_id, "tags": list(session.tags),
        "collector_id": collector_id, "loaded_at": loaded_at_us,
    }
