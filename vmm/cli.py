"""The `pyvmm` command line."""

from __future__ import annotations

import click

from vmm.image.cli import img


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyvmm")
def cli() -> None:
    """pyvmm: boot a kernel in a KVM virtual machine (or on a software CPU)."""


cli.add_command(img)


def main() -> None:
    cli()
