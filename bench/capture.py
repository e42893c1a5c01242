"""Capture reader benchmark: records per second, collector's reader against dpkt's.

    python bench/capture.py [--records N] [--size BYTES] [--runs R]

Writes a classic pcap of N records (default 1,000,000) of BYTES bytes each (default 60: small
records are where per-record cost shows) to a temporary file, then iterates it with
`collector.capture.read_capture` and with `dpkt.pcap.Reader`, R times each, interleaved, and
prints the best rate of each. Also prints what building the record object alone costs, as a
NamedTuple (what `Record` is) and as a frozen slots dataclass, to show why it is the former.
"""

from __future__ import annotations

import argparse
import platform
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dpkt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collector.capture import Record, read_capture  # noqa: E402


def write_capture(path: Path, records: int, size: int) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        batch = b"".join(struct.pack("<IIII", 1767225600 + i // 1000, i % 1000 * 1000, size, size)
                         + bytes(size) for i in range(1000))
        for _ in range(records // 1000):
            f.write(batch)


def rate(iterate, path: Path) -> float:
    start = time.perf_counter()
    count = 0
    for _ in iterate(path):
        count += 1
    return count / (time.perf_counter() - start)


def collector_reader(path):
    return read_capture(path)


def dpkt_reader(path):
    with open(path, "rb") as f:
        yield from dpkt.pcap.Reader(f)


@dataclass(frozen=True, slots=True)
class FrozenRecord:
    timestamp_ns: int
    linktype: int
    data: bytes
    wire_len: int
    offset: int
    index: int
    interface: int = 0


def construction_rate(make, count: int = 1_000_000) -> float:
    data = bytes(60)
    start = time.perf_counter()
    for i in range(count):
        make(i, 1, data, 60, i, i, 0)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=60)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"Python {platform.python_version()} on {platform.machine()}, dpkt {dpkt.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pcap"
        write_capture(path, args.records, args.size)
        print(f"{args.records:,} records of {args.size} bytes, {path.stat().st_size:,} bytes; "
              f"best of {args.runs} runs")
        best = {"collector.capture.read_capture": 0.0, "dpkt.pcap.Reader": 0.0}
        for _ in range(args.runs):
            for name, reader in zip(best, (collector_reader, dpkt_reader)):
                best[name] = max(best[name], rate(reader, path))
    for name, value in best.items():
        print(f"  {name:<32} {value / 1e6:6.2f} M records/s")
    ours, theirs = best.values()
    print(f"  ratio {ours / theirs:.1f}x")
    print("record object construction alone:")
    tuple_new = tuple.__new__
    makers = {
        "Record (NamedTuple, tuple.__new__)": lambda *a: tuple_new(Record, a),
        "frozen slots dataclass": FrozenRecord,
    }
    for name, make in makers.items():
        value = max(construction_rate(make) for _ in range(3))
        print(f"  {name:<36} {value / 1e6:6.2f} M/s")


if __name__ == "__main__":
    main()
