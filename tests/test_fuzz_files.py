"""Property tests over the capture readers and the sessions/config loaders with hostile
files: valid captures (the fixtures, a pcapng with every block kind) and sessions files
mutated byte by byte, cut anywhere, or random. Checks from fuzz/oracles.py: read_capture
yields well-formed records then ends or raises CaptureError at an offset inside the file;
the compiled capture walker hands ingest exactly what the Python walk does; the sessions
loader returns a registry or SessionsError naming the file."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz import seeds
from fuzz.oracles import TARGETS, check_capture, check_sessions

CAPTURES = list(seeds.capture_seeds())
SESSIONS = list(seeds.sessions_seeds())


@st.composite
def mutated(draw, originals):
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(("replace", "replace", "insert", "delete", "cut", "word")))
        if not data:
            break
        if action == "replace":
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif action == "cut":
            del data[at:]
        else:  # a 32-bit length field set to an extreme
            data[at : at + 4] = draw(st.sampled_from((b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                                     b"\xfc\xff\xff\x7f", b"\x0c\x00\x00\x00")))
    return bytes(data)


@given(mutated(CAPTURES))
def test_mutated_captures_read_or_fail_cleanly(data):
    check_capture(data)


@given(st.binary(max_size=300))
def test_random_bytes_as_a_capture(data):
    check_capture(data)


@pytest.mark.skipif("fastcapture" not in TARGETS, reason="collector._fastcapture not built")
@given(mutated(CAPTURES))
def test_compiled_walk_equals_the_reference_on_mutated_captures(data):
    TARGETS["fastcapture"](data)


@given(mutated(SESSIONS))
def test_mutated_sessions_files_load_or_fail_cleanly(data):
    check_sessions(data)
