"""Tests for collector.sessions: every accepted shape, every rejection with its exact message."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector import sessions as sessions_module
from collector.sessions import (
    FilterRule,
    MirrorFilter,
    MirrorSession,
    SessionRegistry,
    SessionsError,
    load_sessions,
    parse_document,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sessions"
SEED_FILE = FIXTURES / "seed.json"
SEED_DOC = json.loads(SEED_FILE.read_text())
SEED = SEED_DOC["TrafficMirrorSession"]

SEED_SESSION = MirrorSession(
    session_id="tms-08a33b1214EXAMPLE",
    vni=7159709,
    session_number=1,
    network_interface_id="eni-070203f901EXAMPLE",
    target_id="tmt-07f75d8feeEXAMPLE",
    filter_id="tmf-04812ff784EXAMPLE",
    packet_length=25,
    description="example session",
    owner_id="111122223333",
    tags=(),
)

SHAPE = (
    "expected an object with one of the keys TrafficMirrorSessions, TrafficMirrorSession, "
    "TrafficMirrorTargets, TrafficMirrorTarget, TrafficMirrorFilters, TrafficMirrorFilter, "
    "a list of such objects, or a list of session objects"
)


def session(**changes):
    """The seed session's JSON with some fields changed; a value of ... removes the field."""
    doc = copy.deepcopy(SEED)
    for key, value in changes.items():
        if value is ...:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def write(directory: Path, name: str, doc) -> Path:
    path = directory / name
    path.write_text(json.dumps(doc))
    return path


def load_one(tmp_path, monkeypatch, name, doc) -> SessionRegistry:
    # Load by a relative name, so messages read exactly as a user would see them.
    monkeypatch.chdir(tmp_path)
    write(tmp_path, name, doc)
    return SessionRegistry.load([name])


def error_of(tmp_path, monkeypatch, name, doc) -> str:
    with pytest.raises(SessionsError) as info:
        load_one(tmp_path, monkeypatch, name, doc)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Accepted shapes


def test_seed_example():
    registry = SessionRegistry.load(SEED_FILE)
    assert len(registry) == 1
    (only,) = registry
    assert only == SEED_SESSION
    assert only.source == str(SEED_FILE)
    assert registry.lookup(7159709) is only
    assert registry.lookup(7159710) is None
    assert 7159709 in registry and 1 not in registry
    assert registry.by_session_id("tms-08a33b1214EXAMPLE") is only
    assert registry.by_session_id("tms-nope") is None
    assert registry.sessions == [only]
    assert only.target_type is None and only.target_resource is None and only.filter is None


def test_seed_to_dict():
    (only,) = SessionRegistry.load(SEED_FILE)
    assert only.to_dict() == {
        "vni": 7159709,
        "session_id": "tms-08a33b1214EXAMPLE",
        "network_interface_id": "eni-070203f901EXAMPLE",
        "target_id": "tmt-07f75d8feeEXAMPLE",
        "target_type": None,
        "target_resource": None,
        "filter_id": "tmf-04812ff784EXAMPLE",
        "session_number": 1,
        "packet_length": 25,
        "description": "example session",
        "owner_id": "111122223333",
        "tags": {},
        "filter": None,
        "source": str(SEED_FILE),
    }


def test_describe_output_sorted_by_vni_with_whole_packets_and_tags():
    registry = SessionRegistry.load([FIXTURES / "describe-sessions.json"])
    assert [s.vni for s in registry] == [100, 200, 7159709]
    web = registry.lookup(100)
    assert web.packet_length is None
    assert web.session_number == 2
    assert web.tags == (("Name", "web"), ("team", "netops"))
    assert web.tags_dict == {"Name": "web", "team": "netops"}
    assert registry.lookup(200).packet_length == 8500
    assert registry.lookup(7159709) == SEED_SESSION


def test_pages_concatenated_in_a_list():
    registry = SessionRegistry.load(FIXTURES / "pages.json")
    assert [s.session_id for s in registry] == ["tms-0b7d2c9e5fEXAMPLE", "tms-0f1e2d3c4bEXAMPLE"]


def test_bare_list_of_sessions():
    registry = SessionRegistry.load(FIXTURES / "bare-list.json")
    assert [(s.vni, s.session_id) for s in registry] == [(200, "tms-0f1e2d3c4bEXAMPLE")]


def test_pages_and_describe_give_the_same_sessions():
    pages = SessionRegistry.load(FIXTURES / "pages.json")
    describe = SessionRegistry.load(FIXTURES / "describe-sessions.json")
    assert pages.sessions == [describe.lookup(100), describe.lookup(200)]


def test_empty_describe_output_and_targets_only_give_an_empty_registry(tmp_path):
    empty = write(tmp_path, "empty.json", {"TrafficMirrorSessions": [], "NextToken": None})
    registry = SessionRegistry.load([empty, FIXTURES / "describe-targets.json"])
    assert len(registry) == 0 and list(registry) == [] and registry.to_json() == "[]"


