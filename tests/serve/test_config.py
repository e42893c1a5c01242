"""`collector serve` settings (collector/serve/config.py): defaults < TOML file (top level or
[serve]) < COLLECTOR_* environment < flags; every converter; every refusal names the setting
and where it came from."""

from __future__ import annotations

from dataclasses import fields
import os
import socket
from pathlib import Path

import pytest

from collector.serve.config import KEYS, Address, ConfigError, ServeConfig, load, parse_address

SAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "collector.toml"


def toml(tmp_path: Path, text: str | bytes, name: str = "serve.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def refused(config_file=None, env=None, flags=None) -> str:
    with pytest.raises(ConfigError) as info:
        load(config_file, env=env or {}, flags=flags or {})
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


# -- precedence ------------------------------------------------------------------------------


def test_defaults():
    config = load(None, env={}, flags={})
    assert config == ServeConfig()
    assert config.listen == Address("0.0.0.0", 4789)
    assert config.geneve_listen == Address("0.0.0.0", 6081)
    assert config.health == Address("0.0.0.0", 8080)
    assert config.data == Path("data")
    assert config.sessions == ()
    assert config.workers == (os.cpu_count() or 1)
    assert (config.flush_seconds, config.idle_timeout, config.active_timeout) == (10.0, 60.0, 60.0)
    assert config.max_flows == 1_000_000
    assert config.packets is False and config.packet_bytes == 128
    assert config.min_free == 512 << 20 and config.rcvbuf == 64 << 20
    assert config.shutdown_timeout == 10.0 and config.log_format == "text"
    assert config.collector_id and all(c.isalnum() or c in "._-" for c in config.collector_id)
    assert config.slot_bytes == 192


def test_file_then_environment_then_flags(tmp_path):
    path = toml(tmp_path, "flush_seconds = 5\nidle_timeout = 30\nworkers = 3\n"
                          "collector_id = 'from-file'\n")
    env = {"COLLECTOR_IDLE_TIMEOUT": "20", "COLLECTOR_WORKERS": "4"}
    config = load(path, env=env, flags={"workers": "5"})
    assert config.flush_seconds == 5.0  # file over default
    assert config.idle_timeout == 20.0  # environment over file
    assert config.workers == 5  # flag over environment and file
    assert config.collector_id == "from-file"
    assert config.active_timeout == 60.0  # default untouched


def test_flags_not_given_leave_lower_layers():
    # click passes None for an absent option and () for an absent multiple option
    env = {"COLLECTOR_WORKERS": "4", "COLLECTOR_SESSIONS": "a.json b.json"}
    config = load(None, env=env, flags={"workers": None, "sessions": (), "packets": None})
    assert config.workers == 4
    assert config.sessions == (Path("a.json"), Path("b.json"))
    assert config.packets is False


def test_flag_false_is_given():
    """--no-packets (False) overrides COLLECTOR_PACKETS=true: only None means absent."""
    assert load(None, env={"COLLECTOR_PACKETS": "true"}, flags={"packets": False}).packets is False


def test_environment_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("COLLECTOR_FLUSH_SECONDS", "3")
    assert load(None, flags={}).flush_seconds == 3.0


def test_unrelated_collector_variables_are_ignored():
    # .ci/run sets COLLECTOR_REQUIRE_REFERENCE for the test suite: not a setting
    assert load(None, env={"COLLECTOR_REQUIRE_REFERENCE": "1", "PATH": "/bin"}) == ServeConfig()


def test_the_sample_config_loads_and_shows_the_defaults():
    """deploy/collector.toml says every value shown is the built-in default except `data`
    and `sessions`; it must load as it ships."""
    if not SAMPLE.is_file():
        pytest.skip(f"{SAMPLE} is not in this checkout")
    config = load(SAMPLE, env={})
    assert config.data == Path("/var/lib/collector")
    assert config.sessions == (Path("/etc/collector/sessions.json"),)
    defaults = ServeConfig()
    for key in KEYS:
        if key not in ("data", "sessions"):
            assert getattr(config, key) == getattr(defaults, key), key


def test_file_serve_table(tmp_path):
    path = toml(tmp_path, "[serve]\nworkers = 2\nlisten = '127.0.0.1:5000'\n")
    config = load(path, env={})
    assert config.workers == 2 and config.listen == Address("127.0.0.1", 5000)


def test_file_top_level_and_serve_table_together(tmp_path):
    path = toml(tmp_path, "workers = 2\nflush-seconds = 4\n[serve]\nidle_timeout = 7\n")
    config = load(path, env={})
    assert (config.workers, config.flush_seconds, config.idle_timeout) == (2, 4.0, 7.0)


def test_file_keys_may_use_dashes(tmp_path):
    path = toml(tmp_path, "geneve-listen = 'off'\npacket-bytes = 64\nmin-free = '1G'\n")
    config = load(path, env={})
    assert config.geneve_listen is None and config.packet_bytes == 64 and config.min_free == 1 << 30


def test_flags_may_use_dashes():
    assert load(None, env={}, flags={"idle-timeout": "9"}).idle_timeout == 9.0


# -- converters ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, host, port, family", [
    ("127.0.0.1:9000", "127.0.0.1", 9000, socket.AF_INET),
    ("[::1]:9000", "::1", 9000, socket.AF_INET6),
    ("[::]:4789", "::", 4789, socket.AF_INET6),
    (":9000", "0.0.0.0", 9000, socket.AF_INET),
    ("9000", "0.0.0.0", 9000, socket.AF_INET),
    (" 10.0.0.1:1 ", "10.0.0.1", 1, socket.AF_INET),
    ("localhost:65535", "localhost", 65535, socket.AF_INET),
])
def test_addresses(text, host, port, family):
    address = parse_address(text)
    assert (address.host, address.port, address.family) == (host, port, family)
    for key in ("listen", "geneve_listen", "health"):
        assert getattr(load(None, env={}, flags={key: text}), key) == address


