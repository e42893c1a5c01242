"""Command-line interface: a thin layer over the library.

Each command parses its options, calls one library function and prints. Domain errors become
`click.ClickException` here and nowhere else.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import socket
import sys
import time

import click

from collector import __version__
from collector.capture import CaptureError
from collector.sessions import SessionRegistry, SessionsError

# A command imports the modules it needs when it runs (numpy, pyarrow and the decoders are
# most of a short `collector ingest`'s start-up): `import collector.cli` loads click alone.


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="collector")
def main() -> None:
    """collector: every mirrored flow from AWS VPC Traffic Mirroring, correct, in SQL."""
    # collector does no linear algebra; numpy's OpenBLAS would start a thread per core at
    # import, spinning for a while (60-100 ms of CPU per process on 2 cores, taken from the
    # ingest or the receive loop). Set before any command imports numpy; a user's own
    # setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@contextlib.contextmanager
def _importing():
    """Imports allocate tens of thousands of objects and free almost none; the cyclic
    garbage collector would walk them again and again while they load (25 ms of a
    1,000,000-packet ingest): it is paused for the imports, and resumed after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@main.command("sessions")
@click.option(
    "--sessions",
    "session_files",
    metavar="FILE",
    multiple=True,
    help="A JSON file saved from the AWS CLI. Repeat it, or list more files after it.",
)
@click.argument("files", nargs=-1, metavar="[FILE]...")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="An aligned table, or a JSON list of the sessions.",
)
def sessions_command(
    session_files: tuple[str, ...], files: tuple[str, ...], output_format: str
) -> None:
    """List the Traffic Mirror sessions the appliance knows, by VNI.

    Each FILE is the JSON output of `aws ec2 describe-traffic-mirror-sessions` (one page, a JSON
    list of pages, or a list of sessions) or `create-traffic-mirror-session`. Outputs of
    `describe-traffic-mirror-targets` and `describe-traffic-mirror-filters` may be given too:
    they add each session's target type and filter rules. Files may come in any mix and order,
    after one `--sessions` or each after its own.

    \b
    Example:
      collector sessions --sessions sessions.json targets.json filters.json
    """
    paths = (*session_files, *files)
    if not paths:
        raise click.UsageError("no files given: pass at least one with --sessions FILE")
    try:
        registry = SessionRegistry.load(paths)
    except SessionsError as e:
        raise click.ClickException(str(e)) from e
    click.echo(registry.to_json() if output_format == "json" else registry.to_table())


@main.command("decode")
@click.argument(
    "captures", nargs=-1, required=True, metavar="CAPTURE...",
    type=click.Path(exists=True, dir_okay=False),
)
@click.option(
    "--sessions",
    "session_files",
    metavar="FILE",
    multiple=True,
    help="AWS CLI JSON naming the sessions (as for `collector sessions`); repeat for more.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "jsonl"]),
    default="table",
    show_default=True,
    help="A line per datagram, or a JSON object per line with every decoded field.",
)
@click.option(
    "--limit", type=click.IntRange(min=0), metavar="N", help="Stop after N mirror datagrams."
)
def decode_command(
    captures: tuple[str, ...], session_files: tuple[str, ...], output_format: str,
    limit: int | None,
) -> None:
    """Decode the mirror datagrams in pcap/pcapng captures, one line each.

    Every datagram to UDP 4789 (VXLAN), 4790 (VXLAN-GPE) or 6081 (GENEVE, as a Gateway Load
    Balancer delivers) is decoded as the listener would decode it. Columns: record number
    (from 1, as tshark numbers frames), time (UTC), encapsulation, VNI, the session id (with
    --sessions; `-` when no file names the VNI), inner source → destination, protocol, TCP
    flags (F S R P A U E C N; `.` for none), the inner IP packet's length on the wire, the
    bytes of the inner frame AWS sent, `T` when AWS truncated the copy, and for a datagram
    that is not a mirrored packet the reason. With several captures each line starts with
    the file name. A summary of what was read goes to stderr.

    \b
    Example:
      collector decode --sessions sessions.json capture.pcap
    """
    from collector.datagrams import Stats, decode_capture, format_line, header_line, to_json

    registry = None
    if session_files:
        try:
            registry = SessionRegistry.load(session_files)
        except SessionsError as e:
            raise click.ClickException(str(e)) from e
    stats = Stats()
    width = max(map(len, captures)) if len(captures) > 1 else 0  # the FILE column
    if output_format == "table":
        click.echo(_file_column("FILE", width) + header_line(registry is not None))
    datagrams = ((path, d) for path in captures for d in decode_capture([path], stats))
    try:
        for path, decoded in itertools.islice(datagrams, limit):
            session_id = _session_id(registry, decoded.packet)
            if output_format == "jsonl":
                obj = {"file": path, **to_json(decoded)}
                if registry is not None:
                    obj["session_id"] = session_id
                click.echo(json.dumps(obj))
            else:
                column = None if registry is None else session_id or "-"
                click.echo(_file_column(path, width) + format_line(decoded, column))
    except CaptureError as e:
        raise click.ClickException(str(e)) from e
    finally:
        click.echo(stats.summary(), err=True)


