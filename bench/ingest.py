"""Ingest benchmark: `collector ingest` end to end, beside tshark, on an appliance capture.

    python bench/ingest.py [--packets N] [--flows F] [--runs R] [--keep DIR] [--profile]

Generates (fixed seed, cached under the temp dir keyed by the parameters, so a re-run skips
it) the capture a Traffic Mirroring target records: Ethernet / IPv4 10.0.1.10 -> 10.0.2.20 /
UDP 4789 / VXLAN, the outer UDP source port a stable hash of the inner 5-tuple in
49152-65535 as AWS picks it. Inside: F flows over N packets (heavy-tailed packets per flow),
flows 80/20 IPv4/IPv6, 70% TCP (60% of those with more than 5 packets carry the handshake
and the FIN exchange; sequence numbers consistent), 25% UDP, 5% ICMP echo; IP sizes 40% 40-100 B, 30% 552-600 B, 30% 1400-1500 B
(TCP control segments header-only); 5% of copies cut to 25 or 64 bytes of inner frame as a
session's PacketLength cuts them; four sessions (VNIs); 50 s of traffic. Beside it, the plain
twin: the same inner frames as a capture taken on the mirrored instance (cut copies as
snaplen-cut records).

Then times, each run a fresh process, runs interleaved, medians of R:

    collector ingest FILE --data TMP      on the VXLAN capture and on the plain twin
    tshark -r FILE -q -z conv,ip          on both
    NFStream (n_meters=1, no dissection)  on the plain twin (it cannot decode VXLAN)

tshark is installed with apt-get and NFStream with pip (into this interpreter's venv) when
missing (bench/common.py); without them their rows are skipped, saying so.

wall seconds and peak RSS (the child's own rusage, from wait4). Each collector run is checked
through `collector query`: the flows it wrote, the packets and truncated copies they count,
against what the generator knows it wrote; a mismatch stops the benchmark.

The collector measured is the one of the tree this script sits in (PYTHONPATH is set for the
children), not whatever the venv installed.

--profile then times the stages of an ingest of the VXLAN capture in this process (records,
outer peeling, receive slots, decode_batch, the whole ingest), and runs one ingest under
cProfile: top 25 functions by cumulative time, top 15 by own time. --runs 0 skips the table.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import datetime as dt
import io
import json
import os
import platform
import pstats
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's collector, here and in the child processes
import collector  # noqa: E402
from collector import build  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_apt, ensure_pip, print_header  # noqa: E402

# NFStream as a fresh process: every flow of the file, counted (its own timer printed too)
NFSTREAM = """
import sys, time
from nfstream import NFStreamer
started = time.perf_counter()
flows = packets = 0
for flow in NFStreamer(source=sys.argv[1], statistical_analysis=False, n_dissections=0,
                       n_meters=1):
    flows += 1
    packets += flow.bidirectional_packets
print(f"nfstream flows {flows} packets {packets} seconds {time.perf_counter() - started:.3f}")
"""

SEED = 20261125
GENERATOR = 2  # bump when the generated traffic changes: it keys the cache
DURATION_S = 50.0  # under the 60 s active and idle timeouts: one flows row per flow
START = int(dt.datetime(2026, 11, 25, tzinfo=dt.timezone.utc).timestamp())
VNIS = (7159709, 7159710, 7159711, 7159712)
OUTER_SRC, OUTER_DST = "10.0.1.10", "10.0.2.20"
OUTER_SRC_MAC, OUTER_DST_MAC = bytes.fromhex("0a00000a010a"), bytes.fromhex("0a00000a0214")
OUTER_TTL = 255
CUT_FRACTION, CUTS = 0.05, (25, 64)
SIZE_MIX = (0.4, 0.3, 0.3)  # small 40-100, medium 552-600, large 1400-1500 IP bytes
TCP_PORTS = (443, 443, 443, 443, 80, 22, 5432, 3306, 6379, 8080)
UDP_PORTS = (53, 53, 53, 123, 443, 514, 161, 8125)  # none of them a mirror port
# flag codes of TCP templates
DATA, SYN, SYNACK, ACK, FINACK = range(5)
TCP_FLAGS = {DATA: build.PSH | build.ACK, SYN: build.SYN, SYNACK: build.SYN | build.ACK,
             ACK: build.ACK, FINACK: build.FIN | build.ACK}

_PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
_RECORD = struct.Struct("<IIII")
# outer Ethernet + IPv4 + UDP + VXLAN (50 bytes): MACs and ethertype | 0x4500, total length,
# identification, flags/fragment, TTL/protocol, checksum, addresses | UDP | VXLAN flags, VNI
_OUTER = struct.Struct("!14sHHHHHH4s4sHHHHII")
_OUTER_ETH = OUTER_DST_MAC + OUTER_SRC_MAC + b"\x08\x00"
_OUTER_LEN = 50
_ZEROS = bytes(1600)
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "collector-bench-ingest"  # bench/flows.py too


# -- generation ---------------------------------------------------------------------------------


def _sum16(data: bytes) -> int:
    """Ones' complement sum of 16-bit words, folded to 16 bits."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _fold(total: int) -> int:
    total = (total & 0xFFFF) + (total >> 16)
    return ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF


