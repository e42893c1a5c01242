"""Property tests over the datagram decoders with hostile input: every kind fuzz/hostile.py
makes (wrong flags, cut headers, lying lengths, nested tunnels, IPv4 options, IPv6 extension
chains, zero-length, jumbo), random bytes, and valid datagrams mutated byte by byte. The
checks are fuzz/oracles.py's, the ones the coverage-guided fuzzer runs: decode_datagram
raises Malformed and nothing else and returns fields in range; decode_batch agrees with it
row for row; the compiled decoder equals the reference column for column.

`HYPOTHESIS_PROFILE=deep` (tests/conftest.py) runs 5000 examples per property instead of 150.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.flows import fast
from fuzz import hostile
from fuzz.oracles import check_batch, check_datagram, check_fastflow

PORT_BYTE = {"vxlan": 0, "geneve": 2}


@st.composite
def hostile_datagrams(draw, kinds=tuple(hostile.KINDS)):
    kind = draw(st.sampled_from(kinds))
    payload, listener = hostile.KINDS[kind](random.Random(draw(st.integers(0, 2**32))))
    return payload, listener


@st.composite
def mutated(draw):
    """A valid AWS datagram with a few bytes replaced, inserted or removed."""
    payload, listener = hostile.valid(random.Random(draw(st.integers(0, 2**32))))
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(("replace", "insert", "delete")))
        value = draw(st.integers(0, 255))
        if action == "replace" and at < len(data):
            data[at] = value
        elif action == "insert":
            data.insert(at, value)
        elif at < len(data):
            del data[at]
    return bytes(data), listener


def as_input(payload: bytes, listener: str, slot: int = 0) -> bytes:
    return bytes([PORT_BYTE[listener], slot]) + payload


@given(hostile_datagrams(), st.integers(0, 255))
def test_hostile_kinds_decode_or_are_malformed(datagram, slot):
    check_datagram(as_input(*datagram, slot))


@given(mutated(), st.integers(0, 255))
def test_mutated_valid_datagrams_decode_or_are_malformed(datagram, slot):
    check_datagram(as_input(*datagram, slot))


@given(st.binary(max_size=400))
def test_random_bytes_decode_or_are_malformed(data):
    check_datagram(data)


def batch_input(port_byte: int, width: int, rows) -> bytes:
    out = bytearray([port_byte, width])
    for payload, cut in rows:
        payload = payload[:255]
        out += bytes([len(payload), cut]) + payload
    return bytes(out)


@st.composite
def hostile_batches(draw):
    listener = draw(st.sampled_from(("vxlan", "geneve")))
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        payload, row_listener = draw(st.one_of(hostile_datagrams(), mutated()))
        rows.append((payload, draw(st.sampled_from((255, draw(st.integers(0, 255)))))))
    return batch_input(PORT_BYTE[listener], draw(st.integers(0, 255)), rows)


@given(hostile_batches())
def test_batch_agrees_with_the_reference_on_hostile_rows(data):
    check_batch(data)


@pytest.mark.skipif(not fast.available(), reason="collector._fastflow not built")
@given(hostile_batches())
def test_compiled_decode_equals_the_reference_on_hostile_rows(data):
    check_fastflow(data)


@pytest.mark.skipif(not fast.available(), reason="collector._fastflow not built")
@given(st.binary(min_size=4, max_size=600))
def test_compiled_decode_equals_the_reference_on_random_rows(data):
    check_fastflow(data)


def test_every_hostile_kind_is_reached():
    """The generators make what they say: each kind at least once decodes or is malformed,
    the zero-length one is empty, the jumbo one is past 9000 bytes."""
    rng = random.Random(0)
    for kind, make in hostile.KINDS.items():
        payload, listener = make(rng)
        check_datagram(as_input(payload, listener))
    assert hostile.zero_length(rng)[0] == b""
    assert max(len(hostile.jumbo(random.Random(seed))[0]) for seed in range(10)) > 9000
