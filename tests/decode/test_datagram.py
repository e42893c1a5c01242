"""Properties of the whole decoder: at every byte boundary, fields are present exactly when
their bytes are, and no input raises anything but `Malformed`."""

import random

from hypothesis import example, given
from hypothesis import strategies as st

from collector import build
from collector.decode import Malformed, Packet, decode_datagram

PORTS = (4789, 4790, 6081)


@st.composite
def frame_specs(draw):
    version = draw(st.sampled_from((4, 6)))
    proto = draw(st.sampled_from((build.TCP, build.UDP, build.ICMPV6 if version == 6 else build.ICMP)))
    return build.FrameSpec(
        ip_version=version,
        proto=proto,
        src=str(draw(st.ip_addresses(v=version))),
        dst=str(draw(st.ip_addresses(v=version))),
        sport=draw(st.integers(0, 65535)),
        dport=draw(st.integers(0, 65535)),
        tcp_flags=draw(st.integers(0, 0x1FF)),
        icmp_type=draw(st.integers(0, 255)),
        icmp_code=draw(st.integers(0, 255)),
        vlans=tuple(draw(st.lists(st.integers(0, 4095), max_size=2))),
        ttl=draw(st.integers(0, 255)),
        ident=draw(st.integers(0, 65535)),
        payload=draw(st.binary(max_size=40)),
    )


# each mirror encapsulation: (wrap a mirrored frame, UDP port, encap name)
ENCAPSULATIONS = {
    "vxlan": (lambda frame, vni: build.vxlan(frame, vni=vni), 4789),
    "geneve-vxlan": (lambda frame, vni: build.gwlb_mirror(frame, vni=vni), 6081),
    "geneve": (lambda frame, vni: build.geneve(frame, vni=vni, protocol=0x6558), 6081),
}


def _complete_tags(vlans, captured):
    return tuple(v for i, v in enumerate(vlans) if captured >= 12 + 4 * (i + 1))


@given(spec=frame_specs(), encap=st.sampled_from(sorted(ENCAPSULATIONS)), vni=st.integers(0, 2**24 - 1))
def test_every_field_is_present_exactly_when_its_bytes_are(spec, encap, vni):
    frame = build.mirrored_frame(spec)
    wrap, port = ENCAPSULATIONS[encap]
    for captured in range(len(frame.data) + 1):
        pkt = decode_datagram(wrap(frame.data[:captured], vni), port)
        assert (pkt.encap, pkt.vni, pkt.captured_len) == (encap, vni, captured)
        assert pkt.truncated == (captured < len(frame.data)), captured
        assert pkt.vlans == _complete_tags(spec.vlans, captured), captured
        for name, (value, needed) in frame.fields.items():
            expected = value if captured >= needed else None
            assert getattr(pkt, name) == expected, (name, captured, needed)


@given(spec=frame_specs(), slot=st.integers(0, 200))
def test_a_prefix_buffer_decodes_like_the_cut_copy_but_keeps_the_real_length(spec, slot):
    frame = build.mirrored_frame(spec)
    datagram = build.vxlan(frame.data, vni=5)
    prefix = decode_datagram(datagram[: max(8, slot)], length=len(datagram))
    whole = decode_datagram(datagram)
    assert (prefix.captured_len, prefix.truncated) == (whole.captured_len, False)
    assert prefix.wire_len in (None, whole.wire_len)


@given(payload=st.binary(max_size=300), port=st.sampled_from(PORTS))
@example(payload=b"\x08\0\0\0\0\0\1\0" + b"\x81\x00" * 40, port=4789)
def test_random_bytes_decode_or_raise_malformed_only(payload, port):
    try:
        pkt = decode_datagram(payload, port)
    except Malformed as err:
        assert 0 <= err.offset <= len(payload)
        return
    assert isinstance(pkt, Packet)
    assert 0 <= pkt.captured_len <= len(payload)


@given(spec=frame_specs(), encap=st.sampled_from(sorted(ENCAPSULATIONS)), seed=st.integers(0, 2**32))
def test_mutated_valid_datagrams_decode_or_raise_malformed_only(spec, encap, seed):
    wrap, port = ENCAPSULATIONS[encap]
    datagram = bytearray(wrap(build.mirrored_frame(spec).data, 7))
    rng = random.Random(seed)
    for _ in range(rng.randint(1, 6)):
        datagram[rng.randrange(len(datagram))] = rng.randrange(256)
    cut = rng.randint(0, len(datagram))
    try:
        pkt = decode_datagram(bytes(datagram[:cut]), port)
    except Malformed:
        return
    assert pkt.captured_len <= cut