def _outer_base() -> int:
    words = struct.pack("!HHHHHH4s4s", 0x4500, 0, 0, 0, (OUTER_TTL << 8) | build.UDP, 0,
                        build._addr(OUTER_SRC), build._addr(OUTER_DST))
    return _sum16(words)


_OUTER_BASE = _outer_base()


def _flows(count: int, rng: random.Random) -> list[tuple]:
    """(ip_version, proto, client, server, client port, server port, vni), 5-tuples unique,
    ICMP pairs unique (collector keys ICMP by address pair and type)."""
    servers4 = [f"172.31.{rng.randrange(16)}.{rng.randrange(1, 255)}" for _ in range(300)]
    servers6 = [f"fd00:172:31::{rng.randrange(1, 65535):x}" for _ in range(100)]
    seen, flows = set(), []
    while len(flows) < count:
        v6 = rng.random() < 0.2
        r = rng.random()
        proto = build.TCP if r < 0.70 else build.UDP if r < 0.95 else (build.ICMPV6 if v6 else build.ICMP)
        if v6:
            client = f"fd00:10::{rng.randrange(1, 65535):x}:{rng.randrange(1, 65535):x}"
            server = rng.choice(servers6)
        else:
            client = f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            server = rng.choice(servers4)
        if proto == build.TCP:
            cport, sport = rng.randrange(32768, 61000), rng.choice(TCP_PORTS)
        elif proto == build.UDP:
            cport, sport = rng.randrange(32768, 61000), rng.choice(UDP_PORTS)
        else:
            cport = sport = 0
        key = (v6, proto, client, server, cport, sport)
        if key in seen:
            continue
        seen.add(key)
        flows.append((6 if v6 else 4, proto, client, server, cport, sport, rng.choice(VNIS)))
    return flows


def _spec(flow: tuple, reverse: bool, code: int, payload: bytes = b"",
          echo_seq: int = 0) -> build.FrameSpec:
    version, proto, client, server, cport, sport, _ = flow
    src, dst, sp, dp = (server, client, sport, cport) if reverse else (client, server, cport, sport)
    icmp = (129 if reverse else 128) if version == 6 else (0 if reverse else 8)
    if proto in (build.ICMP, build.ICMPV6):
        payload = struct.pack("!HH", 0x1234, echo_seq) + payload  # echo identifier, sequence
    return build.FrameSpec(ip_version=version, proto=proto, src=src, dst=dst, sport=sp, dport=dp,
                           tcp_flags=TCP_FLAGS.get(code, build.ACK), icmp_type=icmp,
                           payload=payload)


def _template(flow: tuple, reverse: bool, code: int) -> tuple:
    """The header-only inner frame of one (flow, direction, flags), built by collector.build
    (TCP sequence and acknowledgment numbers 0, ICMP echo sequence 0), with what a packet of
    any IP length needs patched: the ones' complement sums of the IPv4 header and of the L4
    checksum's coverage with the length fields and checksum zeroed (the payload is zeros, so
    it adds nothing; the numbers are added per packet), and the outer UDP source port."""
    spec = _spec(flow, reverse, code)
    head = build.mirrored_frame(spec).data
    v6 = spec.ip_version == 6
    l4 = 14 + (40 if v6 else 20)
    ip_base = 0 if v6 else _sum16(head[14:16] + b"\0\0" + head[18:24] + b"\0\0" + head[26:34])
    segment = bytearray(head[l4:])
    if spec.proto == build.TCP:
        segment[16:18] = b"\0\0"
    elif spec.proto == build.UDP:
        segment[4:8] = bytes(4)
    else:
        segment[2:4] = b"\0\0"
    src, dst = build._addr(spec.src), build._addr(spec.dst)
    if spec.proto == build.ICMP:
        l4_base = _sum16(bytes(segment))  # ICMPv4: no pseudo header
    else:
        l4_base = _sum16(src + dst + struct.pack("!BB", 0, spec.proto) + bytes(segment))
    five = struct.pack(f"!B{len(src)}s{len(dst)}sHH", spec.proto, src, dst, spec.sport, spec.dport)
    outer_port = 49152 + zlib.crc32(five) % 16384
    return (head, len(head) - 14, v6, spec.proto, l4, ip_base, l4_base, outer_port, flow[6])


