"""Which packets a Traffic Mirror filter mirrors (sans-I/O).

AWS's semantics (`../shared/AWS-MIRRORING.md`, section 4, and the Traffic Mirroring guide):

- A session mirrors one ENI. A packet the ENI sends is **egress**, a packet it receives is
  **ingress**; the ENI is given by its address(es) (`sources`: networks, a /32 or /128 for an
  address). A packet whose source is the ENI is egress (checked first), else one whose
  destination is the ENI is ingress, else it is not the ENI's traffic at all.
- The rules of that direction are tried lowest `RuleNumber` first; the **first match
  decides**: ``accept`` mirrors, ``reject`` does not. **No match, or no rules, mirrors
  nothing.**
- A rule matches when its protocol is None (all) or the packet's, the source address is in
  its `SourceCidrBlock` and the destination in its `DestinationCidrBlock` (an IPv4 block never
  matches an IPv6 packet), and its port ranges, when it has any, hold the packet's ports. Port
  ranges only exist for TCP and UDP: a rule with a port range matches no other protocol, nor
  a packet whose ports are unknown (a non-first fragment, a copy cut before them).
- Never mirrored, whatever the rules: non-IP frames (ARP), DHCP, the instance metadata
  service, Amazon Time Sync, Windows activation (section 4). Amazon DNS traffic is mirrored
  only when the filter lists the ``amazon-dns`` network service (API reference,
  ModifyTrafficMirrorFilterNetworkServices: "By default, Amazon DNS network services are
  not eligible"). Their link-local addresses are below; the VPC resolver at the VPC base
  address + 2 cannot be known from a filter: pass it as `amazon_dns`.

Filters are read with `collector.sessions`, so every file error names the file, the JSON
path and the field (`load_filter`).
"""

from __future__ import annotations

