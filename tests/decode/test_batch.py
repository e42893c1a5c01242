"""The columnar decoder must agree with the reference decoder on every row, field by field,
on the fast path (common AWS shape) and on every row it hands back to the reference."""

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector import build
from collector.decode import REASONS, Malformed, decode_batch, decode_datagram
from tests.decode.test_datagram import ENCAPSULATIONS, frame_specs

# the Packet fields a batch carries (MACs and GWLB ids stay with the reference decoder)
COMPARED = ("encap", "vni", "reserved_bits", "geneve_vni", "captured_len", "ethertype", "l3_offset",
            "ip_version", "ip_header_len", "ip_tos", "ip_ttl", "ip_id", "frag_offset",
            "more_fragments", "ip_proto", "src_addr", "dst_addr", "wire_len", "l4_offset",
            "src_port", "dst_port", "tcp_flags", "icmp_type", "icmp_code", "truncated")


def as_rows(datagrams, width, seed=0):
    # Slots are reused: the bytes past a datagram's length are left from earlier ones, so
    # they are random here and must never show in the result.
    buf = np.random.default_rng(seed).integers(0, 256, (len(datagrams), width), dtype=np.uint8)
    for i, datagram in enumerate(datagrams):
        head = datagram[:width]
        buf[i, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    return buf, np.array([len(d) for d in datagrams])


def reference(datagram, width, port):
    try:
        return decode_datagram(datagram[:width], port, length=len(datagram))
    except Malformed as err:
        return err


def assert_rows_agree(datagrams, width, port):
    buf, lengths = as_rows(datagrams, width)
    batch = decode_batch(buf, lengths, port)
    for i, datagram in enumerate(datagrams):
        want, got = reference(datagram, width, port), batch.packet(i)
        if isinstance(want, Malformed):
            assert isinstance(got, Malformed) and got.reason == want.reason, (i, want, got)
            continue
        assert not isinstance(got, Malformed), (i, got, want)
        for name in COMPARED:
            assert getattr(got, name) == getattr(want, name), (i, name, getattr(got, name), getattr(want, name))
        assert got.vlans == want.vlans[:2]


@st.composite
def datagrams(draw, encaps):
    spec = draw(frame_specs())
    frame = build.mirrored_frame(spec).data
    cut = draw(st.one_of(st.none(), st.integers(1, len(frame))))
    wrap, _ = ENCAPSULATIONS[draw(st.sampled_from(encaps))]
    datagram = bytearray(wrap(frame if cut is None else frame[:cut], draw(st.integers(0, 2**24 - 1))))
    rng = random.Random(draw(st.integers(0, 2**32)))
    for _ in range(draw(st.sampled_from((0, 0, 1, 3)))):
        datagram[rng.randrange(len(datagram))] = rng.randrange(256)
    return bytes(datagram)


@given(batch=st.lists(datagrams(["vxlan"]), min_size=1, max_size=12), width=st.integers(8, 160))
def test_vxlan_rows_agree_with_the_reference(batch, width):
    assert_rows_agree(batch, width, 4789)


@given(batch=st.lists(datagrams(["geneve-vxlan", "geneve"]), min_size=1, max_size=12),
       width=st.integers(8, 200))
def test_geneve_rows_agree_with_the_reference(batch, width):
    assert_rows_agree(batch, width, 6081)


@given(batch=st.lists(datagrams(["vxlan", "geneve-vxlan"]), min_size=1, max_size=8),
       width=st.integers(8, 200), seed=st.integers(0, 2**32))
def test_rows_cut_short_of_their_length_agree_with_the_reference(batch, width, seed):
    """A capture's snaplen leaves fewer bytes than the datagram had: the row's bytes past
    them (here random) must never be read as the datagram's."""
    rng = random.Random(seed)
    present = [rng.randint(0, len(d)) for d in batch]
    buf, lengths = as_rows([d[:p] for d, p in zip(batch, present)], width, seed)
    lengths = np.array([len(d) for d in batch])
    for port in (4789, 6081):
        result = decode_batch(buf, lengths, port, present)
        for i, (datagram, cut) in enumerate(zip(batch, present)):
            try:
                want = decode_datagram(datagram[: min(cut, width)], port, length=len(datagram))
            except Malformed as err:
                want = err
            got = result.packet(i)
            if isinstance(want, Malformed):
                assert isinstance(got, Malformed) and got.reason == want.reason, (i, want, got)
                continue
            assert not isinstance(got, Malformed), (i, got, want)
            for name in COMPARED:
                assert getattr(got, name) == getattr(want, name), (i, port, name)


@given(batch=st.lists(st.binary(max_size=120), min_size=1, max_size=12),
       port=st.sampled_from((4789, 4790, 6081)))
def test_random_rows_agree_with_the_reference(batch, port):
    assert_rows_agree(batch, 128, port)


def test_common_rows_take_the_fast_path(monkeypatch):
    """AWS-shaped rows (whole or cut to 25 bytes) never reach the per-packet decoder."""
    from collector.decode import batch as batch_module

    def refuse(*args, **kwargs):
        raise AssertionError("fast path expected")

    monkeypatch.setattr(batch_module, "_decode_one", refuse)
    frames = [build.mirrored_frame(build.FrameSpec(ip_version=v, proto=p, src=s, dst=d)).data
              for v, s, d in ((4, "10.0.0.1", "10.0.0.2"), (6, "fd00::1", "fd00::2"))
              for p in (build.TCP, build.UDP)]
    rows = [build.vxlan(f, vni=1) for f in frames] + [build.vxlan(f[:25], vni=2) for f in frames]
    assert_rows_agree(rows, 128, 4789)
    assert_rows_agree([build.gwlb_mirror(f, vni=3) for f in frames], 160, 6081)


def test_reason_counts_name_the_reasons():
    rows = [b"\x00" * 16, b"\x08" * 3, build.vxlan(build.mirrored_frame(build.FrameSpec()).data, vni=1)]
    batch = decode_batch(*as_rows(rows, 64))
    assert batch.reason_counts() == {"vxlan_no_vni_flag": 1, "vxlan_truncated": 1}
    assert list(batch.malformed) == [True, True, False]
    assert REASONS[0] is None


def test_input_shape_is_checked():
    with pytest.raises(ValueError, match="2-D uint8"):
        decode_batch(np.zeros(10, dtype=np.uint8), [10])
    with pytest.raises(ValueError, match="3 lengths for 2 rows"):
        decode_batch(np.zeros((2, 10), dtype=np.uint8), [1, 2, 3])