def _plan(packets: int, flows: int, seed: int) -> dict:
    """Per-packet random draws, in flow order (flow, then position within the flow)."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.6, flows)  # heavy-tailed, the largest flow ~1% of packets
    counts = 1 + rng.multinomial(packets - flows, weights / weights.sum())
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
    flow = np.repeat(np.arange(flows), counts)
    start = rng.uniform(0, DURATION_S * 0.95, flows)
    u = rng.random(packets)
    return {
        "counts": counts, "offsets": offsets, "flow": flow,
        "pos": np.arange(packets) - offsets[flow],  # index of the packet within its flow
        "last": counts[flow] - 1, "start": start,
        "span": (DURATION_S - start) * rng.uniform(0.05, 1.0, flows),
        "u": u[np.lexsort((u, flow))],  # sorted within each flow
        "dir": rng.random(packets) < 0.5, "size_class": rng.choice(3, packets, p=SIZE_MIX),
        "small": rng.integers(40, 101, packets), "medium": rng.integers(552, 601, packets),
        "large": rng.integers(1400, 1501, packets), "cut": rng.random(packets) < CUT_FRACTION,
        "cut_len": rng.choice(CUTS, packets), "handshake": rng.random(flows) < 0.6,
        "isn": rng.integers(0, 1 << 32, (flows, 2)),
    }


def _tcp_numbers(p: dict, reverse, code, payload) -> tuple[np.ndarray, np.ndarray]:
    """Sequence and acknowledgment numbers: each side's ISN plus what it sent before (SYN
    and FIN count one), every packet acknowledging all the other side sent so far."""
    adv = payload + np.isin(code, (SYN, SYNACK)) + (code == FINACK)
    sent = []
    for side in (~reverse, reverse):
        own = np.where(side, adv, 0)
        before = np.cumsum(own) - own
        sent.append(before - before[p["offsets"]][p["flow"]])  # within the flow
    isn = p["isn"][p["flow"]]
    client, server = (isn[:, 0] + sent[0]) % (1 << 32), (isn[:, 1] + sent[1]) % (1 << 32)
    seq = np.where(reverse, server, client)
    ack = np.where(reverse, client, server)
    ack[code == SYN] = 0
    return seq, ack


def generate(directory: Path, packets: int, flows: int, seed: int) -> dict:
    """Write vxlan.pcap, plain.pcap and meta.json (what a correct ingest must report)."""
    rng = random.Random(seed)
    defs = _flows(flows, rng)
    p = _plan(packets, flows, seed)
    flow, pos, last = p["flow"], p["pos"], p["last"]
    flow_proto = np.array([f[1] for f in defs])
    proto, version = flow_proto[flow], np.array([f[0] for f in defs])[flow]
    is_tcp, is_udp = proto == build.TCP, proto == build.UDP
    icmp = ~is_tcp & ~is_udp
    handshake_flow = p["handshake"] & (p["counts"] > 5) & (flow_proto == build.TCP)
    handshake = handshake_flow[flow]
    # Times: spread over each flow's span; the handshake and the FIN exchange one 2 ms RTT
    # apart (the final ACK must come before collector's 2 s close linger), data between.
    eps = np.minimum(0.002 / p["span"], 0.1)[flow]
    u = np.where(handshake, 2 * eps + p["u"] * (1 - 4 * eps), p["u"])
    for where, value in ((pos == 0, 0), (pos == 1, eps), (pos == 2, 2 * eps),
                         (pos == last - 2, 1 - 2 * eps), (pos == last - 1, 1 - eps), (pos == last, 1)):
        u = np.where(handshake & where, value, u)
    t = p["start"][flow] + u * p["span"][flow]
    # direction and flags: handshake SYN, SYN-ACK, ACK ... FIN-ACK, FIN-ACK, ACK
    reverse = p["dir"].copy()
    code = np.full(packets, DATA)
    for where, rev, c in ((pos == 0, False, SYN), (pos == 1, True, SYNACK), (pos == 2, False, ACK),
                          (pos == last - 2, False, FINACK), (pos == last - 1, True, FINACK),
                          (pos == last, False, ACK)):
        sel = handshake & where
        reverse[sel], code[sel] = rev, c
    reverse[icmp] = (pos[icmp] % 2) == 1  # echo request, reply, request...
    size = np.choose(p["size_class"], (p["small"], p["medium"], p["large"]))
    size[is_tcp & (code != DATA)] = 0  # control segments: header only
    size[icmp] = p["small"][icmp]
    tcp_header = np.where(version == 6, 60, 40)
    seq, ack = _tcp_numbers(p, reverse, np.where(is_tcp, code, DATA),
                            np.where(is_tcp, np.maximum(size - tcp_header, 0), 0))
    echo_seq = (pos // 2 + 1) & 0xFFFF
    number_a = np.where(is_tcp, seq, np.where(icmp, echo_seq, 0))  # TCP seq / ICMP echo seq
    number_b = np.where(is_tcp, ack, 0)
    order = np.argsort(t, kind="stable")
    t_us = np.round(t * 1e6).astype(np.int64)
    cut = np.where(p["cut"], p["cut_len"], 0)

    templates: dict[int, tuple] = {}
    check = set(random.Random(seed + 1).sample(range(packets), min(packets, 300)))
    stats = {"bytes_ip": 0, "truncated": 0, "size_small": 0, "size_medium": 0, "size_large": 0}
    pack_outer, pack_rec, pack_into = _OUTER.pack, _RECORD.pack, struct.pack_into
    with (open(directory / "vxlan.pcap", "wb", buffering=1 << 22) as fv,
          open(directory / "plain.pcap", "wb", buffering=1 << 22) as fp):
        fv.write(_PCAP_HEADER)
        fp.write(_PCAP_HEADER)
        vx_parts, plain_parts = [], []
        columns = (flow[order].tolist(), reverse[order].tolist(), code[order].tolist(),
                   size[order].tolist(), cut[order].tolist(), t_us[order].tolist(),
                   number_a[order].tolist(), number_b[order].tolist())
        for i, (fid, rev, c, ip_size, cut_len, us, a, b) in enumerate(zip(*columns)):
            key = (fid << 4) | (rev << 3) | c
            tpl = templates.get(key)
            if tpl is None:
                tpl = templates[key] = _template(defs[fid], rev, c)
            head, head_ip, v6, l4proto, l4, ip_base, l4_base, outer_port, vni = tpl
            ip_len = ip_size if ip_size > head_ip else head_ip
            frame = bytearray(head)
            if v6:
                l4_len = ip_len - 40
                pack_into("!H", frame, 18, l4_len)
            else:
                l4_len = ip_len - 20
                pack_into("!H", frame, 16, ip_len)  # (pad bytes in a format would write zeros)
                pack_into("!H", frame, 24, _fold(ip_base + ip_len))
            if l4proto == build.TCP:
                pack_into("!II", frame, l4 + 4, a, b)
                pack_into("!H", frame, l4 + 16, _fold(l4_base + l4_len + (a >> 16) + (a & 0xFFFF)
                                                      + (b >> 16) + (b & 0xFFFF)))
            elif l4proto == build.UDP:
                pack_into("!HH", frame, l4 + 4, l4_len, _fold(l4_base + 2 * l4_len) or 0xFFFF)
            elif l4proto == build.ICMPV6:
                pack_into("!H", frame, l4 + 2, _fold(l4_base + l4_len + a))
                pack_into("!H", frame, l4 + 6, a)
            else:
                pack_into("!H", frame, l4 + 2, _fold(l4_base + a))
                pack_into("!H", frame, l4 + 6, a)
            frame = bytes(frame) + _ZEROS[: ip_len - head_ip]
            wire = len(frame)
            if cut_len:
                frame = build.truncate(frame, cut_len)
                stats["truncated"] += len(frame) < wire
            n = len(frame)
            ident = i & 0xFFFF
            total = 36 + n
            outer = pack_outer(_OUTER_ETH, 0x4500, total, ident, 0, (OUTER_TTL << 8) | 17,
                               _fold(_OUTER_BASE + total + ident),
                               _OUTER_SRC_PACKED, _OUTER_DST_PACKED, outer_port, build.VXLAN_PORT,
                               16 + n, 0, 0x08000000, vni << 8)
            sec, usec = divmod(us, 1_000_000)
            vx_parts += (pack_rec(START + sec, usec, _OUTER_LEN + n, _OUTER_LEN + n), outer, frame)
            plain_parts += (pack_rec(START + sec, usec, n, wire), frame)
            stats["bytes_ip"] += ip_len
            stats["size_small" if ip_len <= 100 else "size_medium" if ip_len <= 600 else "size_large"] += 1
            if i in check:
                _check(defs[fid], rev, c, ip_len - head_ip, a, b, cut_len, i, outer_port, outer + frame)
            if len(vx_parts) >= 3 * 65536:
                fv.write(b"".join(vx_parts))
                fp.write(b"".join(plain_parts))
                vx_parts.clear()
                plain_parts.clear()
        fv.write(b"".join(vx_parts))
        fp.write(b"".join(plain_parts))

    # What a correct ingest reports. A copy cut to 25 bytes has no addresses: collector
    # meters it in the flow of its (VNI, IP version, protocol) with NULL endpoints.
    cut25 = cut == 25
    whole_flows = len(np.unique(flow[~cut25]))
    vni_of = np.array([f[6] for f in defs])[flow]
    anon_vxlan = len({*zip(vni_of[cut25].tolist(), version[cut25].tolist(), proto[cut25].tolist())})
    anon_plain = len({*zip(version[cut25].tolist(), proto[cut25].tolist())})
    meta = {
        "packets": packets, "flows": flows, "seed": seed, "generator": GENERATOR,
        "ipv6_packets": int((version == 6).sum()), "ipv6_flows": sum(f[0] == 6 for f in defs),
        "tcp_packets": int(is_tcp.sum()), "udp_packets": int(is_udp.sum()),
        "icmp_packets": int(icmp.sum()),
        "handshake_flows": int(handshake_flow.sum()),
        "cut_copies": int(p["cut"].sum()), "truncated_copies": stats["truncated"],
        "ip_bytes": stats["bytes_ip"],
        "size_mix": {k[5:]: stats[k] for k in ("size_small", "size_medium", "size_large")},
        "largest_flow_packets": int(p["counts"].max()),
        "expected_flow_rows": {"vxlan": whole_flows + anon_vxlan, "plain": whole_flows + anon_plain},
        "templates": len(templates),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


_OUTER_SRC_PACKED, _OUTER_DST_PACKED = build._addr(OUTER_SRC), build._addr(OUTER_DST)


def _check(flow, rev, code, payload_len, a, b, cut_len, ident, outer_port, produced) -> None:
    """A patched template must equal what collector.build makes from scratch."""
    spec = _spec(flow, rev, code, bytes(payload_len), echo_seq=a)
    if spec.proto == build.TCP:  # mirrored_frame has no sequence numbers: the layers do
        l4 = build.tcp(spec.payload, sport=spec.sport, dport=spec.dport, flags=spec.tcp_flags,
                       seq=a, ack=b, ip_src=spec.src, ip_dst=spec.dst)
        if spec.ip_version == 6:
            frame = build.ethernet(build.ipv6(l4, src=spec.src, dst=spec.dst), ethertype=build.ETH_IPV6)
        else:
            frame = build.ethernet(build.ipv4(l4, src=spec.src, dst=spec.dst))
    else:
        frame = build.mirrored_frame(spec).data
    if cut_len:
        frame = build.truncate(frame, cut_len)
    datagram = build.udp(build.vxlan(frame, vni=flow[6]), sport=outer_port, dport=build.VXLAN_PORT)
    expected = build.ethernet(build.ipv4(datagram, src=OUTER_SRC, dst=OUTER_DST, proto=build.UDP,
                                         ttl=OUTER_TTL, ident=ident & 0xFFFF),
                              src=OUTER_SRC_MAC, dst=OUTER_DST_MAC)
    if expected != produced:
        first = next(k for k in range(len(expected)) if k >= len(produced) or expected[k] != produced[k])
        raise AssertionError(f"generated packet {ident} differs from collector.build's at byte "
                             f"{first}: flow {flow}, reverse {rev}, flags code {code}")


def captures(cache: Path, packets: int, flows: int) -> tuple[Path, dict]:
    """The generated captures' directory (generated now unless cached) and their meta."""
    directory = cache / f"n{packets}-f{flows}-s{SEED}-g{GENERATOR}"
    meta_path = directory / "meta.json"
    if meta_path.exists():
        print(f"captures: cached in {directory}")
        return directory, json.loads(meta_path.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=directory.name + ".partial-", dir=cache))
    started = time.perf_counter()
    try:
        meta = generate(partial, packets, flows, SEED)
        os.replace(partial, directory)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"captures: generated in {time.perf_counter() - started:.1f} s into {directory}")
    return directory, meta