def test_address_text_round_trips():
    assert str(parse_address("[::1]:9000")) == "[::1]:9000"
    assert str(parse_address("127.0.0.1:9000")) == "127.0.0.1:9000"
    assert parse_address(str(parse_address("[fd00::5]:1"))) == Address("fd00::5", 1)


def test_address_from_a_toml_integer(tmp_path):
    config = load(toml(tmp_path, "listen = 4790\nhealth = ':8081'\n"), env={})
    assert config.listen == Address("0.0.0.0", 4790) and config.health == Address("0.0.0.0", 8081)


@pytest.mark.parametrize("text", ["::1:9000", "127.0.0.1", "127.0.0.1:", "127.0.0.1:70000",
                                  "[::1]", "[::1]9000", "host:port", "a:b:c", "", "127.0.0.1:-1"])
def test_bad_addresses(text):
    message = refused(flags={"listen": text})
    assert message.startswith("command line: --listen: "), message


@pytest.mark.parametrize("value", ["off", "none", ""])
def test_geneve_off(tmp_path, value):
    assert load(None, env={}, flags={"geneve_listen": value}).geneve_listen is None
    assert load(None, env={"COLLECTOR_GENEVE_LISTEN": value}).geneve_listen is None
    path = toml(tmp_path, f"geneve_listen = {value!r}\n".replace("'", '"'))
    assert load(path, env={}).geneve_listen is None


def test_geneve_off_from_a_toml_false(tmp_path):
    assert load(toml(tmp_path, "geneve_listen = false\n"), env={}).geneve_listen is None


@pytest.mark.parametrize("text, size", [
    ("64M", 64 << 20), ("1G", 1 << 30), ("512K", 512 << 10), ("64MB", 64 << 20),
    ("64m", 64 << 20), ("1.5G", 3 << 29), ("100", 100), ("2047M", 2047 << 20), (" 8 M", 8 << 20),
])
def test_sizes(text, size):
    config = load(None, env={"COLLECTOR_RCVBUF": text}, flags={"min_free": text})
    assert config.min_free == size and config.rcvbuf == size


def test_size_from_a_toml_integer(tmp_path):
    config = load(toml(tmp_path, "min_free = 1048576\nrcvbuf = '4M'\n"), env={})
    assert config.min_free == 1 << 20 and config.rcvbuf == 4 << 20


@pytest.mark.parametrize("text", ["lots", "M", "", "12Q", "1 GiB"])
def test_bad_sizes(text):
    assert refused(flags={"min_free": text}).startswith("command line: --min-free: ")


def test_rcvbuf_must_be_positive():
    assert refused(flags={"rcvbuf": "0"}).startswith("command line: --rcvbuf: ")


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "yes", "on", " On "])
def test_true(text):
    assert load(None, env={"COLLECTOR_PACKETS": text}).packets is True


@pytest.mark.parametrize("text", ["0", "false", "no", "off", "OFF"])
def test_false(text):
    assert load(None, env={"COLLECTOR_PACKETS": text}, flags={}).packets is False


