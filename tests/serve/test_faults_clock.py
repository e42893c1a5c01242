"""The worker's expiry clock (sans-I/O, explicit times): flows expire against the receive
timestamps' clock, carried by the monotonic clock between datagrams, and a wall-clock step is
told from NTP slewing. The E2E side (libfaketime on a real serve) is in test_faults.py."""

from collector.serve.worker import STEP_NS, ExpiryClock

S = 1_000_000_000
WALL = 1_767_225_600 * S  # 2026-01-01T00:00:00Z


def test_without_datagrams_now_is_the_wall_clock():
    assert ExpiryClock().now(WALL, 5 * S) == WALL


def test_now_follows_the_newest_receive_time_carried_by_the_monotonic_clock():
    clock = ExpiryClock()
    clock.received(WALL + 3 * S, monotonic_ns=100 * S)
    # the wall clock in this process may be anything (libfaketime, a step): not used
    assert clock.now(wall_ns=0, monotonic_ns=110 * S) == WALL + 13 * S


def test_slewing_is_no_step_but_a_jump_is_either_way():
    clock = ExpiryClock()
    assert clock.step(WALL, 0) == 0  # the first call only records
    slewed = 500 * 1000  # 500 ppm over one second: 0.5 ms
    assert clock.step(WALL + S + slewed, S) == 0
    assert clock.step(WALL + 2 * S + slewed + 3600 * S, 2 * S) == 3600 * S
    assert clock.step(WALL + 3 * S + slewed - 3600 * S, 3 * S) == -7200 * S
    assert abs(clock.step(WALL + 4 * S + slewed - 3600 * S - STEP_NS + 1, 4 * S)) == 0


def test_a_step_drops_the_anchor_until_the_next_datagram():
    """A real step moves the kernel's stamps too: the datagrams after it anchor the clock
    again, so flows started after the step expire on their own times."""
    clock = ExpiryClock()
    clock.step(WALL, 0)
    clock.received(WALL, 0)
    assert clock.step(WALL - 3600 * S + S, S) == -3600 * S
    assert clock.now(WALL - 3600 * S + S, S) == WALL - 3600 * S + S  # the wall clock again
    clock.received(WALL - 3600 * S + 2 * S, 2 * S)
    assert clock.now(0, 4 * S) == WALL - 3600 * S + 4 * S