# -- measuring ------------------------------------------------------------------------------------


def collector_command() -> list[str]:
    """`collector` of this tree (PYTHONPATH set by `_env`), whatever the venv installed."""
    return [sys.executable, "-m", "collector"]


def _env() -> dict:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def measure(cmd: list[str], out: Path) -> tuple[float, float, str, str]:
    """Run `cmd` as a fresh process: (wall seconds, peak RSS MiB, stdout, stderr)."""
    with open(out.with_suffix(".out"), "wb") as so, open(out.with_suffix(".err"), "wb") as se:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, stdin=subprocess.DEVNULL, env=_env())
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = out.with_suffix(".out").read_text(errors="replace")
    stderr = out.with_suffix(".err").read_text(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024, stdout, stderr


def verify_collector(data: Path, meta: dict, kind: str) -> dict:
    sql = ("SELECT count(*) AS flows, sum(packets + rev_packets) AS packets, "
           "sum(truncated_packets + rev_truncated_packets) AS truncated FROM flows")
    result = subprocess.run([*collector_command(), "query", "--data", str(data), sql,
                             "--format", "csv"], capture_output=True, text=True, check=True,
                            env=_env())
    row = {k: int(v) for k, v in next(csv.DictReader(io.StringIO(result.stdout))).items()}
    expected = {"flows": meta["expected_flow_rows"][kind], "packets": meta["packets"],
                "truncated": meta["truncated_copies"]}
    if row != expected:
        sys.exit(f"collector ingest of the {kind} capture wrote {row}, expected {expected}")
    return row


def tshark_conversations(stdout: str) -> tuple[int, int, int]:
    """(conversations, their total frames, frames of the outer 10.0.1.10 <-> 10.0.2.20
    conversation) of `-z conv,ip` output."""
    conversations = frames = outer = 0
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "<->":
            conversations += 1
            # address <-> address | frames bytes | frames bytes | total frames, bytes | ...
            # (bytes may print with a unit: "1,234 kB")
            numbers = [f for f in fields[3:] if f.replace(",", "").isdigit()]
            total = int(numbers[4].replace(",", "")) if len(numbers) > 4 else 0
            frames += total
            if {fields[0], fields[2]} == {OUTER_SRC, OUTER_DST}:
                outer = total
    return conversations, frames, outer


def machine_info() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "?")
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    import duckdb
    import pyarrow
    try:
        tshark = subprocess.run(["tshark", "--version"], capture_output=True, text=True).stdout
        tshark = tshark.splitlines()[0]
    except OSError:
        tshark = "not installed"
    return [
        f"cpu: {model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
        f"{int(mem) / 1024 / 1024:.1f} GiB RAM, {platform.system()} {platform.release()}",
        f"python {platform.python_version()}, numpy {np.__version__}, duckdb {duckdb.__version__}, "
        f"pyarrow {pyarrow.__version__}, collector {collector.__version__}",
        f"tshark: {tshark}",
        "load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
    ]


