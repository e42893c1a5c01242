"""`data = "s3://bucket/prefix"` in every settings layer: the URL becomes `store`, `data` the spool."""

from pathlib import Path

import pytest

from collector.serve.config import KEYS, ConfigError, load


def test_flag_env_and_toml_all_take_an_s3_url(tmp_path):
    config = load(flags={"data": "s3://my-bucket/flows/", "collector_id": "app-1"}, env={})
    assert (config.store, config.data) == ("s3://my-bucket/flows", Path("spool-app-1"))
    config = load(env={"COLLECTOR_DATA": "s3://my-bucket", "COLLECTOR_SPOOL": "/var/spool/c"})
    assert (config.store, config.data) == ("s3://my-bucket", Path("/var/spool/c"))
    toml = tmp_path / "serve.toml"
    toml.write_text('[serve]\ndata = "s3://my-bucket/p"\nspool = "/s"\nspool_max_files = 10\n'
                    'spool_max_bytes = "1G"\nstore_unhealthy_after = 5\n')
    config = load(toml, env={})
    assert (config.store, config.data, config.spool_max_files, config.spool_max_bytes,
            config.store_unhealthy_after) == ("s3://my-bucket/p", Path("/s"), 10, 1 << 30, 5.0)


def test_a_directory_has_no_store():
    config = load(flags={"data": "/var/lib/collector"}, env={})
    assert config.store is None and config.data == Path("/var/lib/collector")


def test_store_is_derived_not_a_setting():
    assert "store" not in KEYS and {"spool", "spool_max_files", "spool_max_bytes"} <= set(KEYS)
    with pytest.raises(ConfigError, match="unknown setting"):
        load(flags={"store": "s3://my-bucket"}, env={})


@pytest.mark.parametrize("url", ["s3://", "s3://Bad_Bucket/x", "s3://my-bucket/a//b"])
def test_bad_urls_name_the_setting(url):
    with pytest.raises(ConfigError, match=r"--data: .*s3://"):
        load(flags={"data": url}, env={})
