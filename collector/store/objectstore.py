"""The object store: the one module that talks to S3 (or an S3-compatible store) for writing.

A dataset in `s3://bucket/prefix` has the local layout under the prefix:
`prefix/<table>/date=YYYY-MM-DD/hour=HH/<collector_id>-<writer>-<seq>.parquet`. Writers never
write to the store directly: `DatasetWriter` completes each file in a local *spool* directory
(atomically, as for a local dataset), and an `Uploader` copies every completed file to the same
relative key under the prefix, then deletes the spool copy.

Why a spool: an upload can fail (store or network down, throttling) while traffic keeps coming.
Completed files wait in the spool, which is a plain directory and so survives a restart; the
uploader retries with exponential back-off and uploads whatever it finds at start. An upload
is idempotent: the key is the file's own name (which carries the collector id, so any number of
appliances share a prefix without coordination), and a crash between the upload and the delete
uploads the same bytes under the same key again: never a duplicate. The spool is bounded only
by health: past `max_files` / `max_bytes`, or after the store has been unreachable for
`unhealthy_after` seconds, `health_reasons()` says so (the appliance answers 503 and the load
balancer sends its traffic elsewhere); no completed file is ever deleted unuploaded.

Settings come from the standard AWS environment and config chain (`aws_settings`):
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (else the AWS_PROFILE profile of
the shared credentials file, else the AWS SDK's own chain: SSO, instance roles...),
AWS_REGION / AWS_DEFAULT_REGION (else the profile's region), AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL for S3-compatible stores (MinIO, SeaweedFS, Ceph...), addressed path-style.
Secrets are never logged, and never part of an error message this module makes.
"""

from __future__ import annotations

import configparser
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

log = logging.getLogger("collector.store.objectstore")

SCHEME = "s3://"


class StoreURLError(ValueError):
    """An object store URL that cannot be used; the message names it."""


def is_store_url(data) -> bool:
    return isinstance(data, str) and data.startswith(SCHEME)