def test_packet_length_null_means_whole_packets(tmp_path, monkeypatch):
    registry = load_one(
        tmp_path, monkeypatch, "s.json", {"TrafficMirrorSession": session(PacketLength=None)}
    )
    assert registry.lookup(7159709).packet_length is None


def test_optional_fields_absent(tmp_path, monkeypatch):
    doc = {
        "TrafficMirrorSession": session(Description=..., OwnerId=..., Tags=..., PacketLength=...)
    }
    (only,) = load_one(tmp_path, monkeypatch, "s.json", doc)
    assert (only.description, only.owner_id, only.tags, only.packet_length) == (
        None,
        None,
        (),
        None,
    )


def test_tag_without_value_is_empty(tmp_path, monkeypatch):
    doc = {"TrafficMirrorSession": session(Tags=[{"Key": "k"}, {"Key": "n", "Value": None}])}
    (only,) = load_one(tmp_path, monkeypatch, "s.json", doc)
    assert only.tags == (("k", ""), ("n", ""))


def test_unknown_fields_are_ignored(tmp_path, monkeypatch):
    doc = {
        "TrafficMirrorSession": session(
            FutureField={"x": [1]}, Tags=[{"Key": "a", "Value": "b", "More": 1}]
        ),
        "ClientToken": "t",
        "SomethingNew": True,
    }
    (only,) = load_one(tmp_path, monkeypatch, "s.json", doc)
    assert only == dataclasses.replace(SEED_SESSION, tags=(("a", "b"),))


def test_vni_bounds_accepted(tmp_path, monkeypatch):
    doc = {
        "TrafficMirrorSessions": [
            session(
                VirtualNetworkId=0,
                TrafficMirrorSessionId="tms-a",
                SessionNumber=32766,
                PacketLength=1,
            ),
            session(VirtualNetworkId=16777215, TrafficMirrorSessionId="tms-b", PacketLength=8500),
        ]
    }
    registry = load_one(tmp_path, monkeypatch, "s.json", doc)
    assert [s.vni for s in registry] == [0, 16777215]
    assert registry.lookup(0).session_number == 32766


def test_utf16_and_bom_files_load(tmp_path):
    text = json.dumps(SEED_DOC)
    (tmp_path / "u16.json").write_bytes(text.encode("utf-16"))
    (tmp_path / "bom.json").write_bytes(text.encode("utf-8-sig"))
    for name in ("u16.json", "bom.json"):
        assert SessionRegistry.load(tmp_path / name).sessions == [SEED_SESSION]


# ---------------------------------------------------------------------------------------------
# Targets and filters


INGRESS_100 = FilterRule(
    rule_number=100,
    action="reject",
    direction="ingress",
    source_cidr=ipaddress.ip_network("10.0.0.0/16"),
    destination_cidr=ipaddress.ip_network("10.0.0.2/32"),
    protocol=17,
    source_port_range=(1024, 65535),
    destination_port_range=(53, 53),
    rule_id="tmfr-01f3e5d7c9EXAMPLE",
    description="skip DNS",
)
INGRESS_200 = FilterRule(
    rule_number=200,
    action="accept",
    direction="ingress",
    source_cidr=ipaddress.ip_network("0.0.0.0/0"),
    destination_cidr=ipaddress.ip_network("10.0.0.0/16"),
    protocol=6,
    source_port_range=None,
    destination_port_range=(443, 443),
    rule_id="tmfr-0a2b4c6d8eEXAMPLE",
    description="HTTPS in",
)
EGRESS_100 = FilterRule(
    rule_number=100,
    action="accept",
    direction="egress",
    source_cidr=ipaddress.ip_network("2001:db8::/32"),
    destination_cidr=ipaddress.ip_network("::/0"),
    protocol=None,
    rule_id="tmfr-0b1c2d3e4fEXAMPLE",
    description="all IPv6 out",
)
WEB_FILTER = MirrorFilter(
    filter_id="tmf-04812ff784EXAMPLE",
    ingress=(INGRESS_100, INGRESS_200),  # sorted by rule number, unlike the file
    egress=(EGRESS_100,),
    network_services=("amazon-dns",),
    description="web filter",
    tags=(),
)
NLB_ARN = (
    "arn:aws:elasticloadbalancing:us-east-1:111122223333:"
    "loadbalancer/net/collectors/0123456789abcdef"
)


def all_fixtures():
    return sorted(FIXTURES.glob("*.json"))


def test_merge_of_all_fixtures_enriches_every_session():
    registry = SessionRegistry.load(all_fixtures())
    assert len(registry) == 3
    assert [(s.vni, s.target_type, s.target_resource) for s in registry] == [
        (100, "gateway-load-balancer-endpoint", "vpce-0f3c6e8d2bEXAMPLE"),
        (200, "network-load-balancer", NLB_ARN),
        (7159709, "network-interface", "eni-0e2f7a1c9dEXAMPLE"),
    ]
    assert registry.lookup(7159709).filter == WEB_FILTER
    assert registry.lookup(200).filter is WEB_FILTER or registry.lookup(200).filter == WEB_FILTER
    assert registry.lookup(100).filter == MirrorFilter(
        filter_id="tmf-0293f26e86EXAMPLE", description="no rules yet"
    )