def test_booleans_from_toml_and_flags(tmp_path):
    assert load(toml(tmp_path, "packets = true\n"), env={}).packets is True
    assert load(None, env={}, flags={"packets": True}).packets is True


def test_bad_boolean():
    message = refused(env={"COLLECTOR_PACKETS": "maybe"})
    assert message.startswith("environment: COLLECTOR_PACKETS: "), message
    assert "maybe" in message


def test_numbers():
    config = load(None, env={}, flags={"workers": "3", "flush_seconds": "0.5", "max_flows": "10",
                                       "idle_timeout": "1e3", "shutdown_timeout": "2"})
    assert (config.workers, config.flush_seconds, config.max_flows) == (3, 0.5, 10)
    assert (config.idle_timeout, config.shutdown_timeout) == (1000.0, 2.0)


def test_sessions_lists(tmp_path):
    assert load(None, env={}, flags={"sessions": ("a.json", "b.json")}).sessions == (
        Path("a.json"), Path("b.json"))
    assert load(None, env={"COLLECTOR_SESSIONS": "a.json,b.json"}).sessions == (
        Path("a.json"), Path("b.json"))
    path = toml(tmp_path, "sessions = ['x.json', 'y.json']\ndata = '/var/lib/collector'\n")
    config = load(path, env={})
    assert config.sessions == (Path("x.json"), Path("y.json"))
    assert config.data == Path("/var/lib/collector")


@pytest.mark.parametrize("value", [0, 9000, 128])
def test_packet_bytes_range(value):
    assert load(None, env={}, flags={"packet_bytes": str(value)}).packet_bytes == value


def test_slot_bytes_follow_packets():
    config = load(None, env={}, flags={"packets": True, "packet_bytes": "256"})
    assert config.slot_bytes == 192 + 256


@pytest.mark.parametrize("value", ["text", "json"])
def test_log_format(value):
    assert load(None, env={}, flags={"log_format": value}).log_format == value


@pytest.mark.parametrize("value", ["e2e", "collector-1", "a.b_c"])
def test_collector_id(value):
    assert load(None, env={}, flags={"collector_id": value}).collector_id == value


# -- refusals: each names the setting and its source ----------------------------------------


def test_unknown_key_in_file(tmp_path):
    path = toml(tmp_path, "workers = 2\nbogus = 1\n")
    message = refused(path)
    assert message.startswith(f"{path}: unknown setting 'bogus'"), message
    assert "flush_seconds" in message  # lists the settings


def test_unknown_key_in_serve_table(tmp_path):
    path = toml(tmp_path, "[serve]\nflush_secs = 2\n")
    message = refused(path)
    assert str(path) in message and "'flush_secs'" in message, message


def test_unknown_flag():
    message = refused(flags={"bogus_thing": "1"})
    assert message.startswith("command line: unknown setting '--bogus-thing'"), message


@pytest.mark.parametrize("key", ["idle_timeout", "active_timeout", "flush_seconds",
                                 "shutdown_timeout", "health_stale"])
def test_negative_timeout_from_each_source(tmp_path, key):
    flag = "--" + key.replace("_", "-")
    variable = "COLLECTOR_" + key.upper()
    message = refused(flags={key: "-1"})
    assert message.startswith(f"command line: {flag}: "), message
    assert "-1" in message and "> 0" in message
    message = refused(env={variable: "-1"})
    assert message.startswith(f"environment: {variable}: "), message
    path = toml(tmp_path, f"{key} = -1\n")
    message = refused(path)
    assert message.startswith(f"{path}: {key}: "), message


@pytest.mark.parametrize("value", ["0", "nan", "abc"])
def test_bad_timeouts(value):
    assert refused(flags={"idle_timeout": value}).startswith("command line: --idle-timeout: ")


def test_infinite_timeout_is_refused():
    """'inf' once passed `> 0`; every worker then died at start in FlowTable
    (`int(inf * 1e9)`: OverflowError) and was restarted forever. Refused here, named."""
    for key in ("idle_timeout", "active_timeout", "flush_seconds", "shutdown_timeout"):
        message = refused(flags={key: "inf"})
        assert message.startswith(f"command line: --{key.replace('_', '-')}: "), message