def stages(path: Path, meta: dict) -> None:
    """Where the time goes without a profiler's per-call overhead: the same capture read,
    peeled, batched, decoded, and ingested whole, each pass timed once."""
    from collector.capture import read_capture
    from collector.decode import decode_batch
    from collector.decode.outer import outer_datagram
    from collector.flows import FlowConfig
    from collector.ingest import ingest
    from collector.pipeline import Pipeline

    try:  # private helpers of collector.ingest: the split is skipped if they change
        from collector.ingest import HEADER_SLOT, IngestResult, _route, _Slots
    except ImportError as err:
        print(f"stage split unavailable ({err})")
        return

    def read():
        for _ in read_capture(path):
            pass

    def peel():
        for record in read_capture(path):
            outer_datagram(record.linktype, record.data)

    def batches(decode: bool):
        def run():
            slots = {port: _Slots(port, HEADER_SLOT) for port in (4789, 4790, 6081)}
            result = IngestResult()
            for record in read_capture(path):
                full = _route(record, slots, b"\x08" + bytes(7), True, result)
                if full is not None:
                    if decode:
                        decode_batch(full.buf, full.lengths, full.port)
                    full.rows = 0
        return run

    def whole():
        with tempfile.TemporaryDirectory(prefix="bench-ingest-stages-") as tmp:
            ingest([path], Pipeline(tmp, collector_id="bench", flow_config=FlowConfig()))

    print(f"\nstages, in this process, no profiler ({path.name}, {meta['packets']:,} packets; "
          "each pass once, so as noisy as the machine):")
    previous = 0.0
    for label, run in (("read_capture: records", read),
                       ("+ outer_datagram: peel Ethernet/IPv4/UDP", peel),
                       ("+ _route into receive slots (instead of peeling alone)", batches(False)),
                       ("+ decode_batch", batches(True)),
                       ("+ flow table, rows, Parquet: the whole ingest", whole)):
        try:
            started = time.perf_counter()
            run()
            elapsed = time.perf_counter() - started
        except TypeError as err:  # a changed private signature
            print(f"  {label}: unavailable ({err})")
            continue
        print(f"  {label:58s} {elapsed:7.2f} s  (+{elapsed - previous:6.2f} s, "
              f"{(elapsed - previous) / meta['packets'] * 1e6:5.2f} us/packet)")
        previous = elapsed