def test_enrichment_does_not_depend_on_file_order():
    files = all_fixtures()
    assert SessionRegistry.load(files).sessions == SessionRegistry.load(files[::-1]).sessions


def test_target_without_matching_file_entry_stays_none():
    registry = SessionRegistry.load(
        [FIXTURES / "bare-list.json", FIXTURES / "describe-filters.json"]
    )
    (only,) = registry
    assert (only.target_type, only.target_resource) == (None, None)
    assert only.filter == WEB_FILTER


def test_filter_to_dict():
    (only,) = SessionRegistry.load([SEED_FILE, FIXTURES / "describe-filters.json"])
    assert only.to_dict()["filter"] == {
        "filter_id": "tmf-04812ff784EXAMPLE",
        "description": "web filter",
        "network_services": ["amazon-dns"],
        "ingress": [
            {
                "rule_number": 100,
                "direction": "ingress",
                "action": "reject",
                "protocol": 17,
                "source_cidr": "10.0.0.0/16",
                "destination_cidr": "10.0.0.2/32",
                "source_port_range": [1024, 65535],
                "destination_port_range": [53, 53],
                "rule_id": "tmfr-01f3e5d7c9EXAMPLE",
                "description": "skip DNS",
            },
            INGRESS_200.to_dict(),
        ],
        "egress": [EGRESS_100.to_dict()],
        "tags": {},
    }
    assert INGRESS_200.to_dict()["destination_port_range"] == [443, 443]
    assert EGRESS_100.to_dict()["source_port_range"] is None


def test_singular_create_outputs_for_targets_and_filters(tmp_path):
    target = write(
        tmp_path,
        "t.json",
        {
            "TrafficMirrorTarget": {
                "TrafficMirrorTargetId": "tmt-07f75d8feeEXAMPLE",
                "NetworkLoadBalancerArn": NLB_ARN,
                "Type": "network-load-balancer",
            },
            "ClientToken": "x",
        },
    )
    filt = write(
        tmp_path,
        "f.json",
        {
            "TrafficMirrorFilter": {"TrafficMirrorFilterId": "tmf-04812ff784EXAMPLE"},
            "ClientToken": "y",
        },
    )
    (only,) = SessionRegistry.load([SEED_FILE, target, filt])
    assert (only.target_type, only.target_resource) == ("network-load-balancer", NLB_ARN)
    assert only.filter == MirrorFilter(filter_id="tmf-04812ff784EXAMPLE")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # Only the field matching Type counts: a stray NetworkInterfaceId is not the resource.
        (
            {"Type": "gateway-load-balancer-endpoint", "NetworkInterfaceId": "eni-x"},
            ("gateway-load-balancer-endpoint", None),
        ),
        ({"Type": "some-future-type", "NetworkInterfaceId": "eni-x"}, ("some-future-type", None)),
        ({}, (None, None)),
        (
            {"Type": "network-interface", "NetworkInterfaceId": "eni-x"},
            ("network-interface", "eni-x"),
        ),
    ],
)
def test_target_resource_follows_type(tmp_path, target, expected):
    target = {"TrafficMirrorTargetId": "tmt-07f75d8feeEXAMPLE", **target}
    path = write(tmp_path, "t.json", {"TrafficMirrorTargets": [target]})
    (only,) = SessionRegistry.load([SEED_FILE, path])
    assert (only.target_type, only.target_resource) == expected


@pytest.mark.parametrize(
    ("protocol", "expected"), [(None, None), (-1, None), (0, 0), (6, 6), (255, 255)]
)
def test_rule_protocol(tmp_path, protocol, expected):
    rule = {"RuleNumber": 1, "RuleAction": "accept", "SourceCidrBlock": "0.0.0.0/0",
            "DestinationCidrBlock": "0.0.0.0/0", "Protocol": protocol}  # fmt: skip
    doc = {
        "TrafficMirrorFilters": [
            {"TrafficMirrorFilterId": "tmf-04812ff784EXAMPLE", "EgressFilterRules": [rule]}
        ]
    }
    (only,) = SessionRegistry.load([SEED_FILE, write(tmp_path, "f.json", doc)])
    (egress,) = only.filter.egress
    assert (egress.protocol, egress.direction, egress.source_port_range) == (
        expected,
        "egress",
        None,
    )


def test_cidr_with_host_bits_is_normalised(tmp_path):
    rule = {"RuleNumber": 1, "RuleAction": "accept", "SourceCidrBlock": "10.0.0.5/24",
            "DestinationCidrBlock": "10.1.2.3", "TrafficDirection": "ingress"}  # fmt: skip
    doc = {
        "TrafficMirrorFilters": [
            {"TrafficMirrorFilterId": "tmf-04812ff784EXAMPLE", "IngressFilterRules": [rule]}
        ]
    }
    (only,) = SessionRegistry.load([SEED_FILE, write(tmp_path, "f.json", doc)])
    (ingress,) = only.filter.ingress
    assert (str(ingress.source_cidr), str(ingress.destination_cidr)) == (
        "10.0.0.0/24",
        "10.1.2.3/32",
    )


