"""notebooks/flows.ipynb runs top to bottom in a fresh kernel and shows what it says it shows.

The notebook is saved without outputs; it is executed here from scratch with nbclient, in a
kernel of the interpreter running the tests (so of the venv `make test` builds, where
collector is installed), with its own folder as working directory, as Jupyter would run it.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

import collector

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "flows.ipynb"
CELL_TIMEOUT = 120  # seconds, per cell; the whole notebook takes a few

# Appended to the executed copy only: where the kernel ran, and what the figure holds.
PROBE = """
import json as _json, os as _os, sys as _sys
import collector as _collector
print(_json.dumps({
    "prefix": _sys.prefix,
    "collector": _collector.__file__,
    "cwd": _os.getcwd(),
    "data_dir": str(data_dir),
    "lines": [line.get_label() for line in ax.get_lines()],
    "xlabel": ax.get_xlabel(),
    "ylabel": ax.get_ylabel(),
}))
"""


def kernel_manager() -> AsyncKernelManager:
    # kernel_dirs=[] leaves out every kernelspec registered in the user's or the system's
    # Jupyter paths (a "python3" there may name another interpreter): "python3" is then
    # ipykernel's own spec, whose command is this interpreter, sys.executable.
    specs = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook, executed once for all the tests below, and its data directory."""
    tmp = tmp_path_factory.mktemp("notebook")
    data_dir = tmp / "data"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE, id="test-probe"))
    with pytest.MonkeyPatch.context() as env:
        # The kernel inherits this environment.
        env.setenv("COLLECTOR_NOTEBOOK_DATA", str(data_dir))
        env.setenv("MPLBACKEND", "Agg")  # no display, whatever the machine has
        env.setenv("IPYTHONDIR", str(tmp / "ipython"))  # no user profile or startup files
        env.setenv("JUPYTER_RUNTIME_DIR", str(tmp / "runtime"))  # connection files
        env.setenv("JUPYTER_PLATFORM_DIRS", "1")
        client = NotebookClient(nb, km=kernel_manager(), timeout=CELL_TIMEOUT,
                                startup_timeout=CELL_TIMEOUT,
                                resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    return nb, data_dir


def cell(nb, tag: str):
    found = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(found) == 1, f"one cell tagged {tag!r}, found {len(found)}"
    return found[0]


def stream_text(c) -> str:
    return "".join(o.text for o in c.outputs if o.output_type == "stream" and o.name == "stdout")


def result(c, mime: str = "text/plain") -> str:
    """The cell's value (its last expression), as `mime`."""
    values = [o for o in c.outputs if o.output_type == "execute_result"]
    assert len(values) == 1, c.outputs
    return values[0].data[mime]


class _Table(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self.cell = []

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None


def table(c) -> list[dict[str, str]]:
    """The DataFrame a cell shows, read back from its HTML rendering (what Jupyter displays):
    one dict per row, column name -> the text shown."""
    parser = _Table()
    parser.feed(result(c, "text/html"))
    header, *rows = parser.rows
    assert header[0] == ""  # the index column
    return [dict(zip(header[1:], row[1:], strict=True)) for row in rows]


def probe(nb) -> dict:
    return json.loads(stream_text(nb.cells[-1]))


def test_notebook_is_saved_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


def test_kernel_is_this_interpreter(executed):
    nb, data_dir = executed
    found = probe(nb)
    assert found["prefix"] == sys.prefix
    assert Path(found["collector"]) == Path(collector.__file__)
    assert Path(found["cwd"]).resolve() == NOTEBOOK.parent
    assert Path(found["data_dir"]) == data_dir  # COLLECTOR_NOTEBOOK_DATA is honoured


def test_ingest_writes_the_dataset(executed):
    nb, data_dir = executed
    text = stream_text(cell(nb, "ingest"))
    assert "3 captures, 81 records, 81 mirror datagrams" in text
    assert "81 decoded, 18 truncated, 12 flows written" in text
    assert "VNI  7159709:  18 copies,  1110 IP bytes  (tms-08a33b1214EXAMPLE)" in text
    assert list(data_dir.glob("flows/date=2026-01-01/hour=00/*.parquet"))
    assert list(data_dir.glob("packets/date=2026-01-01/hour=00/*.parquet"))


def test_top_talker(executed):
    nb, _ = executed
    c = cell(nb, "top-talkers")
    rows = table(c)
    assert rows[0]["talker"] == "10.0.1.10"
    assert rows[0]["total_bytes"] == "3067" and rows[0]["peers"] == "10.0.0.2, 10.0.3.30"
    assert [(r["talker"], r["total_bytes"]) for r in rows] == [
        ("10.0.1.10", "3067"), ("(cut from the copy)", "1110"), ("2001:db8:1::a", "720")]
    assert "10.0.1.10" in result(c).splitlines()[1]  # the plain-text rendering too


def test_bytes_over_time_figure(executed):
    nb, _ = executed
    c = cell(nb, "bytes-over-time")
    images = [o.data["image/png"] for o in c.outputs
              if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 1
    png = base64.b64decode(images[0])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert (width, height) == (900, 400)
    found = probe(nb)
    assert found["lines"] == [  # one line per VNI
        "VNI 42 (no session loaded)",
        "VNI 43 (no session loaded)",
        "VNI 7159709: tms-08a33b1214EXAMPLE (PacketLength 25)",
    ]
    assert "ms" in found["xlabel"] and "bytes" in found["ylabel"]


def test_truncation_per_session(executed):
    nb, _ = executed
    rows = {row["vni"]: row for row in table(cell(nb, "truncation"))}
    assert set(rows) == {"42", "43", "7159709"}
    seed = rows["7159709"]
    assert seed["session_id"] == "tms-08a33b1214EXAMPLE" and seed["packet_length"] == "25"
    assert (seed["packets"], seed["truncated_packets"]) == ("18", "18")  # every copy cut
    assert (seed["wire_bytes"], seed["captured_bytes"]) == ("1110", "450")  # 18 x 25 received
    assert (seed["flows_with_addresses"], seed["flows"]) == ("0", "3")
    for vni in ("42", "43"):  # whole copies: none cut, every flow has its addresses
        assert rows[vni]["truncated_packets"] == "0"
        assert rows[vni]["flows_with_addresses"] == rows[vni]["flows"]
    seed_flows = table(cell(nb, "seed-flows"))
    assert sorted(r["protocol"] for r in seed_flows) == ["1", "17", "6"]
    assert all(r["src_addr"] == r["dst_addr"] == "None" for r in seed_flows)  # no addresses
    markdown = "".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "PacketLength` is 25" in markdown and "addresses" in markdown


def test_vpc_flow_logs_and_cidr(executed):
    nb, _ = executed
    rows = table(cell(nb, "vpc-flow-logs"))
    assert len(rows) == 20  # 12 flows: one row per direction that carried packets
    for name in ("account-id", "interface-id", "srcaddr", "dstaddr", "srcport", "dstport",
                 "tcp-flags", "log-status", "start", "end", "action"):
        assert name in rows[0]
    seed = [r for r in rows if r["vni"] == "7159709"]
    assert len(seed) == 3 and all(r["interface-id"] == "eni-070203f901EXAMPLE" and
                                  r["account-id"] == "111122223333" for r in seed)
    http = [r for r in rows if r["vni"] == "42" and r["dstport"] == "80"]
    assert http == [dict(http[0], srcaddr="10.0.1.10", dstaddr="10.0.3.30", protocol="6",
                         packets="10", bytes="492", **{"tcp-flags": "27"})]

    rows = table(cell(nb, "cidr"))
    assert rows[0] == {"srcaddr": "10.0.1.10", "dstaddr": "10.0.3.30", "records": "5",
                       "packets": "22", "bytes": "1239"}
    assert {r["srcaddr"] for r in rows} == {"10.0.1.10", "10.0.3.30", "10.0.0.2"}  # no v6, NULL
    rows = table(cell(nb, "cidr-inet"))
    assert rows and {r["dst_addr"] for r in rows} == {"10.0.3.30"}
