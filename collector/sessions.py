"""The mirror-session registry: which Traffic Mirror session a VXLAN VNI belongs to.

The appliance only sees a 24-bit VNI in each VXLAN header. The session it stands for (source
ENI, target, filter, truncation length) lives in AWS, and users already have it as the AWS CLI's
own JSON output. This module reads those files as they are, with no reshaping by the user:

- ``aws ec2 describe-traffic-mirror-sessions``: ``{"TrafficMirrorSessions": [...], "NextToken"}``,
  several such pages in one JSON list, or a bare list of session objects;
- ``aws ec2 create-traffic-mirror-session``: ``{"TrafficMirrorSession": {...}, "ClientToken"}``;
- ``describe-traffic-mirror-targets`` / ``-filters`` (and the singular ``create-`` outputs), which
  enrich each session with its target type and resource and its filter rules.

A file's kind is recognised by its top-level key, so any mix of files can be given together.

Every problem raises :class:`SessionsError`, whose message names the file, the JSON path and the
field (``sessions.json: TrafficMirrorSessions[3].VirtualNetworkId: expected an integer
0-16777215, got "12"``). Loading either returns a complete, immutable registry or raises.

The core is sans-I/O: :func:`parse_document` takes bytes and :meth:`SessionRegistry.from_documents`
takes parsed JSON; only :func:`read_document` (used by :meth:`SessionRegistry.load`) opens files.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, NoReturn, TypeAlias

__all__ = [
    "MAX_FILE_BYTES",
    "FilterRule",
    "MirrorFilter",
    "MirrorSession",
    "SessionRegistry",
    "SessionsError",
    "filters_of",
    "format_table",
    "load_sessions",
    "parse_document",
    "read_document",
]

# Real outputs are a few MB at most (10,000 sessions is the account quota): anything larger is
# the wrong file, and reading it whole would only waste memory.
MAX_FILE_BYTES = 64 * 1024 * 1024

VNI_MAX = 2**24 - 1  # the VXLAN VNI is 24 bits
PACKET_LENGTH_MAX = 8500  # AWS: valid PacketLength values are 1-8500
NUMBER_MAX = 32766  # upper bound of both SessionNumber and RuleNumber
PORT_MAX = 65535
PROTOCOL_MAX = 255

# Which field holds the target's resource, per target Type. Only the one matching Type is present
# in AWS's output: a public integration broke by assuming NetworkInterfaceId always is.
TARGET_RESOURCE_FIELDS = {
    "network-interface": "NetworkInterfaceId",
    "network-load-balancer": "NetworkLoadBalancerArn",
    "gateway-load-balancer-endpoint": "GatewayLoadBalancerEndpointId",
}

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRange: TypeAlias = tuple[int, int]
Tags: TypeAlias = tuple[tuple[str, str], ...]


class SessionsError(ValueError):
    """A session, target or filter file cannot be used.

    The only error this module raises. The message starts with the file name, then the JSON
    path of the offending value (``TrafficMirrorSessions[3].VirtualNetworkId``), then what was
    expected and what was found.
    """


# --------------------------------------------------------------------------------------------
# The values


@dataclass(frozen=True, slots=True)
class FilterRule:
    """One Traffic Mirror filter rule. ``protocol`` None means all protocols."""

    rule_number: int
    action: str  # "accept" | "reject"
    direction: str  # "ingress" | "egress"
    source_cidr: Network
    destination_cidr: Network
    protocol: int | None = None
    source_port_range: PortRange | None = None
    destination_port_range: PortRange | None = None
    rule_id: str | None = None
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule_number": self.rule_number,
            "direction": self.direction,
            "action": self.action,
            "protocol": self.protocol,
            "source_cidr": str(self.source_cidr),
            "destination_cidr": str(self.destination_cidr),
            "source_port_range": _list_or_none(self.source_port_range),
            "destination_port_range": _list_or_none(self.destination_port_range),
            "rule_id": self.rule_id,
            "description": self.description,
        }


@dataclass(frozen=True, slots=True)
class MirrorFilter:
    """A Traffic Mirror filter. Rules are sorted by rule number: AWS applies the lowest first."""

    filter_id: str
    ingress: tuple[FilterRule, ...] = ()
    egress: tuple[FilterRule, ...] = ()
    network_services: tuple[str, ...] = ()
    description: str | None = None
    tags: Tags = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "filter_id": self.filter_id,
            "description": self.description,
            "network_services": list(self.network_services),
            "ingress": [rule.to_dict() for rule in self.ingress],
            "egress": [rule.to_dict() for rule in self.egress],
            "tags": dict(self.tags),
        }


@dataclass(frozen=True, slots=True)
class MirrorSession:
    """One Traffic Mirror session, keyed by its VNI (AWS's ``VirtualNetworkId``).

    ``target_type``, ``target_resource`` and ``filter`` stay None unless a targets or filters
    file describes the session's target or filter. ``packet_length`` None means whole packets.
    ``source`` (the file it came from) is left out of equality, so the same session read from
    two files compares equal.
    """

    session_id: str
    vni: int
    session_number: int
    network_interface_id: str
    target_id: str
    filter_id: str
    packet_length: int | None = None
    description: str | None = None
    owner_id: str | None = None
    tags: Tags = ()
    target_type: str | None = None
    target_resource: str | None = None
    filter: MirrorFilter | None = None
    source: str = field(default="", compare=False)

    @property
    def tags_dict(self) -> dict[str, str]:
        return dict(self.tags)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vni": self.vni,
            "session_id": self.session_id,
            "network_interface_id": self.network_interface_id,
            "target_id": self.target_id,
            "target_type": self.target_type,
            "target_resource": self.target_resource,
            "filter_id": self.filter_id,
            "session_number": self.session_number,
            "packet_length": self.packet_length,
            "description": self.description,
            "owner_id": self.owner_id,
            "tags": self.tags_dict,
            "filter": None if self.filter is None else self.filter.to_dict(),
            "source": self.source,
        }


def _list_or_none(pair: PortRange | None) -> list[int] | None:
    return None if pair is None else list(pair)


# --------------------------------------------------------------------------------------------
# Reading one JSON object with its location, for error messages


def _show(value: Any) -> str:
    """A short, JSON-spelled rendering of a bad value.

    Never recurses into containers: a value nested as deep as json.loads allows must not blow
    the stack while we merely describe it.
    """
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    text = repr(value)  # a number; JSON allows integers thousands of digits long
    return text if len(text) <= 60 else text[:57] + "..."


class _Node:
    """A JSON object being read: typed getters that fail with file, path and field."""

    __slots__ = ("obj", "file", "path")

    def __init__(self, value: Any, file: str, path: str) -> None:
        if not isinstance(value, dict):
            raise SessionsError(f"{file}: {path}: expected an object, got {_show(value)}")
        self.obj, self.file, self.path = value, file, path

    @property
    def where(self) -> str:
        return f"{self.file}: {self.path}"

    def fail(self, key: str, expected: str, got: Any) -> NoReturn:
        raise SessionsError(f"{self.where}.{key}: expected {expected}, got {_show(got)}")

    def _get(self, key: str, required: bool) -> Any:
        # Absent and null are the same for optional fields; a required null fails the type check.
        if required and key not in self.obj:
            raise SessionsError(f"{self.where}.{key}: required field missing")
        return self.obj.get(key)

    def string(self, key: str, *, required: bool = True) -> str | None:
        value = self._get(key, required)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            self.fail(key, "a string", value)
        return value

    def integer(self, key: str, lo: int, hi: int, *, required: bool = True) -> int | None:
        value = self._get(key, required)
        if value is None and not required:
            return None
        # type() rather than isinstance(): bool is an int subclass, but JSON true is no number.
        if type(value) is not int or not lo <= value <= hi:
            self.fail(key, f"an integer {lo}-{hi}", value)
        return value

    def choice(self, key: str, choices: tuple[str, ...], *, required: bool = True) -> str | None:
        value = self.string(key, required=required)
        if value is not None and value not in choices:
            self.fail(key, " or ".join(json.dumps(c) for c in choices), value)
        return value

    def network(self, key: str) -> Network:
        text = self.string(key)
        try:
            # strict=False: "10.0.0.5/24" names the same block as "10.0.0.0/24" for matching.
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.fail(key, "a CIDR block", text)

    def child(self, key: str) -> _Node | None:
        value = self._get(key, False)
        return None if value is None else _Node(value, self.file, f"{self.path}.{key}")

    def objects(self, key: str) -> list[_Node]:
        value = self._get(key, False)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, "a list", value)
        return [_Node(item, self.file, f"{self.path}.{key}[{i}]") for i, item in enumerate(value)]

    def strings(self, key: str) -> tuple[str, ...]:
        value = self._get(key, False)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(key, "a list", value)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{key}[{i}]", "a string", item)
        return tuple(value)


# --------------------------------------------------------------------------------------------
# Parsing AWS's objects


def _tags(node: _Node) -> Tags:
    # AWS's Tag.Value is optional in the API model; an absent one is an empty value.
    return tuple(
        (tag.string("Key"), tag.string("Value", required=False) or "")
        for tag in node.objects("Tags")
    )


def _parse_session(node: _Node) -> MirrorSession:
    return MirrorSession(
        session_id=node.string("TrafficMirrorSessionId"),
        vni=node.integer("VirtualNetworkId", 0, VNI_MAX),
        session_number=node.integer("SessionNumber", 1, NUMBER_MAX),
        network_interface_id=node.string("NetworkInterfaceId"),
        target_id=node.string("TrafficMirrorTargetId"),
        filter_id=node.string("TrafficMirrorFilterId"),
        packet_length=node.integer("PacketLength", 1, PACKET_LENGTH_MAX, required=False),
        description=node.string("Description", required=False),
        owner_id=node.string("OwnerId", required=False),
        tags=_tags(node),
        source=node.file,
    )


@dataclass(frozen=True, slots=True)
class _Target:
    target_id: str
    type: str | None
    resource: str | None


def _parse_target(node: _Node) -> _Target:
    target_id = node.string("TrafficMirrorTargetId")
    # Any Type string is kept as AWS spells it, so a type added later still loads; its resource
    # is then unknown.
    kind = node.string("Type", required=False)
    resource_field = TARGET_RESOURCE_FIELDS.get(kind)
    resource = node.string(resource_field, required=False) if resource_field else None
    return _Target(target_id, kind, resource)


def _protocol(node: _Node) -> int | None:
    # The API model types Protocol as an optional IANA number; absent means all protocols.
    # -1 is EC2's usual spelling of "all" elsewhere (security groups): accepted the same way.
    value = node.obj.get("Protocol")
    if value is None or (type(value) is int and value == -1):
        return None
    return node.integer("Protocol", 0, PROTOCOL_MAX)


def _port_range(node: _Node, key: str) -> PortRange | None:
    ports = node.child(key)
    if ports is None:
        return None
    low = ports.integer("FromPort", 0, PORT_MAX)
    high = ports.integer("ToPort", 0, PORT_MAX)
    if high < low:
        ports.fail("ToPort", f"an integer {low}-{PORT_MAX} (at least FromPort)", high)
    return (low, high)


def _parse_rule(node: _Node, direction: str) -> FilterRule:
    return FilterRule(
        rule_number=node.integer("RuleNumber", 1, NUMBER_MAX),
        action=node.choice("RuleAction", ("accept", "reject")),
        # The list a rule sits in says its direction when the rule itself does not.
        direction=node.choice("TrafficDirection", ("ingress", "egress"), required=False)
        or direction,
        source_cidr=node.network("SourceCidrBlock"),
        destination_cidr=node.network("DestinationCidrBlock"),
        protocol=_protocol(node),
        source_port_range=_port_range(node, "SourcePortRange"),
        destination_port_range=_port_range(node, "DestinationPortRange"),
        rule_id=node.string("TrafficMirrorFilterRuleId", required=False),
        description=node.string("Description", required=False),
    )


def _rules(node: _Node, key: str, direction: str) -> tuple[FilterRule, ...]:
    rules = (_parse_rule(rule, direction) for rule in node.objects(key))
    return tuple(sorted(rules, key=lambda rule: rule.rule_number))


def _parse_filter(node: _Node) -> MirrorFilter:
    return MirrorFilter(
        filter_id=node.string("TrafficMirrorFilterId"),
        ingress=_rules(node, "IngressFilterRules", "ingress"),
        egress=_rules(node, "EgressFilterRules", "egress"),
        network_services=node.strings("NetworkServices"),
        description=node.string("Description", required=False),
        tags=_tags(node),
    )


# --------------------------------------------------------------------------------------------
# Walking whole documents


# Top-level key -> (kind, whether it holds a list). The singular keys are the create-* outputs.
_KINDS = {
    "TrafficMirrorSessions": ("sessions", True),
    "TrafficMirrorSession": ("sessions", False),
    "TrafficMirrorTargets": ("targets", True),
    "TrafficMirrorTarget": ("targets", False),
    "TrafficMirrorFilters": ("filters", True),
    "TrafficMirrorFilter": ("filters", False),
}
_PARSERS = {"sessions": _parse_session, "targets": _parse_target, "filters": _parse_filter}
_SHAPE = (
    "expected an object with one of the keys " + ", ".join(_KINDS) + ", a list of such "
    "objects, or a list of session objects"
)


class _Found:
    """Everything read from all documents, with where each item was found."""

    def __init__(self) -> None:
        self.sessions: list[tuple[MirrorSession, str]] = []
        self.targets: dict[str, tuple[_Target, str]] = {}
        self.filters: dict[str, tuple[MirrorFilter, str]] = {}

    def add(self, kind: str, node: _Node) -> None:
        item = _PARSERS[kind](node)
        if kind == "sessions":
            self.sessions.append((item, node.where))
        elif kind == "targets":
            _add_unique(self.targets, "TrafficMirrorTargetId", item.target_id, item, node.where)
        else:
            _add_unique(self.filters, "TrafficMirrorFilterId", item.filter_id, item, node.where)


def _add_unique(table: dict, label: str, key: str, item: Any, where: str) -> None:
    # The same target or filter in two files is fine; two different ones under one id would make
    # the enrichment depend on file order.
    seen = table.setdefault(key, (item, where))
    if seen[0] != item:
        raise SessionsError(f"{label} {key} is described differently in {seen[1]} and in {where}")


def _is_page(value: Any) -> bool:
    return isinstance(value, dict) and any(key in value for key in _KINDS)


def _walk_page(page: Any, file: str, prefix: str, found: _Found) -> None:
    if not _is_page(page):
        where = f"{file}: {prefix[:-1]}" if prefix else file
        raise SessionsError(f"{where}: unknown JSON shape: {_SHAPE}, got {_show(page)}")
    for key in (key for key in _KINDS if key in page):
        kind, many = _KINDS[key]
        path = prefix + key
        if not many:
            found.add(kind, _Node(page[key], file, path))
            continue
        if not isinstance(page[key], list):
            raise SessionsError(f"{file}: {path}: expected a list, got {_show(page[key])}")
        for i, item in enumerate(page[key]):
            found.add(kind, _Node(item, file, f"{path}[{i}]"))


def _walk(doc: Any, file: str, found: _Found) -> None:
    if not isinstance(doc, list):
        _walk_page(doc, file, "", found)
    elif any(_is_page(item) for item in doc):
        # Pages concatenated by the user (`jq -s`): every element must then be a page.
        for i, page in enumerate(doc):
            _walk_page(page, file, f"[{i}].", found)
    else:
        for i, item in enumerate(doc):
            found.add("sessions", _Node(item, file, f"[{i}]"))


def _enrich(session: MirrorSession, found: _Found) -> MirrorSession:
    # A target or filter absent from the given files is fine: those fields stay None.
    target = found.targets.get(session.target_id)
    filter_ = found.filters.get(session.filter_id)
    changes: dict[str, Any] = {}
    if target is not None:
        changes.update(target_type=target[0].type, target_resource=target[0].resource)
    if filter_ is not None:
        changes["filter"] = filter_[0]
    return replace(session, **changes) if changes else session


# --------------------------------------------------------------------------------------------
# Bytes and files


def filters_of(documents: Iterable[tuple[str, Any]]) -> dict[str, MirrorFilter]:
    """Every Traffic Mirror filter in ``(name, parsed JSON)`` documents, by id, validated as
    :meth:`SessionRegistry.from_documents` validates them (errors name file, path, field)."""
    found = _Found()
    for name, doc in documents:
        _walk(doc, name, found)
    return {filter_id: mirror_filter for filter_id, (mirror_filter, _) in found.filters.items()}


def parse_document(data: bytes, name: str) -> Any:
    """Parse one file's bytes as JSON; ``name`` is only used in error messages."""
    try:
        # Bytes, not str: json detects UTF-8 (with or without BOM), UTF-16 and UTF-32, so output
        # saved by Windows PowerShell loads too.
        return json.loads(data)
    except json.JSONDecodeError as e:
        msg = f"{name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        raise SessionsError(msg) from None
    except UnicodeDecodeError as e:
        msg = f"{name}: not UTF-8/16/32 text: {e.reason} at byte {e.start}"
        raise SessionsError(msg) from None
    except RecursionError:
        raise SessionsError(f"{name}: invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer longer than Python's 4300-digit limit
        raise SessionsError(f"{name}: invalid JSON: {e}") from None


def read_document(path: str | os.PathLike) -> Any:
    """Read and parse one file, refusing files larger than :data:`MAX_FILE_BYTES`."""
    name = os.fsdecode(path)
    limit = MAX_FILE_BYTES
    try:
        with open(path, "rb") as f:
            # Read one byte past the limit rather than trusting stat(): pipes report size 0.
            data = f.read(limit + 1)
    except OSError as e:
        raise SessionsError(f"{name}: cannot read: {e.strerror or e}") from None
    if len(data) > limit:
        raise SessionsError(f"{name}: larger than the {_mib(limit)} limit for a sessions file")
    return parse_document(data, name)


def _mib(size: int) -> str:
    return f"{size // 2**20} MiB" if size % 2**20 == 0 else f"{size} bytes"


# --------------------------------------------------------------------------------------------
# The registry


class SessionRegistry:
    """The sessions known to the appliance, by VNI. Immutable once built.

    Iteration is in VNI order. Build one with :meth:`load` (files), :meth:`from_documents`
    (parsed JSON) or the constructor (MirrorSession values).
    """

    __slots__ = ("_by_vni", "_by_id")

    def __init__(self, sessions: Iterable[MirrorSession] = ()) -> None:
        self._build((s, s.source or "<no file>") for s in sessions)

    @classmethod
    def load(cls, paths: Iterable[str | os.PathLike] | str | os.PathLike) -> SessionRegistry:
        """Read session, target and filter files (any mix) into one registry."""
        if isinstance(paths, (str, bytes, os.PathLike)):
            paths = [paths]
        return cls.from_documents((os.fsdecode(p), read_document(p)) for p in paths)

    @classmethod
    def from_documents(cls, documents: Iterable[tuple[str, Any]]) -> SessionRegistry:
        """Build from ``(name, parsed JSON)`` pairs: the sans-I/O core of :meth:`load`."""
        found = _Found()
        for name, doc in documents:
            _walk(doc, name, found)
        registry = cls.__new__(cls)
        registry._build((_enrich(s, found), where) for s, where in found.sessions)
        return registry

    def _build(self, located: Iterable[tuple[MirrorSession, str]]) -> None:
        by_vni: dict[int, tuple[MirrorSession, str]] = {}
        by_id: dict[str, tuple[MirrorSession, str]] = {}
        for session, where in located:
            _claim(by_vni, "VirtualNetworkId", session.vni, session, where)
            _claim(by_id, "TrafficMirrorSessionId", session.session_id, session, where)
        ordered = {vni: by_vni[vni][0] for vni in sorted(by_vni)}
        object.__setattr__(self, "_by_vni", MappingProxyType(ordered))
        object.__setattr__(self, "_by_id", MappingProxyType({k: v[0] for k, v in by_id.items()}))

    def __reduce__(self):
        # MappingProxyType does not pickle; the supervisor sends registries to its workers
        return (SessionRegistry, (self.sessions,))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("SessionRegistry is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("SessionRegistry is immutable")

    def lookup(self, vni: int) -> MirrorSession | None:
        """The session whose VirtualNetworkId is ``vni``, or None."""
        return self._by_vni.get(vni)

    def by_session_id(self, session_id: str) -> MirrorSession | None:
        return self._by_id.get(session_id)

    @property
    def sessions(self) -> list[MirrorSession]:
        """A new list of the sessions, in VNI order."""
        return list(self._by_vni.values())

    @property
    def by_vni(self) -> Mapping[int, MirrorSession]:
        """A read-only VNI -> session mapping."""
        return self._by_vni

    def __len__(self) -> int:
        return len(self._by_vni)

    def __iter__(self) -> Iterator[MirrorSession]:
        return iter(self._by_vni.values())

    def __contains__(self, vni: object) -> bool:
        return vni in self._by_vni

    def __repr__(self) -> str:
        return f"<SessionRegistry: {len(self)} sessions>"

    def to_json(self) -> str:
        """The sessions as a JSON list of :meth:`MirrorSession.to_dict`, in VNI order."""
        return json.dumps([s.to_dict() for s in self], indent=2)

    def to_table(self) -> str:
        """An aligned plain-text table of the sessions, in VNI order."""
        return format_table(self)


def _claim(table: dict, label: str, key: Any, session: MirrorSession, where: str) -> None:
    # The same session listed twice (two files, or a page overlap) is fine; two different
    # sessions under one VNI would make every packet of that VNI ambiguous.
    seen, seen_where = table.setdefault(key, (session, where))
    if seen != session:
        raise SessionsError(
            f"{label} {key} is used by two different sessions: "
            f"{seen.session_id} ({seen_where}) and {session.session_id} ({where})"
        )


def load_sessions(*paths: str | os.PathLike) -> SessionRegistry:
    """``SessionRegistry.load(paths)``."""
    return SessionRegistry.load(paths)


# --------------------------------------------------------------------------------------------
# Table output

_COLUMNS = (
    "VNI", "SESSION", "ENI", "TARGET", "TARGET TYPE", "FILTER", "NUMBER", "PACKET LENGTH",
    "DESCRIPTION",
)  # fmt: skip
_RIGHT_ALIGNED = {0, 6, 7}  # the numeric columns


def _cell(text: str | None) -> str:
    # A description may hold newlines or tabs, which would break the alignment.
    if not text:
        return "-"
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _row(s: MirrorSession) -> tuple[str, ...]:
    length = "full" if s.packet_length is None else str(s.packet_length)
    return (
        str(s.vni), _cell(s.session_id), _cell(s.network_interface_id), _cell(s.target_id),
        _cell(s.target_type), _cell(s.filter_id), str(s.session_number), length,
        _cell(s.description),
    )  # fmt: skip


def format_table(sessions: Iterable[MirrorSession]) -> str:
    """Sessions as aligned plain text, one per line under a header; None shows as "-"."""
    rows = [_COLUMNS, *map(_row, sessions)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = (
        "  ".join(
            cell.rjust(width) if i in _RIGHT_ALIGNED else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )
    return "\n".join(lines)