# ---------------------------------------------------------------------------------------------
# Session validation: file, index and field named exactly


def with_bad_fourth(bad):
    """A describe page whose fourth session (index 3) is ``bad``."""
    good = [session(TrafficMirrorSessionId=f"tms-{i}", VirtualNetworkId=i) for i in range(1, 4)]
    return {"TrafficMirrorSessions": [*good, bad]}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"VirtualNetworkId": "12"}, 'VirtualNetworkId: expected an integer 0-16777215, got "12"'),
        ({"VirtualNetworkId": True}, "VirtualNetworkId: expected an integer 0-16777215, got true"),
        (
            {"VirtualNetworkId": False},
            "VirtualNetworkId: expected an integer 0-16777215, got false",
        ),
        ({"VirtualNetworkId": -1}, "VirtualNetworkId: expected an integer 0-16777215, got -1"),
        (
            {"VirtualNetworkId": 16777216},
            "VirtualNetworkId: expected an integer 0-16777215, got 16777216",
        ),
        ({"VirtualNetworkId": 12.0}, "VirtualNetworkId: expected an integer 0-16777215, got 12.0"),
        ({"VirtualNetworkId": None}, "VirtualNetworkId: expected an integer 0-16777215, got null"),
        (
            {"VirtualNetworkId": [12]},
            "VirtualNetworkId: expected an integer 0-16777215, got a list",
        ),
        ({"VirtualNetworkId": ...}, "VirtualNetworkId: required field missing"),
        ({"PacketLength": 0}, "PacketLength: expected an integer 1-8500, got 0"),
        ({"PacketLength": 8501}, "PacketLength: expected an integer 1-8500, got 8501"),
        ({"PacketLength": "25"}, 'PacketLength: expected an integer 1-8500, got "25"'),
        ({"PacketLength": True}, "PacketLength: expected an integer 1-8500, got true"),
        ({"SessionNumber": 0}, "SessionNumber: expected an integer 1-32766, got 0"),
        ({"SessionNumber": 32767}, "SessionNumber: expected an integer 1-32766, got 32767"),
        ({"SessionNumber": True}, "SessionNumber: expected an integer 1-32766, got true"),
        ({"SessionNumber": ...}, "SessionNumber: required field missing"),
        ({"TrafficMirrorSessionId": 123}, "TrafficMirrorSessionId: expected a string, got 123"),
        ({"TrafficMirrorSessionId": ...}, "TrafficMirrorSessionId: required field missing"),
        ({"NetworkInterfaceId": None}, "NetworkInterfaceId: expected a string, got null"),
        ({"TrafficMirrorTargetId": ...}, "TrafficMirrorTargetId: required field missing"),
        (
            {"TrafficMirrorFilterId": {"a": 1}},
            "TrafficMirrorFilterId: expected a string, got an object",
        ),
        ({"OwnerId": 111122223333}, "OwnerId: expected a string, got 111122223333"),
        ({"Description": 5}, "Description: expected a string, got 5"),
        ({"Tags": "x"}, 'Tags: expected a list, got "x"'),
        ({"Tags": {"Key": "a"}}, "Tags: expected a list, got an object"),
        ({"Tags": [1]}, "Tags[0]: expected an object, got 1"),
        (
            {"Tags": [{"Key": "a", "Value": "b"}, {"Value": "v"}]},
            "Tags[1].Key: required field missing",
        ),
        ({"Tags": [{"Key": "k", "Value": 3}]}, "Tags[0].Value: expected a string, got 3"),
    ],
)
def test_session_field_errors(tmp_path, monkeypatch, changes, message):
    bad = session(**{"TrafficMirrorSessionId": "tms-4", "VirtualNetworkId": 4, **changes})
    error = error_of(tmp_path, monkeypatch, "sessions.json", with_bad_fourth(bad))
    assert error == f"sessions.json: TrafficMirrorSessions[3].{message}"


def test_the_briefs_example_message(tmp_path, monkeypatch):
    bad = session(VirtualNetworkId="12")
    error = error_of(tmp_path, monkeypatch, "sessions.json", with_bad_fourth(bad))
    assert error == (
        "sessions.json: TrafficMirrorSessions[3].VirtualNetworkId: "
        'expected an integer 0-16777215, got "12"'
    )


def test_session_error_is_a_value_error():
    assert issubclass(SessionsError, ValueError)


def test_long_string_value_is_cut_in_the_message(tmp_path, monkeypatch):
    doc = {"TrafficMirrorSession": session(VirtualNetworkId="9" * 100)}
    error = error_of(tmp_path, monkeypatch, "s.json", doc)
    assert error == (
        "s.json: TrafficMirrorSession.VirtualNetworkId: "
        f'expected an integer 0-16777215, got "{"9" * 60}"...'
    )


