"""`collector serve` settings: defaults, then a TOML file, then COLLECTOR_* variables, then flags.

Every value is checked here, before anything is bound or spawned: a bad value stops the
appliance at start with one line that names the setting and where it came from.
"""

from __future__ import annotations

import math
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


MAX_SIZE = 1 << 50  # 1 PiB: sizes (min_free) beyond are typos
MAX_RCVBUF = (1 << 31) - 1  # SO_RCVBUF is a C int
MAX_BATCH = 1 << 16  # datagrams per receive call; each worker allocates batch x slot bytes
MAX_WORKERS = 1024


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and its source."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


@dataclass(frozen=True)
class ServeConfig:
    listen: Address = Address("0.0.0.0", 4789)  # VXLAN
    geneve_listen: Address | None = Address("0.0.0.0", 6081)  # GENEVE (GWLB); None: off
    health: Address = Address("0.0.0.0", 8080)  # HTTP /healthz and /metrics
    data: Path = Path("data")
    # `data = "s3://bucket/prefix"` sets `store`, and `data` becomes the spool: files are
    # completed there, then uploaded (collector/store/objectstore.py, docs/object-store.md)
    store: str | None = field(default=None, metadata={"derived": True})
    spool: Path | None = None  # with a store; default ./spool-<collector_id>
    spool_max_files: int = 100_000  # unhealthy past this many files waiting to upload
    spool_max_bytes: int = 8 << 30  # ... or this many bytes
    store_unhealthy_after: float = 60.0  # unhealthy when uploads failed for this long
    sessions: tuple[Path, ...] = ()
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    flush_seconds: float = 10.0
    idle_timeout: float = 60.0
    active_timeout: float = 60.0
    max_flows: int = 1_000_000  # per worker
    packets: bool = False
    packet_bytes: int = 128
    # every flush_seconds each worker journals its open flows, so that a SIGKILL loses at
    # most the last flush interval (collector/store/journal.py, docs/robustness.md)
    journal: bool = True
    # every flush_seconds each open flow's counts so far are written as a row ('active')
    interim_export: bool = False
    collector_id: str = field(default_factory=lambda: _host_name())
    min_free: int = 512 * 1024 * 1024  # bytes free in the data directory for health
    rcvbuf: int = 64 * 1024 * 1024  # socket receive buffer per socket
    batch: int = 1024  # datagrams received per batch
    shutdown_timeout: float = 10.0
    health_stale: float = 5.0  # a worker loop older than this is unhealthy
    log_format: str = "text"
    control: bool = False  # POST /flush on the health port: for tests and tools, not production
    # Per worker and table: rows that could not be written (disk full, read-only) wait in
    # memory up to this many bytes; past it the oldest are dropped and counted
    # (collector_rows_dropped_total).
    max_pending_bytes: int = 256 * 1024 * 1024

    @property
    def slot_bytes(self) -> int:
        """Bytes kept of each datagram: the headers (GENEVE + GWLB options + VXLAN + inner
        headers fit in 192), plus the frame bytes the packets table keeps."""
        return 192 + (self.packet_bytes if self.packets else 0)


def _host_name() -> str:
    name = socket.gethostname().split(".")[0] or "collector"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def parse_address(text: str, default_host: str = "0.0.0.0") -> Address:
    """'HOST:PORT', '[V6]:PORT', ':PORT' or 'PORT'."""
    text = str(text).strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.isdigit():
        host, port = "", text
    else:
        raise ValueError(f"{text!r} is not HOST:PORT")
    # Port 0 would bind a port the kernel picks, that no load balancer or Prometheus target
    # names: a listener nobody can reach, so it is refused like a port out of range.
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be 1-65535")
    host = host or default_host
    if not _valid_host(host, bracketed=text.startswith("[")):
        raise ValueError(f"{text!r}: {host!r} is not an IPv4 address, [IPv6] address or host name")
    return Address(host, int(port))


def _valid_host(host: str, bracketed: bool) -> bool:
    """An IPv6 literal (only inside brackets), an IPv4 literal, or a DNS host name."""
    if bracketed:
        try:
            socket.inet_pton(socket.AF_INET6, host)
            return True
        except (OSError, ValueError):
            return False
    try:
        socket.inet_pton(socket.AF_INET, host)
        return True
    except (OSError, ValueError):
        pass
    # "999.1.1.1" is no address and, all digits and dots, no host name either
    labels = host.rstrip(".").split(".")
    return (len(host) <= 253 and not all(label.isdigit() for label in labels)
            and all(0 < len(label) <= 63 and label.isascii()
                    and all(c.isalnum() or c == "-" for c in label)
                    and label[0] != "-" and label[-1] != "-" for label in labels))


def _size(text) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024): a whole number from 0 to 1 PiB."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size")
    if isinstance(text, int):
        size = text
    else:
        digits = str(text).strip().upper().removesuffix("B")
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(digits[-1:], 1)
        number = float(digits[:-1] if scale > 1 else digits)
        if not math.isfinite(number):  # int() of inf raises OverflowError, not ValueError
            raise ValueError(f"{text!r} is not a finite size")
        size = int(number * scale)
    if not 0 <= size <= MAX_SIZE:
        raise ValueError(f"{text!r} must be 0-{MAX_SIZE} bytes (1 PiB)")
    return size