def _file_column(text: str, width: int) -> str:
    return f"{text:<{width}}  " if width else ""


def _session_id(registry: SessionRegistry | None, packet) -> str | None:
    """The id of the session whose VNI the packet carries; None when unknown."""
    from collector.decode import Malformed

    if registry is None or isinstance(packet, Malformed) or packet.vni is None:
        return None
    session = registry.lookup(packet.vni)
    return None if session is None else session.session_id


def _registry(files: tuple[str, ...]) -> SessionRegistry | None:
    if not files:
        return None
    try:
        return SessionRegistry.load(files)
    except SessionsError as e:
        raise click.ClickException(str(e)) from e


def _default_collector_id() -> str:
    name = socket.gethostname().split(".")[0] or "collector"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


@main.command("ingest")
@click.argument("captures", nargs=-1, required=True, metavar="CAPTURE...",
                type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_dir", default="data", show_default=True, metavar="DIR|s3://...",
              type=click.Path(file_okay=False),
              help="The dataset to add flows to: a directory or s3://bucket/prefix.")
@click.option("--spool", metavar="DIR", type=click.Path(file_okay=False),
              help="With --data s3://...: where files wait to upload.  [default: spool-<collector id>]")
@click.option("--upload-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              metavar="S", help="With --data s3://...: give up uploading after S seconds (files stay in the spool).")
@click.option("--sessions", "session_files", metavar="FILE", multiple=True,
              help="AWS CLI JSON naming the sessions (as for `collector sessions`); repeat for more.")
@click.option("--vni", type=click.IntRange(0, 2**24 - 1), metavar="N",
              help="Record packets that are not mirror datagrams under this VNI (else NULL).")
@click.option("--collector-id", default=None, metavar="ID",
              help="Written into every row and file name.  [default: host name]")
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, metavar="S", help="End a flow after S seconds without packets.")
@click.option("--active-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, metavar="S", help="Cut longer flows into S-second rows.")
@click.option("--max-flows", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              metavar="N", help="Active flows kept; past it the least recently seen end early.")
@click.option("--packets", is_flag=True, help="Also write the packets table.")
@click.option("--packet-bytes", type=click.IntRange(0, 9000), default=128, show_default=True,
              metavar="N", help="With --packets: bytes of each mirrored frame to keep.")
def ingest_command(captures, data_dir, spool, upload_timeout, session_files, vni, collector_id, idle_timeout,
                   active_timeout, max_flows, packets, packet_bytes) -> None:
    """Meter the packets of pcap/pcapng captures into the flows dataset.

    A UDP 4789 / 4790 / 6081 datagram is a mirrored copy (a capture taken on an appliance) and
    is decapsulated; any other packet is itself a mirrored packet, recorded under --vni.
    Timestamps come from the capture. A cut or corrupt capture stops with its file name and
    byte offset, after what was read before it has been written.

    \b
    Example:
      collector ingest capture.pcap --sessions sessions.json --data data
      collector query --data data "SELECT src_addr, sum(bytes) FROM flows GROUP BY 1"
    """
    with _importing():
        from collector.flows import FlowConfig
        from collector.ingest import ingest
        from collector.pipeline import Pipeline

    registry = _registry(session_files)
    collector_id = collector_id or _default_collector_id()
    store = None
    if data_dir.startswith("s3://"):  # files completed in the spool, then uploaded
        store, data_dir = _store_url(data_dir), spool or f"spool-{collector_id}"
    pipeline = Pipeline(
        data_dir, collector_id=collector_id, registry=registry,
        flow_config=FlowConfig(idle_timeout=idle_timeout, active_timeout=active_timeout,
                               max_flows=max_flows),
        packets=packets, packet_bytes=packet_bytes)
    started = time.monotonic()
    total = sum(os.path.getsize(path) for path in captures)
    show = sys.stderr.isatty()
    with click.progressbar(length=total, label="ingesting", file=sys.stderr,
                           hidden=not show) as bar:
        try:
            result = ingest(captures, pipeline, vni=vni, progress=bar.update)
        except CaptureError as e:
            if store:
                _upload_spool(data_dir, store, upload_timeout)
            raise click.ClickException(f"{e} (everything before it was written to "
                                       f"{store or data_dir})") from e
    elapsed = time.monotonic() - started
    c = pipeline.counters
    malformed = sum(c.malformed.values())
    click.echo(
        f"{result.records} packets from {result.files} file(s) in {elapsed:.2f} s "
        f"({result.records / elapsed if elapsed else 0:,.0f} packets/s): "
        f"{result.mirror_datagrams} mirror datagrams, {result.plain_packets} plain packets, "
        f"{result.skipped} skipped; {c.decoded} decoded, {malformed} malformed, "
        f"{c.truncated} truncated copies; {c.flows_exported} flows in "
        f"{pipeline.flow_writer.stats.files} file(s) under {data_dir}", err=True)
    if store:
        _upload_spool(data_dir, store, upload_timeout)


def _store_url(text: str) -> str:
    from collector.store.objectstore import StoreURL, StoreURLError

    try:
        return str(StoreURL.parse(text))
    except StoreURLError as e:
        raise click.BadParameter(str(e), param_hint="--data") from None


def _upload_spool(spool: str, store: str, timeout: float) -> None:
    """Upload every file of the spool (this run's and any an earlier run left) to `store`."""
    from collector.store.objectstore import StoreURLError, Uploader

    try:
        uploader = Uploader(spool, store)
    except StoreURLError as e:
        raise click.ClickException(str(e)) from None
    left = uploader.drain(timeout)
    uploader.close()
    if left:
        raise click.ClickException(
            f"{left} file(s) not uploaded to {store} ({uploader.stats.last_error}); they stay in "
            f"{spool}, uploaded by the next `collector ingest` or `serve` with this spool")
    click.echo(f"{uploader.stats.files_uploaded} file(s), {uploader.stats.bytes_uploaded} bytes "
               f"uploaded to {store}", err=True)


@main.command("query")
@click.argument("sql")
@click.option("--data", "data_dir", default="data", show_default=True, metavar="DIR|s3://...",
              type=click.Path(file_okay=False), help="The dataset to query: a directory or s3://bucket/prefix.")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json", "parquet"]),
              default="table", show_default=True, help="How to write the result.")