@pytest.mark.parametrize("value, expected", [("9001", "9001"), ("-1", "-1"), ("big", "big")])
def test_bad_packet_bytes_from_each_source(tmp_path, value, expected):
    message = refused(flags={"packet_bytes": value})
    assert message.startswith("command line: --packet-bytes: ") and expected in message, message
    message = refused(env={"COLLECTOR_PACKET_BYTES": value})
    assert message.startswith("environment: COLLECTOR_PACKET_BYTES: "), message
    path = toml(tmp_path, f"packet_bytes = {value if value != 'big' else repr(value)}\n")
    message = refused(path)
    assert message.startswith(f"{path}: packet_bytes: "), message


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_workers_from_each_source(tmp_path, value):
    assert refused(flags={"workers": value}).startswith("command line: --workers: ")
    assert refused(env={"COLLECTOR_WORKERS": value}).startswith("environment: COLLECTOR_WORKERS: ")
    path = toml(tmp_path, f"workers = {value if value != 'two' else repr(value)}\n")
    assert refused(path).startswith(f"{path}: workers: ")


@pytest.mark.parametrize("line", ["workers = 2.5", "workers = true", "max_flows = 1.9"])
def test_integer_settings_refuse_other_toml_types(tmp_path, line):
    """BUG: an integer setting given a TOML float or boolean is silently truncated
    (`int(2.5)` = 2, `int(True)` = 1) instead of refused; 'Every value is checked here'."""
    path = toml(tmp_path, line + "\n")
    message = refused(path)
    assert message.startswith(f"{path}: {line.split()[0]}: "), message


def test_bad_collector_id():
    message = refused(flags={"collector_id": "my collector"})
    assert message.startswith("command line: --collector-id: "), message


def test_bad_log_format():
    message = refused(env={"COLLECTOR_LOG_FORMAT": "xml"})
    assert message.startswith("environment: COLLECTOR_LOG_FORMAT: ") and "xml" in message


def test_bad_data_type_in_file(tmp_path):
    path = toml(tmp_path, "data = 5\n")
    assert refused(path).startswith(f"{path}: data: ")


def test_bad_toml_names_file_and_line(tmp_path):
    path = toml(tmp_path, "workers = 2\nflush_seconds = \n")
    message = refused(path)
    assert message.startswith(f"{path}: not valid TOML: "), message
    assert "line 2" in message, message


def test_toml_not_utf8(tmp_path):
    """BUG: tomllib raises UnicodeDecodeError (a ValueError, neither OSError nor
    TOMLDecodeError) for a file that is not UTF-8: it escapes `load` and `collector serve`
    prints a traceback and exits 1 instead of one line and exit 2."""
    path = toml(tmp_path, b"workers = 2\n# caf\xe9\n")
    try:
        message = refused(path)
    except UnicodeDecodeError as err:
        pytest.fail(f"UnicodeDecodeError escaped load(): {err}")
    assert message.startswith(f"{path}: "), message


def test_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    message = refused(path)
    assert message.startswith(f"{path}: cannot read: "), message
    assert "No such file" in message


def test_unreadable_file_a_directory(tmp_path):
    # (chmod 000 does not stop root, who runs the suite in CI: a directory is unreadable
    # as a file for everyone)
    message = refused(tmp_path)
    assert message.startswith(f"{tmp_path}: cannot read: "), message


def test_file_error_comes_before_environment_and_flags(tmp_path):
    """A bad file is reported even when the environment and flags are bad too: layers are
    applied in order and the first refusal stops."""
    path = toml(tmp_path, "workers = 0\n")
    message = refused(path, env={"COLLECTOR_WORKERS": "-1"}, flags={"workers": "x"})
    assert message.startswith(f"{path}: workers: "), message


def test_a_bad_lower_layer_is_refused_even_when_overridden(tmp_path):
    """The file says workers = 0 and the flag says 2: still refused (every given value is
    checked, so a bad file does not lie in wait for the day the flag is dropped)."""
    path = toml(tmp_path, "workers = 0\n")
    assert refused(path, flags={"workers": "2"}).startswith(f"{path}: workers: ")


def test_the_sample_config_lists_every_setting():
    """Every setting appears in deploy/collector.toml (set, or commented out with its
    meaning), so that the file stays the reference an operator reads."""
    if not SAMPLE.is_file():
        pytest.skip(f"{SAMPLE} is not in this checkout")
    text = SAMPLE.read_text()
    listed = {line.lstrip("#").split("=")[0].strip() for line in text.splitlines()
              if "=" in line and not line.lstrip("#").startswith(" ")}
    for spec in fields(ServeConfig):
        if spec.metadata.get("derived") or spec.name == "control":  # control: tests and tools only
            continue
        assert spec.name in listed, f"{spec.name} is not in {SAMPLE.name}"
