"""Command-line interface: a thin layer over the library.

Each command parses its options, calls one library function and prints. Domain errors become
`click.ClickException` here and nowhere else.
"""

from __future__ import annotations

import itertools
import json

import click

from collector import __version__
from collector.capture import CaptureError
from collector.datagrams import Stats, decode_capture, format_line, header_line, to_json
from collector.decode import Malformed
from collector.sessions import SessionRegistry, SessionsError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="collector")
def main() -> None:
    """collector: every mirrored flow from AWS VPC Traffic Mirroring, correct, in SQL."""


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
    if registry is None or isinstance(packet, Malformed) or packet.vni is None:
        return None
    session = registry.lookup(packet.vni)
    return None if session is None else session.session_id