@click.option("--output", metavar="FILE", help="Write to FILE instead of standard output.")
def query_command(sql, data_dir, output_format, output) -> None:
    """Run SQL over the dataset with DuckDB.

    Views: flows, packets, sessions, conversations (flow segments merged per conversation) and
    vpc_flow_logs (AWS VPC Flow Logs field names, one row per direction). CIDR tests:
    `src_addr::INET <<= '10.0.0.0/16'::INET` or `in_cidr(src_addr, '10.0.0.0/16')`.

    \b
    Example:
      collector query "SELECT src_addr, dst_addr, sum(bytes + rev_bytes) AS bytes
                       FROM flows GROUP BY ALL ORDER BY bytes DESC LIMIT 10"
    """
    from collector.query import QueryError, connect
    from collector.query.output import run, write

    try:
        write(run(connect(data_dir), sql), output_format, output)
    except QueryError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)


@main.command("compact")
@click.option("--data", "data_dir", default="data", show_default=True, metavar="DIR|s3://...",
              help="The dataset: a directory or s3://bucket/prefix.")
@click.option("--table", type=click.Choice(["flows", "packets", "sessions", "all"]), default="all",
              show_default=True, help="The table to compact.")
@click.option("--older-than", type=click.FloatRange(min=0), default=1.0, show_default=True,
              metavar="HOURS", help="Compact an hour only once its end is HOURS in the past.")