def _bounded(convert, high: int):
    """`convert`, then at most `high`: larger values are mistakes that would fail later, far
    from the setting (a receive batch that cannot be allocated, an int the kernel refuses)."""
    def check(value):
        number = convert(value)
        if number > high:
            raise ValueError(f"{value!r} must be at most {high}")
        return number
    return check


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not true/false")


def _paths(value) -> tuple[Path, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(Path(v) for v in value)
    return tuple(Path(v) for v in str(value).replace(",", " ").split())


def _optional_address(value):
    if value in (None, "", "off", "none", False):
        return None
    return parse_address(value)


def _integer(value) -> int:
    """An integer, or the text of one: a TOML float or boolean is refused, not truncated."""
    if isinstance(value, (bool, float)):
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


def _positive(kind):
    def convert(value):
        number = kind(value)
        if not (number > 0 and math.isfinite(number)):
            raise ValueError(f"{value!r} must be a finite number > 0")
        return number
    return convert


def _choice(*options):
    def convert(value):
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return value
    return convert


def _packet_bytes(value) -> int:
    number = _integer(value)
    if not 0 <= number <= 9000:
        raise ValueError(f"{value!r} must be 0-9000")
    return number


def _collector_id(value) -> str:
    text = str(value)
    if not text or any(not (c.isalnum() or c in "._-") for c in text):
        raise ValueError(f"{value!r}: use letters, digits, '.', '_' and '-' only")
    return text


_CONVERT = {
    "listen": parse_address,
    "geneve_listen": _optional_address,
    "health": parse_address,
    "data": lambda value: _store_url(value) if str(value).startswith("s3://") else Path(value),
    "spool": Path,
    "spool_max_files": _positive(_integer),
    "spool_max_bytes": _positive(_size),
    "store_unhealthy_after": _positive(float),
    "sessions": _paths,
    "workers": _bounded(_positive(_integer), MAX_WORKERS),
    "flush_seconds": _positive(float),
    "idle_timeout": _positive(float),
    "active_timeout": _positive(float),
    "max_flows": _positive(_integer),
    "packets": _bool,
    "journal": _bool,
    "interim_export": _bool,
    "packet_bytes": _packet_bytes,
    "collector_id": _collector_id,
    "min_free": _size,
    "rcvbuf": _bounded(_positive(_size), MAX_RCVBUF),
    "batch": _bounded(_positive(_integer), MAX_BATCH),
    "shutdown_timeout": _positive(float),
    "health_stale": _positive(float),
    "log_format": _choice("text", "json"),
    "control": _bool,
    "max_pending_bytes": _positive(_size),
}
ENV_PREFIX = "COLLECTOR_"
KEYS = tuple(f.name for f in fields(ServeConfig) if not f.metadata.get("derived"))


def load(config_file: str | os.PathLike | None = None, env: dict | None = None,
         flags: dict | None = None) -> ServeConfig:
    """Defaults <- TOML file <- COLLECTOR_* environment <- flags (None = not given)."""
    config = ServeConfig()
    if config_file is not None:
        config = _apply(config, _read_toml(Path(config_file)), f"{config_file}")
    env = os.environ if env is None else env
    from_env = {key: env[ENV_PREFIX + key.upper()] for key in KEYS if ENV_PREFIX + key.upper() in env}
    config = _apply(config, from_env, "environment", prefix=ENV_PREFIX)
    given = {key: value for key, value in (flags or {}).items() if value not in (None, ())}
    return _with_store(_apply(config, given, "command line", prefix="--"))


def _store_url(value) -> str:
    from collector.store.objectstore import StoreURL

    return str(StoreURL.parse(str(value)))  # StoreURLError is a ValueError: named by _apply


def _with_store(config: ServeConfig) -> ServeConfig:
    """`data` an s3:// URL: the URL moves to `store`, and `data` (where workers write) is the
    spool."""
    if not isinstance(config.data, str):
        return config
    spool = config.spool or Path(f"spool-{config.collector_id}")
    return replace(config, store=config.data, data=spool)


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 at byte {err.start}") from None
    # Settings may sit at the top level or under [serve].
    settings = dict(document.get("serve", {})) if isinstance(document.get("serve"), dict) else {}
    settings.update({k: v for k, v in document.items() if k != "serve"})
    return {key.replace("-", "_"): value for key, value in settings.items()}


def _apply(config: ServeConfig, values: dict, source: str, prefix: str = "") -> ServeConfig:
    changes = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        shown = (f"{prefix}{name.upper()}" if prefix == ENV_PREFIX
                 else f"{prefix}{name.replace('_', '-')}" if prefix else name)
        if name not in _CONVERT:
            raise ConfigError(f"{source}: unknown setting {shown!r}; settings: {', '.join(KEYS)}")
        try:
            changes[name] = _CONVERT[name](value)
        except (ValueError, TypeError, OverflowError) as err:
            raise ConfigError(f"{source}: {shown}: {err}") from None
    return replace(config, **changes)
