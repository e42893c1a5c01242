"""Hostile `collector serve` settings: every value out of range is refused at start with one
line naming the setting and its source, before anything is bound, spawned or created; and any
text at all as a config file or as COLLECTOR_* variables gives a checked config or that error
(fuzz/oracles.py check_config, which the coverage-guided fuzzer also runs)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.serve.config import ConfigError, load
from fuzz.oracles import check_config


def refused(**flags) -> str:
    with pytest.raises(ConfigError) as info:
        load(None, env={}, flags=flags)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key", ["listen", "geneve_listen", "health"])
@pytest.mark.parametrize("text", [":0", "0", "127.0.0.1:0", "[::1]:0", ":65536", "[::]:99999",
                                  "999.1.1.1:80", "[zz]:80", "[10.0.0.1]:80", "bad host:80",
                                  "x..y:80", "-x:80", "[::1%lo]:80", "127.0.0.1:٣"])
def test_listener_address_out_of_range(key, text):
    """Port 0 would bind a port the kernel picks, that no load balancer names (the leftover
    the issue lists); hosts must be addresses or host names."""
    option = "--" + key.replace("_", "-")
    assert refused(**{key: text}).startswith(f"command line: {option}: "), text


@pytest.mark.parametrize("key, value", [
    ("flush_seconds", "nan"), ("flush_seconds", "inf"), ("flush_seconds", "-inf"),
    ("idle_timeout", "-1"), ("active_timeout", "0"), ("shutdown_timeout", "1e400"),
    ("health_stale", "-0.0"),
    ("min_free", "inf"), ("min_free", "-1"), ("min_free", "-1G"), ("min_free", "nan"), ("min_free", "1e30"),
    ("rcvbuf", "2G"), ("rcvbuf", "2T"), ("rcvbuf", "1e400"),
    ("batch", "0"), ("batch", "65537"), ("batch", str(10**30)),
    ("workers", "0"), ("workers", "1025"), ("workers", str(10**30)), ("max_flows", "-1"),
    ("packet_bytes", "-1"), ("packet_bytes", "9001"), ("packet_bytes", "1e3"),
])
def test_value_out_of_range(key, value):
    """Each used to be accepted and fail later, far from the setting (rcvbuf 2T: a TypeError
    from setsockopt at bind; batch 10**30: an allocation in every worker), or escaped as an
    OverflowError traceback (min_free inf)."""
    option = "--" + key.replace("_", "-")
    assert refused(**{key: value}).startswith(f"command line: {option}: "), value


@pytest.mark.parametrize("value", ["0", "9000"])
def test_packet_bytes_limits_are_accepted(value):
    assert load(None, env={}, flags={"packets": True, "packet_bytes": value}).packet_bytes == int(value)


def test_largest_sizes_are_accepted():
    config = load(None, env={}, flags={"min_free": "2T", "rcvbuf": str(2**31 - 1), "batch": "65536"})
    assert (config.min_free, config.rcvbuf, config.batch) == (2 << 40, 2**31 - 1, 65536)


def test_toml_floats_for_durations_must_be_finite(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text("idle_timeout = nan\n")
    with pytest.raises(ConfigError, match=rf"^{path}: idle_timeout: "):
        load(path, env={})
    path.write_text("flush_seconds = -inf\n")
    with pytest.raises(ConfigError, match=rf"^{path}: flush_seconds: "):
        load(path, env={})


def test_unknown_keys_from_each_source(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text("[serve]\nlisten_port = 4789\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown setting 'listen_port'"):
        load(path, env={})
    assert refused(lisen="127.0.0.1:1").startswith("command line: unknown setting '--lisen'")


@given(st.binary(max_size=300))
def test_any_bytes_as_config(data):
    check_config(data)


_KEYS = ["listen", "health", "geneve_listen", "workers", "flush_seconds", "idle_timeout",
         "min_free", "rcvbuf", "batch", "packet_bytes", "max_flows", "packets", "log_format"]


@given(st.dictionaries(st.sampled_from(_KEYS), st.one_of(
    st.text(max_size=20), st.integers(), st.floats(), st.booleans(),
    st.sampled_from(["inf", "-inf", "nan", "1e400", "-0", "0", ":0", "65536", "2T", "1e30"]))))
def test_any_values_as_flags(flags):
    """Whatever the values: a config in range, or ConfigError (never OverflowError, TypeError)."""
    try:
        config = load(None, env={}, flags=flags)
    except ConfigError as err:
        assert str(err).startswith("command line: --")
        return
    assert all(0 < a.port < 65536 for a in (config.listen, config.health) )
    assert math.isfinite(config.flush_seconds) and config.flush_seconds > 0
    assert 0 <= config.min_free and 0 < config.rcvbuf < 2**31 and 0 < config.batch <= 65536


def test_serve_with_a_bad_setting_exits_2_before_creating_anything(tmp_path):
    """No partial state: the data directory is not created, no listener bound."""
    data = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "collector", "serve", "--data", str(data),
                           "--listen", "127.0.0.1:0", "--health", "127.0.0.1:18080"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "--listen: '127.0.0.1:0': the port must be 1-65535" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not data.exists()
