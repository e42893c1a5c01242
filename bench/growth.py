"""Cost growth of `collector ingest`: rate and peak memory as packets and concurrent flows grow.

    python bench/growth.py [--packets 1e4,1e5,1e6,1e7] [--flows 1e3,1e4,1e5,1e6] [--runs R]
                           [--cache DIR] [--keep-captures] [--pure]

For every (packets N, flows F) with F <= N, a capture is generated (numpy, fixed seed-free
layout, cached under --cache keyed by N and F, deleted after its runs unless --keep-captures):
Ethernet / IPv4 10.0.1.10 -> 10.0.2.20 / UDP 4789 / VXLAN (four VNIs) around Ethernet / IPv4 /
TCP frames of 100 IP bytes, the F flows visited round robin, each visit flipping direction, N
packets spread evenly over 50 s. So all F flows are active at once from their first packet to
the end of the capture (under the 60 s idle and active timeouts), the flow table holds F flows
at its peak, and every flow ends as one row at shutdown. (One frame size: this measures how the
cost grows; `bench/ingest.py` measures a realistic mix.)

Each run is a fresh `python -m collector ingest` process of this tree; its wall time and peak
RSS (the child's own rusage, from wait4) are measured, and its summary line is checked: N
packets read and decoded, F flow rows written. A first row ingests a one-packet capture: the
fixed cost (interpreter, imports, Parquet writer) that every other row includes.

The table: packets, flows, wall seconds (median of R), packets/s, the ingest's own timer, CPU
seconds (user + system) and CPU µs per packet above the one-packet baseline, peak RSS, and RSS
above the baseline per active flow. Linear cost in packets shows as a constant µs/packet down
a column of equal F; bounded cost per flow as a bytes/flow that does not grow with F.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = 1_795_000_000  # 2026-11-18, any fixed second
DURATION_S = 50  # under the 60 s idle and active timeouts: every flow lives to the end
VNIS = (7159709, 7159710, 7159711, 7159712)
IP_BYTES = 100  # inner IPv4 total length: 20 IP + 20 TCP + 60 payload
CHUNK = 1 << 20  # records generated at once

# one record: pcap record header, outer Ethernet/IPv4/UDP/VXLAN, inner Ethernet/IPv4/TCP
_FRAME = 14 + 20 + 8 + 8 + 14 + IP_BYTES
_RECORD = 16 + _FRAME
# offsets in a record
_OUT_IP = 16 + 14
_UDP = _OUT_IP + 20
_VXLAN = _UDP + 8
_IN_IP = _VXLAN + 8 + 14
_TCP = _IN_IP + 20


def _template():
    import numpy as np

    row = np.zeros(_RECORD, dtype=np.uint8)

    def put(offset: int, data: bytes) -> None:
        row[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    put(8, (_FRAME).to_bytes(4, "little") + (_FRAME).to_bytes(4, "little"))
    put(16, bytes.fromhex("0a00000a0214" "0a00000a010a" "0800"))
    put(_OUT_IP, bytes.fromhex("4500") + (_FRAME - 14).to_bytes(2, "big")
        + bytes.fromhex("0000 0000 ff11 0000 0a00010a 0a000214".replace(" ", "")))
    put(_UDP + 2, (4789).to_bytes(2, "big") + (_FRAME - 14 - 20).to_bytes(2, "big"))
    put(_VXLAN, bytes.fromhex("08000000"))
    put(_VXLAN + 8, bytes.fromhex("0a00000b0001" "0a00000b0002" "0800"))
    put(_IN_IP, bytes.fromhex("4500") + IP_BYTES.to_bytes(2, "big")
        + bytes.fromhex("0000 4000 4006 0000".replace(" ", "")))
    put(_TCP + 12, bytes.fromhex("5018 ffff".replace(" ", "")))  # header length 20, PSH|ACK
    return row


def _be(values, size: int):
    """Big-endian bytes of `values` (a numpy array), one row of `size` bytes each."""
    return values.astype(f">u{size}").view("u1").reshape(-1, size)


def _checksum(words):
    """IPv4 header checksums: `words` is (rows, 10) uint32 of 16-bit words, checksum zeroed."""
    total = words.sum(axis=1)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def generate(path: Path, packets: int, flows: int) -> None:
    """Write the capture (see the module docstring) to `path`."""
    import numpy as np

    vnis = np.array(VNIS, dtype=np.int64)
    template = _template()
    header = (0xA1B2C3D4).to_bytes(4, "little") + bytes.fromhex("02000400") + bytes(8) \
        + (262144).to_bytes(4, "little") + (1).to_bytes(4, "little")
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as f:
        f.write(header)
        for first in range(0, packets, CHUNK):
            i = np.arange(first, min(first + CHUNK, packets), dtype=np.int64)
            rows = np.tile(template, (len(i), 1))
            flow = i % flows
            reverse = (i // flows) % 2 == 1
            t_us = i * (DURATION_S * 1_000_000) // packets
            rows[:, 0:4] = (START + t_us // 1_000_000).astype("<u4").view(np.uint8).reshape(-1, 4)
            rows[:, 4:8] = (t_us % 1_000_000).astype("<u4").view(np.uint8).reshape(-1, 4)
            # outer: IP id, checksum; UDP source port the flow's hash, as AWS picks one
            rows[:, _OUT_IP + 4 : _OUT_IP + 6] = _be(i & 0xFFFF, 2)
            outer_words = rows[:, _OUT_IP : _OUT_IP + 20].view(">u2").astype(np.uint32)
            rows[:, _OUT_IP + 10 : _OUT_IP + 12] = _be(_checksum(outer_words), 2)
            rows[:, _UDP : _UDP + 2] = _be(49152 + (flow * 2654435761 % 16384), 2)
            rows[:, _VXLAN + 4 : _VXLAN + 7] = _be(vnis[flow % 4], 4)[:, 1:]
            # inner: the flow's client 10.x.y.z:port <-> a server 172.16.s.1:443
            client = (10 << 24) + 1 + flow
            server = (172 << 24) + (16 << 16) + ((flow % 200) << 8) + 1
            client_port = 1024 + flow % 60000
            src = np.where(reverse, server, client)
            dst = np.where(reverse, client, server)
            rows[:, _IN_IP + 12 : _IN_IP + 16] = _be(src, 4)
            rows[:, _IN_IP + 16 : _IN_IP + 20] = _be(dst, 4)
            inner_words = rows[:, _IN_IP : _IN_IP + 20].view(">u2").astype(np.uint32)
            rows[:, _IN_IP + 10 : _IN_IP + 12] = _be(_checksum(inner_words), 2)
            rows[:, _TCP : _TCP + 2] = _be(np.where(reverse, 443, client_port), 2)
            rows[:, _TCP + 2 : _TCP + 4] = _be(np.where(reverse, client_port, 443), 2)
            rows[:, _TCP + 4 : _TCP + 8] = _be(i & 0xFFFFFFFF, 4)  # sequence numbers
            f.write(rows.tobytes())
    os.replace(partial, path)


def capture(cache: Path, packets: int, flows: int) -> Path:
    """The capture for (packets, flows), generated in a child process: this one stays small,
    because a child forked from it would count this process's pages in its peak RSS."""
    path = cache / f"growth-n{packets}-f{flows}.pcap"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", str(path), str(packets),
                        str(flows)], check=True)
        print(f"  generated {path.name} ({path.stat().st_size / 2**20:,.0f} MiB) in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    return path


def run_ingest(path: Path, data: Path, env: dict) -> tuple[float, float, float, str]:
    """One `collector ingest` process: (wall s, CPU s, peak RSS MiB, its summary line)."""
    cmd = [sys.executable, "-m", "collector", "ingest", str(path), "--data", str(data),
           "--collector-id", "growth"]
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{stderr[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, stderr.strip().splitlines()[-1]


def check(summary: str, packets: int, flows: int) -> float:
    """The summary names N packets, N decoded, F flows; returns the ingest's own seconds."""
    found = re.search(r"^(\d+) packets from .* in ([\d.]+) s .* (\d+) decoded, .* (\d+) flows in",
                      summary)
    if not found or (int(found[1]), int(found[3]), int(found[4])) != (packets, packets, flows):
        sys.exit(f"unexpected result for {packets} packets, {flows} flows: {summary}")
    return float(found[2])


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "?")
    return (f"cpu: {model}, {os.cpu_count()} cores; python {platform.python_version()}; "
            "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def main() -> None:
    if sys.argv[1:2] == ["--generate"]:  # the child process of capture()
        generate(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def counts(text: str) -> list[int]:
        return [int(float(x)) for x in text.split(",") if x]

    parser.add_argument("--packets", type=counts, default=[10**4, 10**5, 10**6, 10**7])
    parser.add_argument("--flows", type=counts, default=[10**3, 10**4, 10**5, 10**6])
    parser.add_argument("--runs", type=int, default=1, help="runs per row (median)")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "collector-bench-growth")
    parser.add_argument("--keep-captures", action="store_true",
                        help="keep the generated captures for the next run (they take GBs)")
    parser.add_argument("--pure", action="store_true",
                        help="run collector with COLLECTOR_PURE_PYTHON=1 (the reference path)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.pure:
        env["COLLECTOR_PURE_PYTHON"] = "1"
    print(machine())
    print(f"collector ingest of this tree ({'pure Python' if args.pure else 'compiled'}), "
          f"{_RECORD - 16}-byte VXLAN frames, median of {args.runs} run(s)", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-growth-") as tmp:
        tmp = Path(tmp)
        cells = [(1, 1)] + [(n, f) for n in args.packets for f in args.flows if f <= n]
        for packets, flows in cells:
            path = capture(args.cache, packets, flows)
            walls, cpus, rss, own = [], [], [], []
            for run in range(args.runs):
                data = tmp / f"data-{packets}-{flows}-{run}"
                wall, cpu, peak, summary = run_ingest(path, data, env)
                own.append(check(summary, packets, flows))
                walls.append(wall)
                cpus.append(cpu)
                rss.append(peak)
                shutil.rmtree(data)
            if not args.keep_captures and (packets, flows) != (1, 1):
                path.unlink()
            row = (packets, flows, statistics.median(walls), statistics.median(own),
                   statistics.median(rss), statistics.median(cpus))
            rows.append(row)
            print(f"  {packets:>10,} packets {flows:>9,} flows: {row[2]:7.2f} s "
                  f"({packets / row[2]:>10,.0f} packets/s), CPU {row[5]:7.2f} s, "
                  f"peak RSS {row[4]:6.0f} MiB",
                  flush=True)

    base_wall, base_rss, base_cpu = rows[0][2], rows[0][4], rows[0][5]
    print(f"\nbaseline (1 packet, 1 flow): {base_wall:.2f} s wall, {base_cpu:.2f} s CPU, "
          f"{base_rss:.0f} MiB: interpreter, imports, Parquet writer; in every row")
    print(f"{'packets':>11s} {'flows':>9s} {'wall s':>7s} {'packets/s':>10s} {'own s':>6s} "
          f"{'CPU s':>6s} {'CPU us/pkt':>10s} {'peak RSS MiB':>12s} {'B/flow':>7s}")
    for packets, flows, wall, own, rss, cpu in rows[1:]:
        per_packet = (cpu - base_cpu) / packets * 1e6
        per_flow = (rss - base_rss) * 2**20 / flows
        print(f"{packets:>11,} {flows:>9,} {wall:7.2f} {packets / wall:>10,.0f} {own:6.2f} "
              f"{cpu:6.2f} {per_packet:10.3f} {rss:12.0f} {per_flow:7.0f}")
    print("own s: the ingest's own timer (no interpreter start or imports); CPU us/pkt: (CPU - "
          "baseline CPU) / packets, steadier than wall time on a busy machine; B/flow: (peak "
          "RSS - baseline RSS) / flows, an upper bound (it includes batches, Arrow buffers)")
    print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