@dataclass(frozen=True)
class StoreURL:
    """`s3://bucket/prefix` (the prefix may be empty)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> "StoreURL":
        if not is_store_url(text):
            raise StoreURLError(f"{text!r} is not an s3://bucket/prefix URL")
        bucket, _, prefix = text[len(SCHEME):].partition("/")
        prefix = prefix.strip("/")
        # S3 bucket names: 3-63 lower-case letters, digits, '.', '-' (and SeaweedFS says so too)
        if not (3 <= len(bucket) <= 63 and all(c.islower() or c.isdigit() or c in ".-" for c in bucket)
                and bucket[0].isalnum() and bucket[-1].isalnum()):
            raise StoreURLError(f"{text!r}: {bucket!r} is not a bucket name (3-63 characters: "
                                "a-z, 0-9, '.', '-')")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise StoreURLError(f"{text!r}: the prefix has an empty, '.' or '..' component")
        if not prefix.isprintable():
            raise StoreURLError(f"{text!r}: the prefix has a control (unprintable) character")
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    @property
    def path(self) -> str:
        """The pyarrow filesystem path of the prefix: 'bucket/prefix'."""
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def key(self, relative: str) -> str:
        """The pyarrow path of a dataset-relative file ('flows/date=.../x.parquet')."""
        return f"{self.path}/{relative}"


# -- the AWS environment and config chain ----------------------------------------------------

@dataclass(frozen=True)
class AWSSettings:
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    endpoint: str | None = None  # 'host[:port]', no scheme; None: AWS itself
    scheme: str = "https"
    profile: str | None = None

    @property
    def credentials_source(self) -> str:
        """Where the credentials come from, for logs (never the credentials themselves)."""
        if self.access_key:
            return "profile " + self.profile if self.profile else "environment"
        return "the AWS SDK default chain"


def aws_settings(env: dict | None = None) -> AWSSettings:
    """The S3 settings of the AWS environment variables and config files, as the AWS CLI
    resolves them (environment first, then the profile)."""
    env = os.environ if env is None else env
    get = lambda name: (env.get(name) or "").strip() or None  # noqa: E731  "" counts as unset
    profile = get("AWS_PROFILE") or get("AWS_DEFAULT_PROFILE")
    access, secret, token = get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY"), get("AWS_SESSION_TOKEN")
    from_profile = None
    if not (access and secret):
        access, secret, token = None, None, None
        credentials = _profile_section(get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
                                       profile or "default", config_style=False)
        if credentials.get("aws_access_key_id") and credentials.get("aws_secret_access_key"):
            access = credentials["aws_access_key_id"]
            secret = credentials["aws_secret_access_key"]
            token = credentials.get("aws_session_token")
            from_profile = profile or "default"
    config = _profile_section(get("AWS_CONFIG_FILE") or "~/.aws/config", profile or "default",
                              config_style=True)
    region = get("AWS_REGION") or get("AWS_DEFAULT_REGION") or config.get("region")
    endpoint_url = get("AWS_ENDPOINT_URL_S3") or get("AWS_ENDPOINT_URL") or config.get("endpoint_url")
    endpoint, scheme = None, "https"
    if endpoint_url:
        parts = urlsplit(endpoint_url if "://" in endpoint_url else "https://" + endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise StoreURLError(f"AWS endpoint {endpoint_url!r} is not http(s)://host[:port]")
        endpoint, scheme = parts.netloc.rpartition("@")[2], parts.scheme  # never userinfo
    return AWSSettings(access, secret, token, region, endpoint, scheme, from_profile)


def _profile_section(path: str, profile: str, *, config_style: bool) -> dict:
    """The `profile`'s keys in an AWS INI file ({} when absent or unreadable). The config
    file names non-default profiles '[profile NAME]', the credentials file '[NAME]'."""
    parser = configparser.RawConfigParser()
    try:
        parser.read(os.path.expanduser(path))
    except (configparser.Error, UnicodeDecodeError, OSError):
        return {}
    names = [profile] if not config_style or profile == "default" else [f"profile {profile}", profile]
    for name in names:
        if parser.has_section(name):
            return dict(parser.items(name))
    return {}


def s3_filesystem(env: dict | None = None, *, connect_timeout: float = 5.0,
                  request_timeout: float = 30.0, retries: int = 1) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured by the AWS chain (`aws_settings`)."""
    settings = aws_settings(env)
    options: dict = {"connect_timeout": connect_timeout, "request_timeout": request_timeout,
                     # our own retries (back-off, spool) are the ones that count
                     "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=retries)}
    if settings.access_key:
        options.update(access_key=settings.access_key, secret_key=settings.secret_key)
        if settings.session_token:
            options["session_token"] = settings.session_token
    if settings.region:
        options["region"] = settings.region
    if settings.endpoint:
        # an S3-compatible store: path-style (bucket in the path, not the host name)
        options.update(endpoint_override=settings.endpoint, scheme=settings.scheme,
                       force_virtual_addressing=False)
    return pafs.S3FileSystem(**options)


def open_store(url: str, env: dict | None = None) -> tuple[pafs.S3FileSystem, str]:
    """(filesystem, 'bucket/prefix') for `s3://bucket/prefix`: what pyarrow readers take."""
    return s3_filesystem(env), StoreURL.parse(url).path


# -- the spool and its uploader --------------------------------------------------------------

@dataclass
class UploadStats:
    files_uploaded: int = 0
    bytes_uploaded: int = 0
    upload_failures: int = 0
    spool_files: int = 0
    spool_bytes: int = 0
    last_error: str | None = None
    unreachable_since: float | None = None  # monotonic time of the first failure since a success
    last_success: float | None = None


def spool_files(spool: str | os.PathLike) -> list[tuple[str, int]]:
    """(dataset-relative path, size) of every completed file in the spool, oldest partition
    first. Completed: ROOT/<table>/date=*/hour=*/*.parquet, visible (the writer's temporaries
    are hidden '.name.tmp' files until renamed into place)."""
    root = Path(spool)
    found = []
    try:
        tables = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except FileNotFoundError:
        return []
    for table in tables:
        for directory in sorted(Path(root, table).glob("date=*/hour=*")):
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.name.endswith(".parquet") and not entry.name.startswith("."):
                    try:
                        size = entry.stat().st_size
                    except FileNotFoundError:
                        continue
                    found.append((f"{table}/{directory.parent.name}/{directory.name}/{entry.name}", size))
    found.sort(key=lambda item: (item[0].split("/", 1)[1], item[0]))  # oldest hour first
    return found


def prune_spool(spool: str | os.PathLike, older_than: float = 7200.0, now: float | None = None) -> int:
    """Remove the spool's empty partition directories untouched for `older_than` seconds, so
    that a months-old spool does not scan thousands of empty hours; returns how many. A writer
    makes its partition directory again before writing into it; the age keeps this off the
    hours being written."""
    now = time.time() if now is None else now
    removed = 0
    root = Path(spool)
    for hour in root.glob("*/date=*/hour=*"):
        try:
            if now - hour.stat().st_mtime > older_than:
                hour.rmdir()  # only when empty: OSError otherwise
                removed += 1
        except OSError:
            continue
    for date in root.glob("*/date=*"):
        try:
            if now - date.stat().st_mtime > older_than:
                date.rmdir()
        except OSError:
            continue
    return removed


class Uploader:
    """Uploads the spool's completed files to `url`, deleting each once stored.

    `run_once()` is one pass (the sans-thread core, for tests and `ingest`); `start()` runs
    passes in a thread every `interval` seconds, backing off exponentially (up to `max_backoff`)
    while uploads fail; `stop(timeout)` uploads what it can within `timeout`, then returns the
    number of files left (they stay in the spool for the next start).
    """

    def __init__(self, spool: str | os.PathLike, url: str, *, filesystem: pafs.FileSystem | None = None,
                 max_files: int = 100_000, max_bytes: int = 8 << 30, unhealthy_after: float = 60.0,
                 interval: float = 0.5, initial_backoff: float = 0.5, max_backoff: float = 5.0,
                 threads: int = 4, clock=time.monotonic) -> None:
        self.spool = Path(spool)
        self.url = StoreURL.parse(url)
        self.filesystem = filesystem if filesystem is not None else s3_filesystem()
        self.max_files, self.max_bytes = max_files, max_bytes
        self.unhealthy_after = unhealthy_after
        self.interval, self.initial_backoff, self.max_backoff = interval, initial_backoff, max_backoff
        self.threads = threads
        self.clock = clock
        self.stats = UploadStats()
        self._failures_in_a_row = 0
        self._lock = threading.Lock()  # the upload threads update the stats
        self._stop = threading.Event()
        self._deadline: float | None = None  # of a stop or drain: no new batch after it
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="upload")

    # -- one pass --------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Upload every completed file now in the spool; True when all were (or none waited)."""
        pending = spool_files(self.spool)
        self._count(pending)
        if not pending:
            return True
        ok = True
        # Bounded batches, so that a stop request is seen between them.
        for start in range(0, len(pending), 64):
            batch = pending[start:start + 64]
            results = list(self._pool.map(self._upload_one, batch))
            store_errors = [message for kind, message in filter(None, results) if kind == "store"]
            local_errors = [message for kind, message in filter(None, results) if kind == "local"]
            if local_errors:
                # A spool file we cannot read says nothing about the store: counted and logged,
                # and the files after it still go up (one bad file must not stop the spool).
                self._failed(local_errors[0], len(local_errors), store_down=False)
                ok = False
            if store_errors:
                ok = False
                if len(store_errors) == len(batch) - len(local_errors):
                    self._failed(store_errors[0], len(store_errors))
                    break  # the store is down: back off
                self._failed(store_errors[0], len(store_errors), store_down=False)  # transient
            if start + 64 < len(pending) and self._deadline_passed():
                ok = False
                break
        self._count(spool_files(self.spool))
        return ok and self.stats.spool_files == 0

    def _upload_one(self, item: tuple[str, int]) -> tuple[str, str] | None:
        """Upload one spool file and delete it; None, or ("local" | "store", what went wrong)."""
        relative, _ = item
        local = self.spool / relative
        try:
            # Read whole before the stream opens: an S3 stream closed after a local error would
            # publish the part written so far under the final name.
            data = local.read_bytes()
        except FileNotFoundError:
            return None  # uploaded and deleted by an earlier pass
        except OSError as error:
            return "local", f"{local}: cannot read: {error.strerror or error}"
        key = self.url.key(relative)
        try:
            with self.filesystem.open_output_stream(key) as out:
                out.write(data)
            stored = self.filesystem.get_file_info(key)
            if stored.size != len(data):
                return "store", f"{SCHEME}{key}: stored {stored.size} bytes of {len(data)}"
        except OSError as error:
            return "store", f"{SCHEME}{key}: {_one_line(error)}"
        try:
            local.unlink()
        except FileNotFoundError:
            pass
        with self._lock:
            self.stats.files_uploaded += 1
            self.stats.bytes_uploaded += len(data)
            self.stats.last_success = self.clock()
            self.stats.unreachable_since = None
            self._failures_in_a_row = 0
        return None

    def _failed(self, error: str, count: int, store_down: bool = True) -> None:
        with self._lock:
            self.stats.upload_failures += count
            self.stats.last_error = error
            if store_down:
                if self.stats.unreachable_since is None:
                    self.stats.unreachable_since = self.clock()
                self._failures_in_a_row += 1
        log.warning("upload to %s failed (%d file(s) waiting in %s): %s", self.url,
                    self.stats.spool_files, self.spool, error)

    def _count(self, pending: list[tuple[str, int]]) -> None:
        self.stats.spool_files = len(pending)
        self.stats.spool_bytes = sum(size for _, size in pending)

    # -- the thread ------------------------------------------------------------------------

    def start(self) -> "Uploader":
        waiting = spool_files(self.spool)
        self._count(waiting)
        if waiting:
            log.info("%d file(s) (%d bytes) in the spool %s from before: uploading them to %s",
                     len(waiting), self.stats.spool_bytes, self.spool, self.url)
        self._thread = threading.Thread(target=self._loop, name="uploader", daemon=True)
        self._thread.start()
        return self

    def backoff(self) -> float:
        """Seconds before the next pass: `interval` while uploads work, else exponential with
        jitter (so that many appliances do not hammer a store coming back in step)."""
        if self._failures_in_a_row == 0:
            return self.interval
        delay = min(self.max_backoff, self.initial_backoff * 2 ** (self._failures_in_a_row - 1))
        return delay * random.uniform(0.75, 1.0)

    def _loop(self) -> None:
        pruned_at = 0.0
        while not self._stop.is_set():
            try:
                if self.run_once() and self.clock() - pruned_at > 600:
                    prune_spool(self.spool)
                    pruned_at = self.clock()
            except Exception as error:  # noqa: BLE001  the thread must outlive any surprise
                self._failed(f"{type(error).__name__}: {_one_line(error)}", 1)
            self._stop.wait(self.backoff())

    def _deadline_passed(self) -> bool:
        return self._deadline is not None and self.clock() >= self._deadline

    def stop(self, timeout: float) -> int:
        """Stop the thread, then upload what is left within `timeout` seconds in all; returns
        the number of files left in the spool (logged), uploaded by the next start."""
        self._deadline = self.clock() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, self._deadline - self.clock()))
        left = self.drain(max(0.0, self._deadline - self.clock()))
        self._pool.shutdown(wait=False, cancel_futures=True)  # an upload still hung ends alone
        return left

    def drain(self, timeout: float) -> int:
        """Passes until the spool is empty or `timeout` seconds passed; files left."""
        deadline = self.clock() + timeout
        self._deadline = deadline
        while True:
            if self.run_once():
                break
            if self.clock() + self.backoff() >= deadline:
                break
            time.sleep(self.backoff())
        left = self.stats.spool_files
        if left:
            log.error("%d file(s) (%d bytes) not uploaded to %s: they stay in the spool %s and "
                      "are uploaded at the next start (last error: %s)", left,
                      self.stats.spool_bytes, self.url, self.spool, self.stats.last_error)
        else:
            log.info("spool %s empty: every file is in %s", self.spool, self.url)
        return left

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def probe(self) -> str | None:
        """None when the bucket answers, else why not (one line, for the start-up log: the
        spool absorbs an outage, so a store down at start is a warning, not an error)."""
        try:
            info = self.filesystem.get_file_info(self.url.bucket)
        except OSError as error:
            return f"{self.url} cannot be reached: {_one_line(error)}"
        if info.type == pafs.FileType.NotFound:
            return (f"bucket {self.url.bucket!r} does not exist (or these credentials cannot "
                    "see it): uploads fail until it does")
        return None

    # -- health and metrics ----------------------------------------------------------------

    def health_reasons(self, now: float | None = None) -> list[str]:
        """Why the appliance should not take traffic because of its spool: [] when fine."""
        now = self.clock() if now is None else now
        s = self.stats
        reasons = []
        if s.spool_files > self.max_files or s.spool_bytes > self.max_bytes:
            reasons.append(f"spool: {s.spool_files} file(s), {s.spool_bytes} bytes waiting in "
                           f"{self.spool}, past the bound ({self.max_files} files, "
                           f"{self.max_bytes} bytes)")
        since = s.unreachable_since
        if since is not None and now - since > self.unhealthy_after:
            reasons.append(f"spool: object store {self.url} unreachable for {now - since:.0f} s, "
                           f"{s.spool_files} file(s) waiting: {s.last_error}")
        return reasons

    def metrics(self) -> dict:
        s = self.stats
        return {"spool_files": s.spool_files, "spool_bytes": s.spool_bytes,
                "files_uploaded": s.files_uploaded, "bytes_uploaded": s.bytes_uploaded,
                "upload_failures": s.upload_failures,
                "store_reachable": 0 if s.unreachable_since is not None else 1}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
