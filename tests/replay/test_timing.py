"""The send schedule and the bounds, with explicit times: nothing sleeps."""

from __future__ import annotations

import itertools

import pytest

from collector.replay.timing import Bounds, Pace, Schedule, wire_bytes

MS = 1_000_000  # ns


def dues(pace: Pace, records, new_input_at=()) -> list[float]:
    """Send times of (timestamp ns, wire bytes) records; `new_input_at`: indexes that start a
    file."""
    schedule = Schedule(pace)
    out = []
    for i, (ts, size) in enumerate(records):
        if i == 0 or i in new_input_at:
            schedule.new_input()
        out.append(schedule.due(ts, size))
    return out


T0 = 1_767_225_600 * 1_000_000_000


def test_default_pace_is_the_capture_timing():
    assert Pace().multiplier == 1.0
    assert dues(Pace(), [(T0, 100), (T0 + 1 * MS, 100), (T0 + 3 * MS, 100)]) == pytest.approx(
        [0.0, 0.001, 0.003])


def test_multiplier_scales_the_gaps():
    records = [(T0, 60), (T0 + 10 * MS, 60), (T0 + 30 * MS, 60)]
    assert dues(Pace(multiplier=2.0), records) == pytest.approx([0.0, 0.005, 0.015])
    assert dues(Pace(multiplier=0.5), records) == pytest.approx([0.0, 0.02, 0.06])


def test_a_record_older_than_the_one_before_goes_right_after_it():
    records = [(T0, 60), (T0 + 10 * MS, 60), (T0 + 4 * MS, 60), (T0 + 6 * MS, 60)]
    assert dues(Pace(), records) == pytest.approx([0.0, 0.010, 0.010, 0.012])


def test_a_new_file_or_loop_starts_right_after_the_last_packet():
    # the second file was captured an hour later, and the third pass starts over
    first = [(T0, 60), (T0 + 5 * MS, 60)]
    second = [(T0 + 3600 * 10**9, 60), (T0 + 3600 * 10**9 + 2 * MS, 60)]
    got = dues(Pace(), first + second + first, new_input_at=(2, 4))
    assert got == pytest.approx([0.0, 0.005, 0.005, 0.007, 0.007, 0.012])


def test_pps_spaces_packets_evenly_whatever_the_timestamps():
    records = [(T0 + i * 7 * MS, 1000) for i in range(5)]
    assert dues(Pace(pps=4), records) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_mbps_counts_the_wire_bits_before_each_datagram():
    # 125 bytes = 1000 bits: at 1 Mbps, 1 ms each; a 250-byte one takes 2 ms
    records = [(T0, 125), (T0, 250), (T0, 125), (T0, 125)]
    assert dues(Pace(mbps=1), records) == pytest.approx([0.0, 0.001, 0.003, 0.004])


def test_topspeed_is_always_due():
    records = [(T0 + i * 1000 * MS, 100) for i in range(3)]
    assert dues(Pace(topspeed=True), records) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"multiplier": 2.0, "pps": 10}, "choose one pace, not multiplier and pps"),
    ({"mbps": 1, "topspeed": True}, "not mbps and topspeed"),
    ({"multiplier": 0}, "multiplier must be more than 0"),
    ({"pps": -1}, "pps must be more than 0"),
])
def test_pace_options_are_exclusive_and_positive(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Pace(**kwargs)


def test_pace_describes_itself():
    assert [Pace().describe(), Pace(pps=5).describe(), Pace(mbps=2.5).describe(),
            Pace(topspeed=True).describe()] == [
        "capture timing x1", "5 packets/s", "2.5 Mbps", "top speed"]


def test_wire_bytes_are_ethernet_ip_udp_and_payload():
    assert wire_bytes(100) == 14 + 20 + 8 + 100
    assert wire_bytes(100, ipv6=True) == 14 + 40 + 8 + 100


# -- bounds -----------------------------------------------------------------------------------


def test_loop_sends_the_input_n_times():
    assert list(Bounds(loop=3).passes()) == [0, 1, 2]
    assert list(Bounds().passes()) == [0]


def test_loop_zero_is_forever_and_needs_a_limit_or_a_duration():
    with pytest.raises(ValueError, match="loop 0 .forever. needs a limit or a duration"):
        Bounds(loop=0)
    endless = Bounds(loop=0, limit=10).passes()
    assert list(itertools.islice(endless, 1000)) == list(range(1000))
    Bounds(loop=0, duration=1.5)


@pytest.mark.parametrize("kwargs", [{"loop": -1}, {"limit": 0}, {"duration": 0},
                                    {"duration": -2.0}, {"loop": 1.5}])
def test_bounds_refuse_nonsense(kwargs):
    with pytest.raises(ValueError):
        Bounds(**kwargs)


def test_limit_counts_datagrams_and_duration_seconds():
    bounds = Bounds(loop=0, limit=3, duration=2.0)
    assert not bounds.reached(2, 1.99)
    assert bounds.reached(3, 0.0)
    assert bounds.reached(0, 2.0)
    assert Bounds().reached(10**9, 10**9) is False  # unbounded: the input's end stops it


def test_a_datagram_due_after_the_duration_stops_the_replay_without_waiting():
    bounds = Bounds(duration=0.5)
    assert not bounds.beyond(0.499)
    assert bounds.beyond(0.5)
    assert not Bounds().beyond(1e9)