import ipaddress
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from collector.replay.encap import TCP, UDP, Flow
from collector.sessions import (
    FilterRule,
    MirrorFilter,
    SessionsError,
    filters_of,
    read_document,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = [
    "AMAZON_DNS_ADDRESSES",
    "AWS_SERVICE_ADDRESSES",
    "FilterEvaluator",
    "Verdict",
    "load_filter",
    "parse_sources",
]

EGRESS, INGRESS = "egress", "ingress"

# The link-local endpoints of AWS services whose traffic is never mirrored (EC2 user guide)
AWS_SERVICE_ADDRESSES = {
    "169.254.169.254": "instance metadata",
    "fd00:ec2::254": "instance metadata",
    "169.254.169.123": "Amazon Time Sync",
    "fd00:ec2::123": "Amazon Time Sync",
    "169.254.169.250": "Windows activation",
    "169.254.169.251": "Windows activation",
}
AMAZON_DNS_ADDRESSES = ("169.254.169.253", "fd00:ec2::253")
_DHCP_PORTS = frozenset((67, 68, 546, 547))  # DHCP server/client, DHCPv6 client/server
_DNS_PORT = 53


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the filter does with one packet.

    `reason`: "rule" (a rule matched: `rule` says which and whether it accepts), "no match"
    (no rule of `direction` matched), "not the source's traffic", or "never mirrored: ..."
    (ARP, DHCP, an AWS service, Amazon DNS without the network service).
    """

    mirrored: bool
    reason: str
    direction: str | None = None
    rule: FilterRule | None = None


class _Rule:
    """A FilterRule compiled to integer comparisons (it is tried once per packet)."""

    __slots__ = ("rule", "verdict", "proto", "src", "dst", "sports", "dports", "ports")

    def __init__(self, rule: FilterRule, direction: str) -> None:
        self.rule, self.proto = rule, rule.protocol
        self.verdict = Verdict(rule.action == "accept", "rule", direction, rule)
        self.src, self.dst = _compile(rule.source_cidr), _compile(rule.destination_cidr)
        self.sports, self.dports = rule.source_port_range, rule.destination_port_range
        self.ports = self.sports is not None or self.dports is not None

    def matches(self, flow: Flow, src: int, dst: int) -> bool:
        if self.proto is not None and flow.proto != self.proto:
            return False
        if not (_in(self.src, len(flow.src), src) and _in(self.dst, len(flow.dst), dst)):
            return False
        if not self.ports:
            return True
        if flow.proto not in (TCP, UDP) or flow.sport is None:
            return False  # port ranges exist only for TCP and UDP
        sports, dports = self.sports, self.dports
        return ((sports is None or sports[0] <= flow.sport <= sports[1])
                and (dports is None or dports[0] <= flow.dport <= dports[1]))


def _compile(network: Network) -> tuple[int, int, int]:
    """(address length in bytes, mask, network) for `in` tests on integers."""
    return network.max_prefixlen // 8, int(network.netmask), int(network.network_address)


def _in(block: tuple[int, int, int], length: int, address: int) -> bool:
    size, mask, net = block
    return size == length and address & mask == net


class FilterEvaluator:
    """Applies one Traffic Mirror filter to the packets of the ENI at `sources`.

    `sources`: the ENI's addresses, as networks (an address is a /32 or /128); `amazon_dns`:
    addresses of Amazon DNS besides the link-local ones (the VPC resolver, VPC base + 2).
    `counts` keeps how many packets each verdict got (`tally`).
    """

    def __init__(self, mirror_filter: MirrorFilter, sources: Iterable[Network | str],
                 amazon_dns: Iterable[str] = ()) -> None:
        self.filter = mirror_filter
        self.sources = tuple(ipaddress.ip_network(s, strict=False) for s in sources)
        if not self.sources:
            raise ValueError("a filter needs the mirrored ENI's address (a source IP or CIDR)")
        self._sources = [_compile(n) for n in self.sources]
        self._rules = {EGRESS: [_Rule(r, EGRESS) for r in mirror_filter.egress],
                       INGRESS: [_Rule(r, INGRESS) for r in mirror_filter.ingress]}
        self._no_match = {d: Verdict(False, "no match", d) for d in (EGRESS, INGRESS)}
        self._services = {ipaddress.ip_address(a).packed: what
                          for a, what in AWS_SERVICE_ADDRESSES.items()}
        dns = (*AMAZON_DNS_ADDRESSES, *amazon_dns)
        self._dns = frozenset(ipaddress.ip_address(a).packed for a in dns)
        self._mirror_dns = "amazon-dns" in mirror_filter.network_services
        self.counts: Counter[Verdict] = Counter()

    def verdict(self, flow: Flow | None) -> Verdict:
        """The verdict for a packet of `flow` (None: a frame cut inside its Ethernet header)."""
        if flow is None or not flow.is_ip:
            return _NON_IP
        if not flow.src or not flow.dst:
            return _NOT_SOURCE  # addresses cut by the capture: whose traffic it is is unknown
        src, dst = int.from_bytes(flow.src, "big"), int.from_bytes(flow.dst, "big")
        size = len(flow.src)
        if any(_in(block, size, src) for block in self._sources):
            direction = EGRESS
        elif any(_in(block, size, dst) for block in self._sources):
            direction = INGRESS
        else:
            return _NOT_SOURCE
        never = self._never_mirrored(flow)
        if never is not None:
            return never
        for rule in self._rules[direction]:
            if rule.matches(flow, src, dst):
                return rule.verdict
        return self._no_match[direction]

    def tally(self, flow: Flow | None) -> Verdict:
        """`verdict`, counted in `counts`."""
        verdict = self.verdict(flow)
        self.counts[verdict] += 1
        return verdict

    def _never_mirrored(self, flow: Flow) -> Verdict | None:
        for address in (flow.src, flow.dst):
            service = self._services.get(address)
            if service is not None:
                return _never(service)
        ports = (flow.sport, flow.dport) if flow.proto in (TCP, UDP) else ()
        if flow.proto == UDP and (flow.sport in _DHCP_PORTS and flow.dport in _DHCP_PORTS):
            return _never("DHCP")
        if (not self._mirror_dns and _DNS_PORT in ports
                and (flow.src in self._dns or flow.dst in self._dns)):
            return _never("Amazon DNS (the filter lacks the amazon-dns network service)")
        return None

    def rows(self) -> list[tuple[str, str, str, int, str]]:
        """The counts as (direction, rule number, action, packets, description) rows: every
        rule in evaluation order (those that matched nothing too), then "no match" per
        direction, then the packets that never reached the rules."""
        rows = []
        for direction in (INGRESS, EGRESS):
            for rule in self._rules[direction]:
                rows.append((direction, str(rule.rule.rule_number), rule.rule.action,
                             self.counts[rule.verdict], rule.rule.description or ""))
            rows.append((direction, "-", "no match", self.counts[self._no_match[direction]],
                         "not mirrored"))
        others = Counter()
        for verdict, count in self.counts.items():
            if verdict.reason not in ("rule", "no match"):
                others[verdict.reason] += count
        for reason in sorted(others):
            rows.append(("-", "-", reason, others[reason], "not mirrored"))
        if not any(reason == _NOT_SOURCE.reason for reason in others):
            rows.append(("-", "-", _NOT_SOURCE.reason, 0, "not mirrored"))
        return rows

    def table(self) -> str:
        """`rows` as aligned text under a header, and a last line with the totals."""
        header = ("DIRECTION", "RULE", "ACTION", "PACKETS", "DESCRIPTION")
        rows = [header, *((d, n, a, str(c), text) for d, n, a, c, text in self.rows())]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        right = {1, 3}
        lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                           for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                 for row in rows]
        total = sum(self.counts.values())
        mirrored = sum(count for verdict, count in self.counts.items() if verdict.mirrored)
        lines.append(f"{mirrored} of {total} packets mirrored by filter {self.filter.filter_id}")
        return "\n".join(lines)


def _never(what: str) -> Verdict:
    return Verdict(False, f"never mirrored: {what}")


_NON_IP = _never("not IP (ARP, ...)")
_NOT_SOURCE = Verdict(False, "not the source's traffic")


# -- reading filters ---------------------------------------------------------------------------


def load_filter(path: str | os.PathLike, filter_id: str | None = None) -> MirrorFilter:
    """The filter `filter_id` (or the only one) of a `describe-traffic-mirror-filters` /
    `create-traffic-mirror-filter` output file, validated by `collector.sessions` (a bad file
    fails with its file name, JSON path and field). Raises `SessionsError`."""
    name = os.fsdecode(path)
    filters = filters_of([(name, read_document(path))])
    ids = list(filters)
    if not ids:
        raise SessionsError(f"{name}: no TrafficMirrorFilters: expected the output of "
                            "`aws ec2 describe-traffic-mirror-filters`")
    if filter_id is None:
        if len(ids) > 1:
            raise SessionsError(f"{name}: holds {len(ids)} filters ({', '.join(ids)}): "
                                "choose one by its id")
        filter_id = ids[0]
    elif filter_id not in filters:
        raise SessionsError(f"{name}: no filter {filter_id} (it holds {', '.join(ids)})")
    return filters[filter_id]


def parse_sources(ips: Sequence[str] = (), cidrs: Sequence[str] = ()) -> tuple[Network, ...]:
    """`--source-ip` addresses and `--source-cidr` blocks as networks; ValueError names the bad
    one."""
    networks = []
    for text in ips:
        try:
            networks.append(ipaddress.ip_network(ipaddress.ip_address(text)))
        except ValueError:
            raise ValueError(f"source IP {text!r} is not an IPv4 or IPv6 address") from None
    for text in cidrs:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"source CIDR {text!r} is not a CIDR block") from None
    return tuple(networks)
