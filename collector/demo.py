"""`make demo`: the appliance end to end on this machine, in a few seconds.

    python -m collector.demo [--data DIR]

1. starts `collector serve` on free loopback ports (`collector.testing.CollectorServer`: one
   worker, --control, the sessions of fixtures/sessions/demo/sessions.json);
2. replays fixtures/full-session.pcap as captured (an appliance capture: sessions VNI 42 and
   43, whole packets) and fixtures/plain-mixed.pcap as the session tms-0c44f5a2e3EXAMPLE
   sends it (VNI 44, PacketLength 64: copies cut to at most 64 bytes), as fast as possible;
3. flushes (POST /flush), then asks the dataset for the top talkers of each session;
4. stops the server (SIGTERM: it exits 0 once every flow is written).

With --data DIR the dataset stays in DIR for `collector query --data DIR ...`; else it is
written to a temporary directory, removed at the end. Needs a source checkout (the fixtures).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SESSIONS = "sessions/demo/sessions.json"  # apart: tests merge sessions/*.json
APPLIANCE_CAPTURE = "full-session.pcap"  # VXLAN datagrams as an appliance captured them
PLAIN_CAPTURE = "plain-mixed.pcap"  # packets as captured on the instance
TRUNCATED_SESSION = "tms-0c44f5a2e3EXAMPLE"  # VNI 44, PacketLength 64

TOP_TALKERS = """\
WITH talkers AS (
    SELECT session_id, src_addr, dst_addr, sum(packets + rev_packets) AS packets,
           sum(bytes + rev_bytes) AS bytes,
           sum(truncated_packets + rev_truncated_packets) AS truncated_packets
    FROM flows GROUP BY ALL)
SELECT * FROM talkers
QUALIFY row_number() OVER (PARTITION BY session_id ORDER BY bytes DESC, src_addr, dst_addr) <= 3
ORDER BY session_id, bytes DESC, src_addr, dst_addr"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collector.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", metavar="DIR", type=Path,
                        help="keep the dataset in DIR (default: a temporary directory)")
    parser.add_argument("--fixtures", metavar="DIR", type=Path, default=FIXTURES,
                        help="the fixtures directory of a source checkout  [default: %(default)s]")
    args = parser.parse_args(argv)
    fixtures = args.fixtures
    needed = [fixtures / SESSIONS, fixtures / APPLIANCE_CAPTURE, fixtures / PLAIN_CAPTURE]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        print(f"demo: missing {', '.join(missing)} (the demo runs from a source checkout)",
              file=sys.stderr)
        return 2

    from collector.query import connect
    from collector.query.output import run, write
    from collector.sessions import SessionRegistry
    from collector.testing import CollectorServer

    registry = SessionRegistry.load([fixtures / SESSIONS])
    truncated = registry.by_session_id(TRUNCATED_SESSION)
    workdir = Path(tempfile.mkdtemp(prefix="collector-demo-"))
    server = CollectorServer(workdir, sessions=[fixtures / SESSIONS])
    try:
        print(f"$ collector serve --control --workers 1 --sessions fixtures/{SESSIONS} ...")
        server.start()
        print(f"  VXLAN {_show(server.vxlan)}, GENEVE {_show(server.geneve)}, "
              f"health and metrics http://{_show(server.health)}/healthz, /metrics")
        for session in registry:
            length = ("whole packets" if session.packet_length is None
                      else f"PacketLength {session.packet_length}")
            print(f"  session {session.session_id}: VNI {session.vni}, {length}")

        print(f"\n$ collector replay fixtures/{APPLIANCE_CAPTURE} --as-captured --topspeed")
        summary = server.replay(fixtures / APPLIANCE_CAPTURE, as_captured=True)
        print(f"  {summary.packets} datagrams (VNIs 42 and 43, whole), {summary.flows} flows")
        print(f"\n$ collector replay fixtures/{PLAIN_CAPTURE} --sessions "
              f"fixtures/{SESSIONS} --session-id {TRUNCATED_SESSION} --topspeed")
        summary = server.replay(fixtures / PLAIN_CAPTURE, vni=truncated.vni,
                                packet_length=truncated.packet_length)
        print(f"  {summary.packets} datagrams (VNI {truncated.vni}), {summary.truncated} cut to "
              f"{truncated.packet_length} bytes, {summary.flows} flows")

        metrics = server.flush()
        print(f"\n$ curl -X POST http://{_show(server.health)}/flush")
        print(f"  {metrics.value('collector_datagrams_received_total'):.0f} datagrams "
              f"received, {metrics.value('collector_kernel_drops_total'):.0f} dropped, "
              f"{metrics.value('collector_truncated_copies_total'):.0f} truncated copies; "
              "every flow written")

        sql = TOP_TALKERS.replace("\n", "\n    ")
        print(f"\nTop talkers per session:\n$ collector query \"{sql}\"")
        con = connect(server.data_dir)
        try:
            write(run(con, TOP_TALKERS), "table")
        finally:
            con.close()

        server.stop()
        print(f"\n$ kill -TERM {server.pid}\n  collector serve exited with {server.returncode}")
        if args.data is not None:
            _keep(server.data_dir, args.data)
            print(f"\nThe dataset is in {args.data}: collector query --data {args.data} "
                  "\"SELECT * FROM flows\"")
        return 0
    except Exception as err:  # noqa: BLE001 - one line for the user, the log for the rest
        server.kill()
        sys.stdout.flush()
        print(f"\ndemo: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _show(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _keep(data: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for path in data.iterdir():
        target = destination / path.name
        if target.exists():
            shutil.copytree(path, target, dirs_exist_ok=True)
            shutil.rmtree(path)
        else:
            shutil.move(str(path), target)


if __name__ == "__main__":
    sys.exit(main())
