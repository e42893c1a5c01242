"""Traffic Mirror filter semantics, on hand-made packets with hand-computed verdicts."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from collector import build
from collector.replay.encap import Flow, flow_of
from collector.replay.filter import FilterEvaluator, load_filter, parse_sources
from collector.sessions import filters_of
from collector.sessions import MirrorFilter, SessionsError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FILTERS = FIXTURES / "sessions" / "describe-filters.json"
ENI = "10.0.1.10"
TCP, UDP, ICMP = 6, 17, 1


def rule(number, action="accept", protocol=None, src="0.0.0.0/0", dst="0.0.0.0/0", sports=None,
         dports=None, **extra):
    obj = {"RuleNumber": number, "RuleAction": action, "SourceCidrBlock": src,
           "DestinationCidrBlock": dst, **extra}
    if protocol is not None:
        obj["Protocol"] = protocol
    if sports:
        obj["SourcePortRange"] = {"FromPort": sports[0], "ToPort": sports[1]}
    if dports:
        obj["DestinationPortRange"] = {"FromPort": dports[0], "ToPort": dports[1]}
    return obj


def make_filter(tmp_path, ingress=(), egress=(), services=()) -> MirrorFilter:
    doc = {"TrafficMirrorFilters": [{"TrafficMirrorFilterId": "tmf-1", "IngressFilterRules":
                                     list(ingress), "EgressFilterRules": list(egress),
                                     "NetworkServices": list(services)}]}
    path = tmp_path / "filters.json"
    path.write_text(json.dumps(doc))
    return load_filter(path)


def packet(src, dst, proto=TCP, sport=40000, dport=443, icmp=None) -> Flow:
    return Flow(0x86DD if ":" in src else 0x0800, proto, ipaddress.ip_address(src).packed,
                ipaddress.ip_address(dst).packed,
                sport if proto in (TCP, UDP) else None, dport if proto in (TCP, UDP) else None,
                icmp)


def evaluate(mirror_filter, flow, sources=(ENI,), **kw):
    return FilterEvaluator(mirror_filter, sources, **kw).verdict(flow)


def summary(verdict) -> tuple:
    number = None if verdict.rule is None else verdict.rule.rule_number
    return verdict.mirrored, verdict.reason, verdict.direction, number


# -- AWS's rules ------------------------------------------------------------------------------


def test_no_rules_mirror_nothing(tmp_path):
    empty = make_filter(tmp_path)
    assert summary(evaluate(empty, packet(ENI, "10.0.3.30"))) == (False, "no match", "egress", None)
    assert summary(evaluate(empty, packet("10.0.3.30", ENI))) == (False, "no match", "ingress",
                                                                  None)


def test_direction_is_egress_from_the_eni_ingress_to_it_else_not_its_traffic(tmp_path):
    f = make_filter(tmp_path, ingress=[rule(1)], egress=[rule(1, "reject")])
    assert summary(evaluate(f, packet(ENI, "10.0.3.30"))) == (False, "rule", "egress", 1)
    assert summary(evaluate(f, packet("10.0.3.30", ENI))) == (True, "rule", "ingress", 1)
    assert summary(evaluate(f, packet("10.0.3.30", "10.0.3.31"))) == (
        False, "not the source's traffic", None, None)


def test_rules_are_tried_lowest_number_first_whatever_the_file_order(tmp_path):
    # 300 accepts everything; 100 rejects TCP to 443; 200 accepts TCP to 443 (never reached)
    f = make_filter(tmp_path, egress=[rule(300), rule(200, protocol=TCP, dports=(443, 443)),
                                      rule(100, "reject", protocol=TCP, dports=(443, 443))])
    assert [r.rule_number for r in f.egress] == [100, 200, 300]
    assert summary(evaluate(f, packet(ENI, "10.0.3.30", dport=443))) == (False, "rule", "egress",
                                                                        100)
    assert summary(evaluate(f, packet(ENI, "10.0.3.30", dport=80))) == (True, "rule", "egress",
                                                                       300)


def test_a_reject_before_an_accept_wins_and_an_accept_before_a_reject_wins(tmp_path):
    reject_first = make_filter(tmp_path, ingress=[rule(10, "reject", src="10.0.3.0/24"),
                                                  rule(20, "accept")])
    assert not evaluate(reject_first, packet("10.0.3.30", ENI)).mirrored
    assert evaluate(reject_first, packet("10.0.4.30", ENI)).mirrored
    accept_first = make_filter(tmp_path, ingress=[rule(10, "accept", src="10.0.3.0/24"),
                                                  rule(20, "reject")])
    assert evaluate(accept_first, packet("10.0.3.30", ENI)).mirrored
    assert summary(evaluate(accept_first, packet("10.0.4.30", ENI))) == (False, "rule", "ingress",
                                                                        20)


@pytest.mark.parametrize("dst, mirrored", [
    ("10.0.3.0", True), ("10.0.3.255", True), ("10.0.2.255", False), ("10.0.4.0", False),
])
def test_cidr_blocks_hold_their_addresses_and_no_others(tmp_path, dst, mirrored):
    f = make_filter(tmp_path, egress=[rule(1, dst="10.0.3.0/24")])
    assert evaluate(f, packet(ENI, dst)).mirrored is mirrored


def test_a_cidr_written_with_host_bits_means_its_block(tmp_path):
    f = make_filter(tmp_path, egress=[rule(1, dst="10.0.3.77/24")])
    assert evaluate(f, packet(ENI, "10.0.3.1")).mirrored


def test_an_ipv4_rule_never_matches_ipv6_and_the_reverse(tmp_path):
    f = make_filter(tmp_path, egress=[rule(1, src="0.0.0.0/0", dst="0.0.0.0/0"),
                                      rule(2, "accept", src="::/0", dst="::/0", protocol=UDP)])
    sources = (ENI, "2001:db8:1::a")
    v6 = packet("2001:db8:1::a", "2001:db8:3::1e")
    assert summary(evaluate(f, v6, sources)) == (False, "no match", "egress", None)
    assert summary(evaluate(f, packet("2001:db8:1::a", "2001:db8:3::1e", UDP), sources)) == (
        True, "rule", "egress", 2)
    assert summary(evaluate(f, packet(ENI, "10.0.3.30"), sources))[3] == 1


@pytest.mark.parametrize("dport, mirrored", [(79, False), (80, True), (100, True), (443, True),
                                             (444, False)])
def test_port_ranges_are_inclusive(tmp_path, dport, mirrored):
    f = make_filter(tmp_path, egress=[rule(1, protocol=TCP, dports=(80, 443))])
    assert evaluate(f, packet(ENI, "10.0.3.30", dport=dport)).mirrored is mirrored


def test_source_and_destination_port_ranges_both_must_hold(tmp_path):
    f = make_filter(tmp_path, egress=[rule(1, protocol=UDP, sports=(1024, 65535), dports=(53, 53))])
    assert evaluate(f, packet(ENI, "10.0.0.2", UDP, 53001, 53)).mirrored
    assert not evaluate(f, packet(ENI, "10.0.0.2", UDP, 1023, 53)).mirrored
    assert not evaluate(f, packet(ENI, "10.0.0.2", UDP, 53001, 54)).mirrored


def test_a_rule_with_ports_matches_only_tcp_and_udp(tmp_path):
    # all protocols, but a destination port range: ICMP and GRE never match it
    f = make_filter(tmp_path, egress=[rule(1, dports=(0, 65535))])
    assert evaluate(f, packet(ENI, "10.0.3.30", TCP)).mirrored
    assert evaluate(f, packet(ENI, "10.0.3.30", UDP)).mirrored
    assert not evaluate(f, packet(ENI, "10.0.3.30", ICMP, icmp=0x0800)).mirrored
    assert not evaluate(f, packet(ENI, "10.0.3.30", 47)).mirrored
    # a non-first fragment has no ports: it cannot match a port range either
    fragment = build.ethernet(build.ipv4(b"x" * 16, src=ENI, dst="10.0.3.30", proto=UDP,
                                         frag_offset=64))
    assert not evaluate(f, flow_of(fragment)).mirrored


def test_a_protocol_rule_matches_only_that_protocol(tmp_path):
    f = make_filter(tmp_path, ingress=[rule(1, protocol=ICMP)])
    assert evaluate(f, packet("10.0.3.30", ENI, ICMP, icmp=0)).mirrored
    assert not evaluate(f, packet("10.0.3.30", ENI, TCP)).mirrored


def test_protocol_minus_one_means_all(tmp_path):
    f = make_filter(tmp_path, ingress=[rule(1, protocol=-1)])
    assert f.ingress[0].protocol is None
    assert evaluate(f, packet("10.0.3.30", ENI, 47)).mirrored


def test_source_cidr_covers_every_address_of_the_eni(tmp_path):
    f = make_filter(tmp_path, egress=[rule(1)])
    evaluator = FilterEvaluator(f, parse_sources(cidrs=["10.0.1.0/28"]))
    assert evaluator.verdict(packet("10.0.1.15", "10.0.3.30")).direction == "egress"
    assert evaluator.verdict(packet("10.0.3.30", "10.0.1.3")).direction == "ingress"
    assert evaluator.verdict(packet("10.0.1.16", "10.0.3.30")).reason == "not the source's traffic"


# -- never mirrored -------------------------------------------------------------------------


def test_non_ip_frames_are_never_mirrored(tmp_path):
    f = make_filter(tmp_path, egress=[rule(1)], ingress=[rule(1)])
    arp = flow_of(build.ethernet(b"\x00" * 28, ethertype=build.ETH_ARP))
    assert summary(evaluate(f, arp)) == (False, "never mirrored: not IP (ARP, ...)", None, None)
    assert not evaluate(f, None).mirrored


@pytest.mark.parametrize("flow, what", [
    (packet(ENI, "169.254.169.254", dport=80), "instance metadata"),
    (packet(ENI, "169.254.169.123", UDP, 40000, 123), "Amazon Time Sync"),
    (packet("169.254.169.250", ENI, sport=1688), "Windows activation"),
    (packet(ENI, "10.0.0.1", UDP, 68, 67), "DHCP"),
])
def test_aws_services_are_never_mirrored_whatever_the_rules(tmp_path, flow, what):
    f = make_filter(tmp_path, egress=[rule(1)], ingress=[rule(1)])
    assert summary(evaluate(f, flow)) == (False, f"never mirrored: {what}", None, None)


def test_amazon_dns_is_mirrored_only_with_the_network_service(tmp_path):
    query = packet(ENI, "169.254.169.253", UDP, 53001, 53)
    resolver = packet(ENI, "10.0.0.2", UDP, 53001, 53)
    plain = make_filter(tmp_path, egress=[rule(1)])
    assert evaluate(plain, query).reason.startswith("never mirrored: Amazon DNS")
    assert evaluate(plain, resolver).mirrored  # 10.0.0.2 is not known to be the resolver ...
    assert not evaluate(plain, resolver, amazon_dns=["10.0.0.2"]).mirrored  # ... unless told
    with_dns = make_filter(tmp_path, egress=[rule(1)], services=["amazon-dns"])
    assert evaluate(with_dns, query).mirrored
    assert evaluate(with_dns, resolver, amazon_dns=["10.0.0.2"]).mirrored


# -- counting and the table ---------------------------------------------------------------------


def test_tally_counts_per_rule_and_the_table_lists_every_rule(tmp_path):
    f = make_filter(tmp_path, ingress=[rule(100, "reject", protocol=UDP, Description="no UDP"),
                                       rule(200, dst="10.0.1.0/24")],
                    egress=[rule(100, protocol=TCP)])
    evaluator = FilterEvaluator(f, [ENI])
    flows = [packet("10.0.3.30", ENI, UDP)] * 2 + [packet("10.0.3.30", ENI)] * 3 + [
        packet(ENI, "10.0.3.30")] + [packet(ENI, "10.0.3.30", UDP)] * 4 + [
        packet("10.0.9.9", "10.0.9.8")] + [flow_of(build.ethernet(bytes(28), ethertype=0x0806))]
    mirrored = [evaluator.tally(flow).mirrored for flow in flows]
    assert sum(mirrored) == 4
    assert evaluator.rows() == [
        ("ingress", "100", "reject", 2, "no UDP"),
        ("ingress", "200", "accept", 3, ""),
        ("ingress", "-", "no match", 0, "not mirrored"),
        ("egress", "100", "accept", 1, ""),
        ("egress", "-", "no match", 4, "not mirrored"),
        ("-", "-", "never mirrored: not IP (ARP, ...)", 1, "not mirrored"),
        ("-", "-", "not the source's traffic", 1, "not mirrored"),
    ]
    assert evaluator.table().splitlines()[-1] == "4 of 12 packets mirrored by filter tmf-1"


def test_a_filter_needs_the_enis_address(tmp_path):
    with pytest.raises(ValueError, match="the mirrored ENI's address"):
        FilterEvaluator(make_filter(tmp_path), [])


# -- reading filter files ---------------------------------------------------------------------


def test_the_fixture_file_holds_two_filters_and_one_must_be_chosen():
    with pytest.raises(SessionsError, match=r"describe-filters.json: holds 2 filters "
                       r"\(tmf-04812ff784EXAMPLE, tmf-0293f26e86EXAMPLE\): choose one by its id"):
        load_filter(FILTERS)
    web = load_filter(FILTERS, "tmf-04812ff784EXAMPLE")
    assert [r.rule_number for r in web.ingress] == [100, 200]
    assert web.network_services == ("amazon-dns",)
    empty = load_filter(FILTERS, "tmf-0293f26e86EXAMPLE")
    assert empty.ingress == empty.egress == ()
    with pytest.raises(SessionsError, match="no filter tmf-nope"):
        load_filter(FILTERS, "tmf-nope")


def test_a_create_filter_output_and_a_file_with_sessions_too_load(tmp_path):
    path = tmp_path / "created.json"
    path.write_text(json.dumps({"TrafficMirrorFilter": {"TrafficMirrorFilterId": "tmf-9",
                                                        "EgressFilterRules": [rule(5)]},
                                "ClientToken": "x"}))
    assert load_filter(path).egress[0].rule_number == 5
    # a file that also holds a session: only its filters matter
    session = json.loads((FIXTURES / "sessions" / "seed.json").read_text())["TrafficMirrorSession"]
    session["VirtualNetworkId"] = 0
    both = tmp_path / "both.json"
    both.write_text(json.dumps([{"TrafficMirrorSessions": [session]},
                                {"TrafficMirrorFilters": [{"TrafficMirrorFilterId": "tmf-3"}]}]))
    assert list(filters_of([("both.json", json.loads(both.read_text()))])) == ["tmf-3"]
    assert load_filter(both).filter_id == "tmf-3"


def test_filter_file_errors_name_the_file_path_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"TrafficMirrorFilters": [{
        "TrafficMirrorFilterId": "tmf-1", "IngressFilterRules": [rule(1, src="10.0.0.0/33")]}]}))
    with pytest.raises(SessionsError, match=r"bad.json: TrafficMirrorFilters\[0\]"
                       r"\.IngressFilterRules\[0\]\.SourceCidrBlock: expected a CIDR block"):
        load_filter(bad)
    sessions_only = FIXTURES / "sessions" / "describe-sessions.json"
    with pytest.raises(SessionsError, match="describe-sessions.json: no TrafficMirrorFilters"):
        load_filter(sessions_only)


def test_parse_sources_takes_addresses_and_blocks():
    assert [str(n) for n in parse_sources(["10.0.1.10", "2001:db8::1"], ["10.0.1.0/24"])] == [
        "10.0.1.10/32", "2001:db8::1/128", "10.0.1.0/24"]
    with pytest.raises(ValueError, match="source IP '10.0.1.0/24' is not an IPv4 or IPv6"):
        parse_sources(["10.0.1.0/24"])
    with pytest.raises(ValueError, match="source CIDR 'ten' is not a CIDR block"):
        parse_sources(cidrs=["ten"])
