import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.flows import icmp_ports
from collector.flows.community_id import community_id

communityid = pytest.importorskip("communityid")
ORACLE = communityid.CommunityID()


def test_spec_example():
    src, dst = ipaddress.ip_address("128.232.110.120").packed, ipaddress.ip_address("66.35.250.204").packed
    assert community_id(6, src, dst, 34855, 80) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    assert community_id(6, dst, src, 80, 34855) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="


def test_unknown_parts_give_none():
    assert community_id(6, None, b"\0" * 4, 1, 2) is None
    assert community_id(6, b"\1" * 4, b"\0" * 4, None, 2) is None
    assert community_id(None, b"\1" * 4, b"\0" * 4, 1, 2) is None


@given(version=st.sampled_from((4, 6)), proto=st.sampled_from((1, 6, 17, 58, 132, 47, 50)),
       data=st.data())
def test_agrees_with_the_reference_implementation(version, proto, data):
    src = data.draw(st.ip_addresses(v=version)).packed
    dst = data.draw(st.ip_addresses(v=version)).packed
    if proto in (1, 58):
        mtype, mcode = data.draw(st.integers(0, 255)), data.draw(st.integers(0, 255))
        make = communityid.FlowTuple.make_icmp6 if proto == 58 else communityid.FlowTuple.make_icmp
        tpl = make(src, dst, mtype, mcode)
        # the flow table's port convention: (type, counterpart) or (type, code)
        sport, dport = icmp_ports(6 if proto == 58 else 4, mtype, mcode)
        assert community_id(proto, src, dst, sport, dport) == ORACLE.calc(tpl)
    elif proto in (6, 17, 132):
        sport, dport = data.draw(st.integers(0, 65535)), data.draw(st.integers(0, 65535))
        tpl = communityid.FlowTuple(proto, src, dst, sport, dport)
        assert community_id(proto, src, dst, sport, dport) == ORACLE.calc(tpl)
    else:
        assert community_id(proto, src, dst, None, None) == ORACLE.calc(communityid.FlowTuple(proto, src, dst))