def test_nan_is_not_an_integer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("s.json").write_text(
        json.dumps({"TrafficMirrorSession": session(VirtualNetworkId=float("nan"))})
    )
    with pytest.raises(
        SessionsError,
        match=r"^s\.json: TrafficMirrorSession\.VirtualNetworkId: "
        r"expected an integer 0-16777215, got nan$",
    ):
        SessionRegistry.load("s.json")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (with_bad_fourth("oops"), 'TrafficMirrorSessions[3]: expected an object, got "oops"'),
        (with_bad_fourth(None), "TrafficMirrorSessions[3]: expected an object, got null"),
        ({"TrafficMirrorSessions": {}}, "TrafficMirrorSessions: expected a list, got an object"),
        ({"TrafficMirrorSessions": None}, "TrafficMirrorSessions: expected a list, got null"),
        ({"TrafficMirrorSession": []}, "TrafficMirrorSession: expected an object, got a list"),
        (
            {"TrafficMirrorSession": session(PacketLength=-5)},
            "TrafficMirrorSession.PacketLength: expected an integer 1-8500, got -5",
        ),
        ([session(), 5], "[1]: expected an object, got 5"),
        (
            [
                {"TrafficMirrorSessions": []},
                {"TrafficMirrorSessions": [session(SessionNumber="1")]},
            ],
            '[1].TrafficMirrorSessions[0].SessionNumber: expected an integer 1-32766, got "1"',
        ),
        (
            [{"TrafficMirrorSessions": []}, {"NextToken": "x"}],
            f"[1]: unknown JSON shape: {SHAPE}, got an object",
        ),
        ([{"TrafficMirrorSessions": []}, 7], f"[1]: unknown JSON shape: {SHAPE}, got 7"),
    ],
)
def test_shape_errors(tmp_path, monkeypatch, doc, message):
    assert error_of(tmp_path, monkeypatch, "s.json", doc) == f"s.json: {message}"


@pytest.mark.parametrize(
    ("doc", "got"),
    [
        ({"Reservations": []}, "an object"),
        ({}, "an object"),
        (42, "42"),
        ("text", '"text"'),
        (None, "null"),
    ],
)
def test_unknown_top_level_shape(tmp_path, monkeypatch, doc, got):
    assert (
        error_of(tmp_path, monkeypatch, "s.json", doc)
        == f"s.json: unknown JSON shape: {SHAPE}, got {got}"
    )


# ---------------------------------------------------------------------------------------------
# Target and filter validation


def filter_with_rule(**changes):
    rule = {
        "TrafficMirrorFilterRuleId": "tmfr-1",
        "TrafficDirection": "ingress",
        "RuleNumber": 10,
        "RuleAction": "accept",
        "Protocol": 6,
        "DestinationPortRange": {"FromPort": 80, "ToPort": 80},
        "DestinationCidrBlock": "10.0.0.0/8",
        "SourceCidrBlock": "0.0.0.0/0",
    }
    good = dict(rule, RuleNumber=5)
    for key, value in changes.items():
        if value is ...:
            rule.pop(key, None)
        else:
            rule[key] = value
    return {
        "TrafficMirrorFilters": [
            {"TrafficMirrorFilterId": "tmf-1", "IngressFilterRules": [good, rule]}
        ]
    }


RULE = "TrafficMirrorFilters[0].IngressFilterRules[1]"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"RuleNumber": 0}, "RuleNumber: expected an integer 1-32766, got 0"),
        ({"RuleNumber": 32767}, "RuleNumber: expected an integer 1-32766, got 32767"),
        ({"RuleNumber": True}, "RuleNumber: expected an integer 1-32766, got true"),
        ({"RuleNumber": ...}, "RuleNumber: required field missing"),
        ({"RuleAction": "allow"}, 'RuleAction: expected "accept" or "reject", got "allow"'),
        ({"RuleAction": "ACCEPT"}, 'RuleAction: expected "accept" or "reject", got "ACCEPT"'),
        ({"RuleAction": ...}, "RuleAction: required field missing"),
        (
            {"TrafficDirection": "both"},
            'TrafficDirection: expected "ingress" or "egress", got "both"',
        ),
        ({"Protocol": 256}, "Protocol: expected an integer 0-255, got 256"),
        ({"Protocol": -2}, "Protocol: expected an integer 0-255, got -2"),
        ({"Protocol": "tcp"}, 'Protocol: expected an integer 0-255, got "tcp"'),
        ({"Protocol": True}, "Protocol: expected an integer 0-255, got true"),
        (
            {"SourceCidrBlock": "10.0.0.0/33"},
            'SourceCidrBlock: expected a CIDR block, got "10.0.0.0/33"',
        ),
        (
            {"DestinationCidrBlock": "anywhere"},
            'DestinationCidrBlock: expected a CIDR block, got "anywhere"',
        ),
        ({"DestinationCidrBlock": 10}, "DestinationCidrBlock: expected a string, got 10"),
        ({"SourceCidrBlock": ...}, "SourceCidrBlock: required field missing"),
        ({"DestinationPortRange": "80"}, 'DestinationPortRange: expected an object, got "80"'),
        (
            {"DestinationPortRange": {"FromPort": 80}},
            "DestinationPortRange.ToPort: required field missing",
        ),
        (
            {"DestinationPortRange": {"FromPort": 70000, "ToPort": 80}},
            "DestinationPortRange.FromPort: expected an integer 0-65535, got 70000",
        ),
        (
            {"SourcePortRange": {"FromPort": 0, "ToPort": -1}},
            "SourcePortRange.ToPort: expected an integer 0-65535, got -1",
        ),
        (
            {"SourcePortRange": {"FromPort": 100, "ToPort": 99}},
            "SourcePortRange.ToPort: expected an integer 100-65535 (at least FromPort), got 99",
        ),
        ({"TrafficMirrorFilterRuleId": 1}, "TrafficMirrorFilterRuleId: expected a string, got 1"),
        ({"Description": False}, "Description: expected a string, got false"),
    ],
)
def test_filter_rule_errors(tmp_path, monkeypatch, changes, message):
    error = error_of(tmp_path, monkeypatch, "filters.json", filter_with_rule(**changes))
    assert error == f"filters.json: {RULE}.{message}"


