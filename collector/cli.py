"""Command-line interface: a thin layer over the library.

Each command parses its options, calls one library function and prints. Domain errors become
`click.ClickException` here and nowhere else.
"""

from __future__ import annotations

import click

from collector import __version__
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
