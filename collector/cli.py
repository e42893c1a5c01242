"""Command-line interface: a thin layer over the library.

Each command parses its options, calls one library function and prints. Domain errors become
`click.ClickException` here and nowhere else.
"""

from __future__ import annotations

import click

from collector import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="collector")
def main() -> None:
    """collector: every mirrored flow from AWS VPC Traffic Mirroring, correct, in SQL."""
