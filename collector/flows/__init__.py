"""Flow metering: decoded packets in, ended bidirectional flows out (sans-I/O)."""

from collector.flows.table import END_REASONS, EndedFlow, FlowConfig, FlowTable, icmp_ports

__all__ = ["END_REASONS", "EndedFlow", "FlowConfig", "FlowTable", "icmp_ports"]
