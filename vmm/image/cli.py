"""`pyvmm img`: create, inspect, check and convert disk images (placeholder until the image library lands)."""

import click


@click.group(name="img")
def img() -> None:
    """Create, inspect, check and convert disk images (raw, qcow2), like qemu-img."""
