"""The package's top-level API."""

import subprocess
import sys

import collector
from collector.query import connect


def test_connect_is_the_query_api():
    assert collector.connect is connect


def test_connect_over_an_empty_directory(tmp_path):
    con = collector.connect(tmp_path)
    assert con.execute("SELECT count(*) FROM flows").fetchone() == (0,)


def test_import_collector_does_not_load_duckdb():
    code = "import sys, collector; print('duckdb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_attribute():
    try:
        collector.nothing_here
    except AttributeError as err:
        assert "nothing_here" in str(err)
    else:
        raise AssertionError("expected AttributeError")