def profile(path: Path, meta: dict) -> None:
    from collector.flows import FlowConfig
    from collector.ingest import ingest
    from collector.pipeline import Pipeline

    stages(path, meta)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-profile-") as tmp:
        pipeline = Pipeline(tmp, collector_id="bench", flow_config=FlowConfig())
        prof = cProfile.Profile()
        started = time.perf_counter()
        prof.enable()
        result = ingest([path], pipeline)
        prof.disable()
        elapsed = time.perf_counter() - started
        assert result.records == meta["packets"], result
    print(f"\nprofile: ingest of {path.name} in this process under cProfile: {elapsed:.1f} s "
          f"({result.records / elapsed:,.0f} packets/s; cProfile slows per-call code)")
    stream = io.StringIO()
    stats = pstats.Stats(prof, stream=stream)
    stats.sort_stats("cumulative").print_stats(25)
    stats.sort_stats("tottime").print_stats(15)
    print(re.sub(r"\n{3,}", "\n\n", stream.getvalue().replace(str(ROOT) + "/", "")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--flows", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per row (0: none)")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="keep the datasets the last collector runs wrote in DIR")
    parser.add_argument("--cache", metavar="DIR", type=Path, default=DEFAULT_CACHE,
                        help="where generated captures are cached (default: %(default)s)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one in-process ingest of the VXLAN capture")
    args = parser.parse_args()
    if not 1 <= args.flows <= args.packets:
        parser.error("need 1 <= --flows <= --packets")
    print_header("ingest: collector ingest vs tshark conv,ip and NFStream")
    for line in machine_info():
        print(line)
    directory, meta = captures(args.cache, args.packets, args.flows)
    inputs = {"vxlan": directory / "vxlan.pcap", "plain": directory / "plain.pcap"}
    print(f"input: {meta['packets']:,} packets, {meta['flows']:,} flows "
          f"({meta['handshake_flows']:,} TCP with handshake and FIN; largest "
          f"{meta['largest_flow_packets']:,} packets), IPv6 {meta['ipv6_packets'] / meta['packets']:.1%}, "
          f"TCP/UDP/ICMP packets {meta['tcp_packets']:,}/{meta['udp_packets']:,}/{meta['icmp_packets']:,}, "
          f"IP sizes <=100/<=600/>600 B {'/'.join(f'{v:,}' for v in meta['size_mix'].values())}, "
          f"{meta['cut_copies']:,} copies cut to 25/64 B ({meta['truncated_copies']:,} truncated)")
    for kind, path in inputs.items():
        print(f"  {kind}: {path} ({path.stat().st_size / 2**20:,.0f} MiB); collector must write "
              f"{meta['expected_flow_rows'][kind]:,} flow rows")

    if args.runs > 0:
        run_table(args, meta, inputs)
    if args.profile:
        profile(inputs["vxlan"], meta)