@click.option("--target-rows", type=click.IntRange(min=1), default=2_000_000, show_default=True,
              metavar="N", help="Rows per compacted file.")
@click.option("--grace", type=click.FloatRange(min=0), default=600.0, show_default=True,
              metavar="S", help="Keep superseded files S seconds for readers that listed them.")
@click.option("--dry-run", is_flag=True, help="Say what would be merged; change nothing.")
def compact_command(data_dir, table, older_than, target_rows, grace, dry_run) -> None:
    """Merge the small files of closed hours into few large sorted ones.

    Queries running meanwhile see every row exactly once: the switch is an atomic manifest
    per partition, and superseded files stay --grace seconds for readers that listed them
    (a later run deletes them). Athena/Spark see the new files once published: see
    docs/scale-out.md. Run one compaction at a time per dataset.

    \b
    Example:
      collector compact --data s3://bucket/flows-prefix --older-than 2
    """
    from collector.store.compact import CompactError, Settings, compact
    from collector.store.manifest import ManifestError

    tables = ("flows", "packets", "sessions") if table == "all" else (table,)
    settings = Settings(older_than=older_than * 3600, target_rows=target_rows, grace=grace,
                        dry_run=dry_run)
    try:
        result = compact(data_dir, tables=tables, settings=settings)
    except (CompactError, ManifestError) as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:  # an unreachable store, a read-only directory: what was done stands
        raise click.ClickException(f"{data_dir}: {e} (a later run finishes what this one "
                                   "started)") from e
    verb = "would merge" if dry_run else "merged"
    for part in result.compacted:
        click.echo(f"{part.table}/{part.partition}: {verb} {part.files_in} files, {part.rows} rows"
                   + ("" if dry_run else f" into {part.files_out}"))
    published = sum(p.published for p in result.partitions)
    deleted = sum(p.deleted for p in result.partitions)
    click.echo(f"{len(result.compacted)} partition(s) {verb}; {published} file(s) published, "
               f"{deleted} superseded file(s) deleted", err=True)


@main.command("athena-ddl")
@click.option("--location", default="s3://BUCKET/PREFIX", show_default=True, metavar="s3://...",
              help="The dataset prefix (as given to --data).")
@click.option("--database", default="collector", show_default=True, metavar="NAME",
              help="The Glue/Athena database.")
@click.option("--table-prefix", default="", metavar="TEXT",
              help="Put before each table name (e.g. vpc_mirror_).")
@click.option("--start-date", default="2026-01-01", show_default=True, metavar="YYYY-MM-DD",
              help="First date of the date partition projection.")
def athena_ddl_command(location, database, table_prefix, start_date) -> None:
    """Print Athena/Glue CREATE EXTERNAL TABLE statements for flows, packets and sessions.

    Partition projection on date and hour: no crawler and no MSCK REPAIR needed.

    \b
    Example:
      collector athena-ddl --location s3://bucket/prefix --database mirror > tables.sql
    """
    from collector.athena import athena_ddl

    try:
        click.echo(athena_ddl(location, database=database, table_prefix=table_prefix,
                              start_date=start_date), nl=False)
    except ValueError as e:
        raise click.ClickException(str(e)) from e


@main.command("serve")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="TOML settings (keys as the long options, e.g. flush_seconds = 5).")
@click.option("--listen", metavar="HOST:PORT", help="VXLAN listener.  [default: 0.0.0.0:4789]")
@click.option("--geneve-listen", metavar="HOST:PORT",
              help="GENEVE listener (GWLB), or 'off'.  [default: 0.0.0.0:6081]")
@click.option("--health", metavar="HOST:PORT",
              help="HTTP /healthz and /metrics (also a TCP health check).  [default: 0.0.0.0:8080]")
@click.option("--data", metavar="DIR|s3://...",
              help="Dataset directory, or s3://bucket/prefix (files pass through --spool).  [default: data]")