@pytest.mark.parametrize(
    ("filt", "message"),
    [
        ({}, "TrafficMirrorFilterId: required field missing"),
        (
            {"TrafficMirrorFilterId": "f", "IngressFilterRules": {}},
            "IngressFilterRules: expected a list, got an object",
        ),
        (
            {"TrafficMirrorFilterId": "f", "EgressFilterRules": [3]},
            "EgressFilterRules[0]: expected an object, got 3",
        ),
        (
            {"TrafficMirrorFilterId": "f", "NetworkServices": "amazon-dns"},
            'NetworkServices: expected a list, got "amazon-dns"',
        ),
        (
            {"TrafficMirrorFilterId": "f", "NetworkServices": ["amazon-dns", 1]},
            "NetworkServices[1]: expected a string, got 1",
        ),
        (
            {"TrafficMirrorFilterId": "f", "Tags": [{"Key": None}]},
            "Tags[0].Key: expected a string, got null",
        ),
    ],
)
def test_filter_errors(tmp_path, monkeypatch, filt, message):
    error = error_of(tmp_path, monkeypatch, "filters.json", {"TrafficMirrorFilters": [filt]})
    assert error == f"filters.json: TrafficMirrorFilters[0].{message}"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"Type": "network-interface"}, "TrafficMirrorTargetId: required field missing"),
        ({"TrafficMirrorTargetId": "t", "Type": 7}, "Type: expected a string, got 7"),
        (
            {
                "TrafficMirrorTargetId": "t",
                "Type": "network-load-balancer",
                "NetworkLoadBalancerArn": 5,
            },
            "NetworkLoadBalancerArn: expected a string, got 5",
        ),
    ],
)
def test_target_errors(tmp_path, monkeypatch, target, message):
    error = error_of(tmp_path, monkeypatch, "targets.json", {"TrafficMirrorTargets": [target]})
    assert error == f"targets.json: TrafficMirrorTargets[0].{message}"


# ---------------------------------------------------------------------------------------------
# Files: unreadable, not JSON, too big, too deep


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load(["nope.json"])
    assert str(info.value) == "nope.json: cannot read: No such file or directory"