def compile_tree() -> None:
    """Byte-compile this tree's package, as pip does when it installs one: a tree edited since
    its last run, or run with PYTHONDONTWRITEBYTECODE=1 (which this script passes on to its
    children), would otherwise compile its sources at every start of `collector ingest`
    (up to 75 ms of a 1,000,000-packet run), which no installed collector does."""
    import compileall

    if not compileall.compile_dir(ROOT / "collector", quiet=1):
        print("note: byte-compiling collector/ failed; the runs include compiling it")


def run_table(args, meta: dict, inputs: dict[str, Path]) -> None:
    compile_tree()
    tools = ["collector ingest"]
    if ensure_apt("tshark"):
        tools.append("tshark conv,ip")
    else:
        print("tshark unavailable: its rows are skipped")
    rows = {(tool, kind): [] for kind in inputs for tool in tools}
    if ensure_pip("nfstream"):
        rows[("nfstream", "plain")] = []
    else:
        print("NFStream unavailable: its row is skipped")
    nfstream_seen = {}
    own = {kind: [] for kind in inputs}
    checked, tshark_seen = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp = Path(tmp)
        for run in range(args.runs):
            for (tool, kind) in rows:
                path = inputs[kind]
                if tool == "collector ingest":
                    data = tmp / f"data-{kind}-{run}"
                    cmd = [*collector_command(), "ingest", str(path), "--data", str(data),
                           "--collector-id", "bench"]
                elif tool == "nfstream":
                    cmd = [sys.executable, "-c", NFSTREAM, str(path)]
                else:
                    cmd = ["tshark", "-r", str(path), "-q", "-z", "conv,ip"]
                wall, rss, stdout, stderr = measure(cmd, tmp / f"{kind}-{run}")
                rows[(tool, kind)].append((wall, rss))
                if tool == "collector ingest":
                    checked[kind] = verify_collector(data, meta, kind)
                    found = re.search(r"in ([\d.]+) s", stderr)
                    own[kind].append(float(found.group(1)) if found else float("nan"))
                    if args.keep is not None and run == args.runs - 1:
                        args.keep.mkdir(parents=True, exist_ok=True)
                        shutil.rmtree(args.keep / f"data-{kind}", ignore_errors=True)
                        shutil.move(data, args.keep / f"data-{kind}")
                    else:
                        shutil.rmtree(data)
                elif tool == "nfstream":
                    nfstream_seen[kind] = stdout.strip()
                else:
                    tshark_seen[kind] = tshark_conversations(stdout)
                    if kind == "vxlan" and tshark_seen[kind][2] != meta["packets"]:
                        sys.exit(f"tshark saw {tshark_seen[kind][2]} mirror datagrams, expected "
                                 f"{meta['packets']}:\n{stdout[-2000:]}")
                print(f"  run {run + 1}/{args.runs} {tool:17s} {kind:5s} {wall:7.2f} s "
                      f"{rss:7.0f} MiB", flush=True)
    for kind, row in checked.items():
        print(f"checked ({kind}): collector wrote {row['flows']:,} flows counting {row['packets']:,} "
              f"packets ({row['truncated']:,} truncated) == expected")
    for kind, (conversations, frames, outer) in tshark_seen.items():
        print(f"tshark ({kind}): {conversations:,} IPv4 conversations, {frames:,} frames in them "
              f"(IPv4 only; each IP layer counts)"
              + (f", {outer:,} in the outer {OUTER_SRC} <-> {OUTER_DST} one == expected" if outer else ""))
    for kind, line in nfstream_seen.items():
        print(f"NFStream ({kind}): {line}")
    for kind, values in own.items():
        print(f"collector's own timer ({kind}, without interpreter start and imports): "
              f"{statistics.median(values):.2f} s")
    n = meta["packets"]
    print(f"\nmedians of {args.runs} runs, {n:,} packets")
    print(f"{'tool':18s} {'input':28s} {'packets':>10s} {'seconds':>8s} {'packets/s':>10s} "
          f"{'peak RSS MiB':>12s} {'time vs collector':>17s}")
    rates = {}
    for kind in inputs:
        base = statistics.median(w for w, _ in rows[("collector ingest", kind)])
        for tool in ("collector ingest", "tshark conv,ip", "nfstream"):
            if (tool, kind) not in rows:
                continue
            wall = statistics.median(w for w, _ in rows[(tool, kind)])
            rss = statistics.median(r for _, r in rows[(tool, kind)])
            label = "VXLAN (appliance capture)" if kind == "vxlan" else "plain twin (inner frames)"
            print(f"{tool:18s} {label:28s} {n:10,d} {wall:8.2f} {n / wall:10,.0f} {rss:12.0f} "
                  f"{wall / base:16.2f}x")
            rates[(tool, kind)] = n / wall
    ours = rates[("collector ingest", "vxlan")]
    print(f"\ntargets (issue 6): collector ingest VXLAN {ours:,.0f} packets/s "
          f"({'met' if ours >= 1e6 else 'NOT met'}: >= 1,000,000)")
    if ("nfstream", "plain") in rates:
        ratio = ours / rates[("nfstream", "plain")]
        print(f"  vs NFStream on the plain twin: {ratio:.1f}x ({'met' if ratio >= 5 else 'NOT met'}"
              f": >= 5x); like for like, collector ingest of the plain twin: "
              f"{rates[('collector ingest', 'plain')] / rates[('nfstream', 'plain')]:.1f}x")
    if ("tshark conv,ip", "vxlan") in rates:
        ratio = ours / rates[("tshark conv,ip", "vxlan")]
        print(f"  vs tshark on the VXLAN capture: {ratio:.1f}x "
              f"({'met' if ratio >= 25 else 'NOT met'}: >= 25x)")
    print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