@click.option("--spool", metavar="DIR",
              help="With --data s3://...: where files wait to upload.  [default: spool-<collector id>]")
@click.option("--spool-max-files", metavar="N",
              help="Unhealthy past N files waiting to upload.  [default: 100000]")
@click.option("--spool-max-bytes", metavar="BYTES",
              help="Unhealthy past this many bytes waiting to upload (K/M/G).  [default: 8G]")
@click.option("--store-unhealthy-after", metavar="S",
              help="Unhealthy when uploads have failed for S seconds.  [default: 60]")
@click.option("--sessions", multiple=True, metavar="FILE",
              help="AWS CLI JSON naming the sessions; repeat for more. Reloaded on SIGHUP.")
@click.option("--workers", metavar="N", help="Receive processes.  [default: one per core]")
@click.option("--flush-seconds", metavar="S", help="Write files at least this often.  [default: 10]")
@click.option("--idle-timeout", metavar="S", help="End a flow after S s without packets.  [default: 60]")
@click.option("--active-timeout", metavar="S", help="Cut longer flows into S-second rows.  [default: 60]")
@click.option("--max-flows", metavar="N", help="Active flows per worker.  [default: 1000000]")
@click.option("--packets/--no-packets", default=None, help="Also write the packets table.")
@click.option("--packet-bytes", metavar="N", help="With --packets: frame bytes kept.  [default: 128]")
@click.option("--journal/--no-journal", default=None,
              help="Journal open flows at every flush, so that a killed worker loses at most "
                   "one flush interval (its successor writes them, end_reason crash).  [default: on]")
@click.option("--interim-export/--no-interim-export", default=None,
              help="At every flush, write each open flow's counts so far as a row (end_reason "
                   "active) and count on from zero: long flows show up within a flush.  [default: off]")
@click.option("--collector-id", metavar="ID", help="Written into rows and file names.  [default: host name]")
@click.option("--min-free", metavar="BYTES", help="Unhealthy below this free space (K/M/G).  [default: 512M]")
@click.option("--rcvbuf", metavar="BYTES", help="Socket receive buffer (K/M/G).  [default: 64M]")
@click.option("--shutdown-timeout", metavar="S", help="Bound on a clean stop.  [default: 10]")
@click.option("--batch", metavar="N", help="Datagrams received per batch.  [default: 1024]")
@click.option("--health-stale", metavar="S",
              help="Unhealthy when a worker's loop is older than this.  [default: 5]")
@click.option("--max-pending-bytes", metavar="BYTES",
              help="Per worker: unwritten rows kept while the disk fails (K/M/G).  [default: 256M]")
@click.option("--control/--no-control", default=None,
              help="Accept POST /flush on the health port (tests and tools; not for production).")
