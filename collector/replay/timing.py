"""When each datagram goes out, and when a replay stops (sans-I/O).

tcpreplay's pacing options, with its semantics (PEERS.md, "Replay"):

- ``multiplier`` X (``-x``, default 1.0): the capture's own timing, X times faster. The gaps
  between consecutive records are scaled; a record older than the one before it (captures
  are not always in order) goes out right after it, and so does the first record of each
  input file and of each loop: the wait between two files' timestamps is not replayed.
- ``pps`` N (``-p``): N datagrams a second, evenly spaced.
- ``mbps`` N (``-M``): N megabits a second of datagrams on the wire, counted as tcpreplay
  counts a pre-encapsulated capture's frames: Ethernet, IP, UDP and payload
  (`wire_bytes`).
- ``topspeed`` (``-t``): as fast as the sockets take them.

Bounds: ``loop`` N (``-l``) sends the input N times, 0 = forever, which needs ``limit`` or
``duration`` to end; ``limit`` N (``-L``) stops after N datagrams; ``duration`` S stops after S
seconds.

`Schedule.due` returns each datagram's send time in seconds after the replay started; the
caller compares it with its own clock. Nothing here reads a clock or sleeps.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Bounds", "Pace", "Schedule", "wire_bytes"]

NS_PER_S = 1_000_000_000
ETHERNET_HEADER = 14
UDP_HEADER = 8


def wire_bytes(payload_len: int, ipv6: bool = False) -> int:
    """Bytes of one datagram on the wire: Ethernet + IPv4/IPv6 + UDP headers + payload (no FCS,
    preamble or gap, as tcpreplay counts a capture's frames)."""
    return ETHERNET_HEADER + (40 if ipv6 else 20) + UDP_HEADER + payload_len


@dataclass(frozen=True)
class Pace:
    """How fast: exactly one of `multiplier`, `pps`, `mbps`, `topspeed`."""

    multiplier: float | None = None
    pps: float | None = None
    mbps: float | None = None
    topspeed: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("multiplier", "pps", "mbps") if getattr(self, name) is not None]
        if self.topspeed:
            given.append("topspeed")
        if len(given) > 1:
            raise ValueError(f"choose one pace, not {' and '.join(given)}")
        for name in ("multiplier", "pps", "mbps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be more than 0, got {value}")
        if not given:
            object.__setattr__(self, "multiplier", 1.0)  # the capture's own timing

    def describe(self) -> str:
        if self.topspeed:
            return "top speed"
        if self.pps is not None:
            return f"{self.pps:g} packets/s"
        if self.mbps is not None:
            return f"{self.mbps:g} Mbps"
        return f"capture timing x{self.multiplier:g}"


class Schedule:
    """The send time of each datagram, in seconds after the start, in sending order.

    Call `new_input()` when a file (or a loop over the files) starts, then `due()` once per
    datagram, in order.
    """

    def __init__(self, pace: Pace) -> None:
        self.pace = pace
        self._sent = 0  # datagrams scheduled so far
        self._bits = 0  # their wire bits
        self._last_due = 0.0
        self._anchor: tuple[int, float] | None = None  # (capture ns, due) timing is relative to
        self._last_ts: int | None = None

    def new_input(self) -> None:
        """The next record starts a file: it goes right after the previous datagram."""
        self._anchor = None

    def due(self, timestamp_ns: int, size: int) -> float:
        """Seconds after the start at which the datagram of a record captured at
        `timestamp_ns` (ns), of `size` wire bytes, is to be sent."""
        pace = self.pace
        if pace.topspeed:
            due = 0.0
        elif pace.pps is not None:
            due = self._sent / pace.pps
        elif pace.mbps is not None:
            due = self._bits / (pace.mbps * 1e6)  # when the bits before it have gone
        else:
            if self._anchor is None or timestamp_ns < self._last_ts:
                self._anchor = (timestamp_ns, self._last_due)
            anchor_ts, anchor_due = self._anchor
            due = anchor_due + (timestamp_ns - anchor_ts) / NS_PER_S / pace.multiplier
            self._last_ts = timestamp_ns
        self._sent += 1
        self._bits += size * 8
        self._last_due = due
        return due


@dataclass(frozen=True)
class Bounds:
    """How much: `loop` passes over the input (0 = until `limit` or `duration`), at most
    `limit` datagrams, at most `duration` seconds."""

    loop: int = 1
    limit: int | None = None
    duration: float | None = None

    def __post_init__(self) -> None:
        if type(self.loop) is not int or self.loop < 0:
            raise ValueError(f"loop must be a whole number, 0 for forever, got {self.loop!r}")
        if self.limit is not None and (type(self.limit) is not int or self.limit < 1):
            raise ValueError(f"limit must be at least 1 packet, got {self.limit!r}")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"duration must be more than 0 seconds, got {self.duration!r}")
        if self.loop == 0 and self.limit is None and self.duration is None:
            raise ValueError("loop 0 (forever) needs a limit or a duration to end")

    def passes(self) -> Iterator[int]:
        """The pass numbers, from 0: `loop` of them, or without end for loop 0."""
        return itertools.count() if self.loop == 0 else iter(range(self.loop))

    def reached(self, attempted: int, elapsed: float) -> bool:
        """True when no further datagram may go: `attempted` were sent or failed, `elapsed`
        seconds have passed."""
        if self.limit is not None and attempted >= self.limit:
            return True
        return self.duration is not None and elapsed >= self.duration

    def beyond(self, due: float) -> bool:
        """True when a datagram due at `due` seconds falls after the duration: stop now
        rather than wait for it."""
        return self.duration is not None and due >= self.duration