def test_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load("dir.json")
    assert str(info.value) == "dir.json: cannot read: Is a directory"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{\n  "TrafficMirrorSessions": [,]\n}',
            "invalid JSON at line 2, column 29: Expecting value",
        ),
        ("", "invalid JSON at line 1, column 1: Expecting value"),
        (
            '{"TrafficMirrorSession": {"VirtualNetworkId": 1,}}',
            "invalid JSON at line 1, column 49: Expecting property name enclosed in double quotes",
        ),
    ],
)
def test_json_syntax_errors_give_line_and_column(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    Path("bad.json").write_text(text)
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load("bad.json")
    assert str(info.value) == f"bad.json: {message}"


def test_invalid_utf8(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load("bad.json")
    assert str(info.value) == "bad.json: not UTF-8/16/32 text: invalid start byte at byte 7"


def test_file_over_64_mib_is_rejected_without_reading_it_all(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("huge.json", "wb") as f:
        f.truncate(64 * 1024 * 1024 + 1)  # sparse: costs no disk
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load("huge.json")
    assert str(info.value) == "huge.json: larger than the 64 MiB limit for a sessions file"


def test_size_limit_is_exclusive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = json.dumps(SEED_DOC).encode()
    Path("seed.json").write_bytes(data)
    monkeypatch.setattr(sessions_module, "MAX_FILE_BYTES", len(data))
    assert len(SessionRegistry.load("seed.json")) == 1
    monkeypatch.setattr(sessions_module, "MAX_FILE_BYTES", len(data) - 1)
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load("seed.json")
    assert (
        str(info.value)
        == f"seed.json: larger than the {len(data) - 1} bytes limit for a sessions file"
    )


@pytest.mark.parametrize("depth", [100_000, 1_000_000])
def test_deep_nesting_is_a_sessions_error(tmp_path, monkeypatch, depth):
    monkeypatch.chdir(tmp_path)
    Path("deep.json").write_text(
        '{"TrafficMirrorSession": {"VirtualNetworkId": ' + "[" * depth + "]" * depth + "}}"
    )
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load("deep.json")
    assert str(info.value) == "deep.json: invalid JSON: nested too deeply"


def test_nesting_that_json_accepts_is_reported_without_recursing(tmp_path, monkeypatch):
    doc = {"TrafficMirrorSession": session(VirtualNetworkId=json.loads("[" * 500 + "]" * 500))}
    error = error_of(tmp_path, monkeypatch, "s.json", doc)
    assert error == (
        "s.json: TrafficMirrorSession.VirtualNetworkId: expected an integer 0-16777215, got a list"
    )


def test_integer_with_too_many_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("big.json").write_text(
        '{"TrafficMirrorSession": {"VirtualNetworkId": ' + "9" * 5000 + "}}"
    )
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load("big.json")
    assert str(info.value).startswith("big.json: invalid JSON: Exceeds the limit (4300 digits)")


# ---------------------------------------------------------------------------------------------
# Merging several files


def test_identical_session_in_two_files_is_accepted():
    registry = SessionRegistry.load([SEED_FILE, FIXTURES / "describe-sessions.json"])
    assert len(registry) == 3
    # The first file that lists a session is the one it is said to come from.
    assert registry.lookup(7159709).source == str(SEED_FILE)


def test_identical_session_twice_in_one_file_is_accepted(tmp_path, monkeypatch):
    registry = load_one(tmp_path, monkeypatch, "s.json", {"TrafficMirrorSessions": [SEED, SEED]})
    assert registry.sessions == [SEED_SESSION]


def test_different_sessions_with_one_vni_across_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.json", SEED_DOC)
    other = session(TrafficMirrorSessionId="tms-other")
    write(
        tmp_path,
        "b.json",
        {
            "TrafficMirrorSessions": [
                session(TrafficMirrorSessionId="tms-x", VirtualNetworkId=5),
                other,
            ]
        },
    )
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load(["a.json", "b.json"])
    assert str(info.value) == (
        "VirtualNetworkId 7159709 is used by two different sessions: "
        "tms-08a33b1214EXAMPLE (a.json: TrafficMirrorSession) "
        "and tms-other (b.json: TrafficMirrorSessions[1])"
    )


def test_same_vni_and_id_but_other_fields_differ(tmp_path, monkeypatch):
    doc = {"TrafficMirrorSessions": [SEED, session(Description="changed")]}
    assert error_of(tmp_path, monkeypatch, "s.json", doc) == (
        "VirtualNetworkId 7159709 is used by two different sessions: "
        "tms-08a33b1214EXAMPLE (s.json: TrafficMirrorSessions[0]) "
        "and tms-08a33b1214EXAMPLE (s.json: TrafficMirrorSessions[1])"
    )


def test_same_session_id_under_two_vnis(tmp_path, monkeypatch):
    doc = {"TrafficMirrorSessions": [SEED, session(VirtualNetworkId=9)]}
    assert error_of(tmp_path, monkeypatch, "s.json", doc) == (
        "TrafficMirrorSessionId tms-08a33b1214EXAMPLE is used by two different sessions: "
        "tms-08a33b1214EXAMPLE (s.json: TrafficMirrorSessions[0]) "
        "and tms-08a33b1214EXAMPLE (s.json: TrafficMirrorSessions[1])"
    )


def test_target_described_differently_in_two_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = {
        "TrafficMirrorTargetId": "tmt-1",
        "Type": "network-interface",
        "NetworkInterfaceId": "eni-a",
    }
    write(tmp_path, "t1.json", {"TrafficMirrorTargets": [target]})
    write(tmp_path, "t2.json", {"TrafficMirrorTargets": [dict(target, Description="same thing")]})
    write(tmp_path, "t3.json", {"TrafficMirrorTargets": [dict(target, NetworkInterfaceId="eni-b")]})
    assert len(SessionRegistry.load(["t1.json", "t2.json"])) == 0  # unused fields do not count
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load(["t1.json", "t3.json"])
    assert str(info.value) == (
        "TrafficMirrorTargetId tmt-1 is described differently in "
        "t1.json: TrafficMirrorTargets[0] and in t3.json: TrafficMirrorTargets[0]"
    )


def test_filter_described_differently_in_two_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "f1.json", {"TrafficMirrorFilters": [{"TrafficMirrorFilterId": "tmf-1"}]})
    write(
        tmp_path,
        "f2.json",
        {"TrafficMirrorFilter": {"TrafficMirrorFilterId": "tmf-1", "Description": "x"}},
    )
    with pytest.raises(SessionsError) as info:
        SessionRegistry.load(["f1.json", "f2.json"])
    assert str(info.value) == (
        "TrafficMirrorFilterId tmf-1 is described differently in "
        "f1.json: TrafficMirrorFilters[0] and in f2.json: TrafficMirrorFilter"
    )


# ---------------------------------------------------------------------------------------------
# Immutability and nothing half-loaded


def test_a_bad_file_after_good_ones_loads_nothing(tmp_path):
    before = SessionRegistry.load(all_fixtures())
    bad = write(tmp_path, "bad.json", with_bad_fourth(session(VirtualNetworkId="12")))
    with pytest.raises(SessionsError):
        SessionRegistry.load([*all_fixtures(), bad])
    # The earlier registry is untouched and a fresh load still gives the same result.
    assert before.sessions == SessionRegistry.load(all_fixtures()).sessions
    assert len(before) == 3


def test_a_failing_iterable_of_paths_loads_nothing(tmp_path):
    def paths():
        yield SEED_FILE
        raise SessionsError("stop")

    with pytest.raises(SessionsError, match="^stop$"):
        SessionRegistry.load(paths())


def test_registry_is_immutable():
    registry = SessionRegistry.load(SEED_FILE)
    with pytest.raises(AttributeError):
        registry._by_vni = {}
    with pytest.raises(AttributeError):
        registry.extra = 1
    with pytest.raises(AttributeError):
        del registry._by_vni
    with pytest.raises(TypeError):
        registry.by_vni[1] = SEED_SESSION
    registry.sessions.clear()
    assert len(registry) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        registry.lookup(7159709).vni = 1


def test_values_are_hashable():
    registry = SessionRegistry.load(all_fixtures())
    assert len({*registry}) == 3
    assert hash(registry.lookup(7159709).filter) == hash(WEB_FILTER)


def test_constructor_from_sessions_checks_duplicates():
    registry = SessionRegistry([SEED_SESSION, SEED_SESSION])
    assert registry.sessions == [SEED_SESSION]
    clash = dataclasses.replace(SEED_SESSION, session_id="tms-2", source="b.json")
    with pytest.raises(SessionsError) as info:
        SessionRegistry([dataclasses.replace(SEED_SESSION, source="a.json"), clash])
    assert str(info.value) == (
        "VirtualNetworkId 7159709 is used by two different sessions: "
        "tms-08a33b1214EXAMPLE (a.json) and tms-2 (b.json)"
    )


def test_load_forms_agree():
    one = SessionRegistry.load(SEED_FILE).sessions
    assert SessionRegistry.load(str(SEED_FILE)).sessions == one
    assert load_sessions(SEED_FILE).sessions == one
    assert SessionRegistry.from_documents([("seed.json", SEED_DOC)]).sessions == one
    assert (
        SessionRegistry.from_documents([("seed.json", SEED_DOC)]).lookup(7159709).source
        == "seed.json"
    )
    assert repr(SessionRegistry.load(SEED_FILE)) == "<SessionRegistry: 1 sessions>"


def test_to_json_round_trips_to_dicts():
    registry = SessionRegistry.load(all_fixtures())
    assert json.loads(registry.to_json()) == [s.to_dict() for s in registry]
    assert [d["vni"] for d in json.loads(registry.to_json())] == [100, 200, 7159709]


def test_table_keeps_one_line_per_session(tmp_path, monkeypatch):
    doc = {"TrafficMirrorSession": session(Description="two\nlines\tand tab", PacketLength=None)}
    registry = load_one(tmp_path, monkeypatch, "s.json", doc)
    assert registry.to_table().splitlines()[1].endswith("full  two lines and tab")
    assert len(registry.to_table().splitlines()) == 2


# ---------------------------------------------------------------------------------------------
# Arbitrary input: only SessionsError escapes

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
SESSION_KEYS = st.sampled_from(sorted(SEED))
RULE_KEYS = st.sampled_from(
    ["RuleNumber", "RuleAction", "Protocol", "SourceCidrBlock", "DestinationCidrBlock",
     "SourcePortRange", "DestinationPortRange", "TrafficDirection", "Description"]
)  # fmt: skip


def load_or_sessions_error(doc) -> SessionRegistry | None:
    """Through the bytes path too, as a file would go."""
    parsed = parse_document(json.dumps(doc).encode(), "h.json")
    try:
        return SessionRegistry.from_documents([("h.json", parsed)])
    except SessionsError as e:
        assert "h.json" in str(e)
        return None


@given(json_values)
def test_any_json_value_as_a_session(value):
    load_or_sessions_error({"TrafficMirrorSessions": [value]})


@given(json_values)
def test_any_json_value_as_a_document(value):
    load_or_sessions_error(value)


@given(st.dictionaries(SESSION_KEYS | st.text(max_size=8), json_values | st.just(...), max_size=5))
def test_seed_with_arbitrary_fields(changes):
    registry = load_or_sessions_error({"TrafficMirrorSession": session(**changes)})
    if registry is not None:
        (only,) = registry
        assert 0 <= only.vni <= 16777215 and type(only.vni) is int
        assert only.packet_length is None or 1 <= only.packet_length <= 8500
        assert 1 <= only.session_number <= 32766


@given(st.dictionaries(RULE_KEYS, json_values | st.just(...), max_size=4))
def test_filter_rule_with_arbitrary_fields(changes):
    doc = filter_with_rule(**changes)
    load_or_sessions_error([doc, SEED_DOC])


@given(st.binary(max_size=64))
def test_any_bytes(data):
    try:
        doc = parse_document(data, "b.json")
    except SessionsError as e:
        assert str(e).startswith("b.json: ")
        return
    with contextlib.suppress(SessionsError):
        SessionRegistry.from_documents([("b.json", doc)])