@click.option("--check", is_flag=True,
              help="Check the settings, sessions, data directory and ports, print them, exit.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="One line per event, as text or JSON.  [default: text]")
def serve_command(config_file, check, **flags) -> None:
    """Run the appliance: receive mirrored traffic, meter flows, write Parquet.

    Point a Traffic Mirror target (an ENI, or an NLB with a UDP 4789 listener whose health
    check is TCP or HTTP on the --health port) at this host. Settings: flags, then COLLECTOR_*
    environment variables (COLLECTOR_DATA, COLLECTOR_WORKERS, ...), then the --config file.
    SIGTERM/SIGINT stop cleanly (every flow is written, `end_reason` shutdown); SIGHUP reloads
    the sessions files. Start-up problems print one line and exit 2.

    \b
    Example:
      collector serve --sessions sessions.json --data /var/lib/collector
      curl -s localhost:8080/healthz; curl -s localhost:8080/metrics
    """
    import signal

    # A reload asked for while we start changes nothing (the sessions are read at start), but
    # SIGHUP's default action would kill us: hold it until the supervisor installs its handler.
    signal.signal(signal.SIGHUP, lambda *_: None)
    from collector.serve import ConfigError, StartupError, load, serve
    from collector.serve.supervisor import Supervisor

    try:
        config = load(config_file, flags=flags)
        if check:
            Supervisor(config).check()
            for name, value in vars(config).items():
                click.echo(f"{name} = {value}")
            click.echo("ok: settings, sessions, data directory and ports are usable")
            return
        sys.exit(serve(config))
    except (ConfigError, StartupError) as err:
        click.echo(f"collector serve: {err}", err=True)
        sys.exit(2)


@main.command("replay")
@click.argument("captures", nargs=-1, required=True, metavar="CAPTURE...",
                type=click.Path(exists=True, dir_okay=False))
@click.option("--target", metavar="HOST:PORT",
              help="Where to send: the appliance's VXLAN (4789) or GENEVE (6081) listener.")
@click.option("--vni", type=click.IntRange(0, 2**24 - 1), metavar="N",
              help="The session's VNI (VirtualNetworkId) to put in every VXLAN header.")
@click.option("--sessions", "session_files", metavar="FILE", multiple=True,
              help="AWS CLI JSON naming the sessions; with --session-id, the VNI and "
                   "PacketLength come from it.")
@click.option("--session-id", metavar="tms-...", help="The session of --sessions to replay as.")
@click.option("--encap", type=click.Choice(["vxlan", "geneve"]), default="vxlan",
              show_default=True,
              help="VXLAN as sent to an ENI or NLB target, or GENEVE as a GWLB endpoint delivers it.")
@click.option("--packet-length", type=int, metavar="N",
              help="Mirror the first N bytes of each frame (1-8500), as PacketLength does.")
@click.option("--multiplier", "-x", type=click.FloatRange(min=0, min_open=True), metavar="X",
              help="The capture's own timing, X times faster.  [default: 1.0]")
@click.option("--pps", "-p", type=click.FloatRange(min=0, min_open=True), metavar="N",
              help="N packets a second.")
@click.option("--mbps", "-M", type=click.FloatRange(min=0, min_open=True), metavar="N",
              help="N megabits a second of datagrams on the wire.")
@click.option("--topspeed", "-t", is_flag=True, help="As fast as possible.")
@click.option("--loop", "-l", type=click.IntRange(min=0), default=1, show_default=True,
              metavar="N", help="Send the input N times; 0 = until --limit or --duration.")
@click.option("--limit", "-L", type=click.IntRange(min=1), metavar="N",
              help="Stop after N packets.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Stop after S seconds.")
@click.option("--as-captured", is_flag=True,
              help="Re-send the capture's mirror datagrams (UDP 4789/4790/6081) unchanged: "
                   "their VNIs, from their outer source ports.")
@click.option("--filter", "filter_file", type=click.Path(exists=True, dir_okay=False),
              metavar="FILTER.json",
              help="Send only what this Traffic Mirror filter mirrors (describe-traffic-mirror-"
                   "filters output).")
@click.option("--filter-id", metavar="tmf-...",
              help="The filter of FILTER.json to apply when it holds several.  "
                   "[default: the session's, or the only one]")
@click.option("--source-ip", multiple=True, metavar="IP",
              help="With --filter: an address of the mirrored ENI (repeatable).")
@click.option("--source-cidr", multiple=True, metavar="CIDR",
              help="With --filter: a block of the mirrored ENI's addresses (repeatable).")
@click.option("--amazon-dns", multiple=True, metavar="IP",
              help="With --filter: the VPC resolver's address (VPC base + 2): its DNS traffic "
                   "is mirrored only with the filter's amazon-dns network service.")
@click.option("--dry-run", is_flag=True,
              help="Send nothing: count what would be sent, per filter rule with --filter.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              metavar="N", help="Processes sending in parallel, each the flows of its share of "
                                "outer source ports (with --topspeed or -x; not with --limit).")
def replay_command(captures, target, vni, session_files, session_id, encap, packet_length,
                   multiplier, pps, mbps, topspeed, loop, limit, duration, as_captured,
                   filter_file, filter_id, source_ip, source_cidr, amazon_dns, dry_run,
                   workers) -> None:
    """Replay captures to a mirroring target as AWS Traffic Mirroring sends them.

    Each packet becomes the datagram AWS would send: the frame (an Ethernet header made up
    for SLL, NULL and raw-IP captures) cut to the packet length, in VXLAN with the session's
    VNI (or GWLB GENEVE), from an outer UDP source port that hashes its flow as AWS does (one
    port for both directions of a TCP flow, one per direction for UDP). Pacing, loops and
    limits are tcpreplay's (-x, -p, -M, -t, -l, -L); so is the summary. With --filter, only
    what the filter would mirror from the ENI at --source-ip/--source-cidr is sent.

    \b
    Example:
      collector replay capture.pcap --target 127.0.0.1:4789 --vni 7159709 --topspeed
      collector replay capture.pcap --target 10.0.2.20:4789 \\
          --sessions sessions.json --session-id tms-08a33b1214EXAMPLE
      collector replay capture.pcap --dry-run --filter filters.json --source-ip 10.0.1.10 --vni 1
    """
    from collector.replay import ReplayError, ReplayOptions, replay
    from collector.replay.filter import load_filter, parse_sources

    if not dry_run and target is None:
        raise click.UsageError("--target HOST:PORT is required (except with --dry-run)")
    if session_id is not None:
        if vni is not None:
            raise click.UsageError("give --vni or --session-id, not both")
        registry = _registry(session_files)
        session = None if registry is None else registry.by_session_id(session_id)
        if session is None:
            raise click.UsageError(f"no session {session_id} in the --sessions files")
        vni = session.vni
        if packet_length is not None and packet_length != session.packet_length:
            shown = "whole packets" if session.packet_length is None else session.packet_length
            click.echo(f"note: --packet-length {packet_length} overrides the session's "
                       f"PacketLength ({shown})", err=True)
        elif packet_length is None:
            packet_length = session.packet_length
        if filter_id is None and filter_file is not None:
            filter_id = session.filter_id
    elif session_files:
        raise click.UsageError("--sessions needs --session-id: which session to replay as")
    if filter_file is None and (source_ip or source_cidr or amazon_dns or filter_id):
        raise click.UsageError("--source-ip, --source-cidr, --amazon-dns and --filter-id "
                               "need --filter")
    mirror_filter, sources = None, ()
    try:
        if filter_file is not None:
            if not (source_ip or source_cidr):
                raise click.UsageError("--filter needs the mirrored ENI's address: "
                                       "--source-ip IP or --source-cidr CIDR")
            mirror_filter = load_filter(filter_file, filter_id)
            sources = parse_sources(source_ip, source_cidr)
        options = ReplayOptions(
            vni=vni, packet_length=packet_length, encap=encap, as_captured=as_captured,
            multiplier=multiplier, pps=pps, mbps=mbps, topspeed=topspeed, loop=loop, limit=limit,
            duration=duration, mirror_filter=mirror_filter, sources=sources,
            amazon_dns=amazon_dns, dry_run=dry_run, workers=workers)
    except (ReplayError, SessionsError) as e:
        raise click.ClickException(str(e)) from e
    except ValueError as e:  # a bad --source-ip / --source-cidr
        raise click.BadParameter(str(e)) from e
    with _ReplayProgressBar(captures, options) as bar:
        try:
            summary = replay(captures, target, options, progress=bar)
        except (ReplayError, CaptureError) as e:
            notes = getattr(e, "__notes__", [])
            raise click.ClickException(" ".join([str(e), *(f"({n})" for n in notes)])) from e
    click.echo(summary.format())


class _ReplayProgressBar:
    """A progress bar on stderr when it is a terminal: over the capture bytes times the
    loops, or over the limit or duration when the loops are endless."""

    def __init__(self, captures, options) -> None:
        self.options, self.done = options, 0
        size = sum(os.path.getsize(path) for path in captures)
        passes = 1 if options.dry_run else options.loop
        if passes:
            self.measure, length = "bytes", size * passes
        elif options.limit is not None:
            self.measure, length = "packets", options.limit
        else:
            self.measure, length = "seconds", int(options.duration)
        self.bar = click.progressbar(length=max(length, 1), label="replaying", file=sys.stderr,
                                     hidden=not sys.stderr.isatty())

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, progress) -> None:
        value = {"bytes": progress.bytes_read, "packets": progress.attempted,
                 "seconds": int(progress.elapsed)}[self.measure]
        if value > self.done:
            self.bar.update(value - self.done)
            self.done = value
