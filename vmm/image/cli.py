"""`pyvmm img`: create, inspect, check, convert, resize and compare disk images, like qemu-img.

Options and outputs follow qemu-img so that its users need no new habits:
the same flags, the same JSON field names, the same exit codes for `check`
(0 clean, 1 check not completed, 2 corruptions, 3 leaks only) and
`compare` (0 identical, 1 different, 2 error). Every failure is one line on
stderr; new images are built in a temporary file and renamed into place,
so a failed `create` or `convert` leaves nothing half written.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
from collections.abc import Callable, Iterator

import click

from vmm.errors import PyvmmError, one_line
from vmm.host_output import OutputClosed
from vmm.host_signals import handling
from vmm.image.convert import compare, convert
from vmm.image.info import format_info_human, image_info, snapshot_table
from vmm.image.open import FORMATS, atomic_output, create_image, open_image
from vmm.image.qcow2 import Qcow2Image
from vmm.image.qcow2_create import parse_qcow2_options
from vmm.image.qcow2_format import COMPRESSION_NAMES
from vmm.image.sizes import parse_size

FORMAT_CHOICE = click.Choice(FORMATS)


def _fails_with(status: int | None = None) -> Callable:
    """Turn PyvmmError/OSError into one line on stderr and exit `status` (default: the error's).

    A stdout that is gone ends every command with 141 (vmm/host_output.py), as it ends
    `pyvmm boot`, even `check` and `compare`, whose error statuses are their own.
    """

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def run(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except PyvmmError as err:
                click.echo(f"pyvmm: {one_line(str(err))}", err=True)
                closed = isinstance(err, OutputClosed)
                sys.exit(status if status is not None and not closed else err.exit_status)
            except OSError as err:
                where = f"{err.filename}: " if err.filename else ""
                click.echo(f"pyvmm: {one_line(f'{where}{err.strerror or err}')}", err=True)
                sys.exit(status if status is not None else 1)
            except KeyboardInterrupt as err:  # Ctrl-C, or _Stopped
                click.echo(f"pyvmm: {str(err) or 'interrupted'}", err=True)
                sys.exit(130)

        return run

    return decorate


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is, as Ctrl-C raises KeyboardInterrupt."""


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (the terminal running the command was closed) end the block as Ctrl-C does,
    so that a new image half written is removed (atomic_output), not left beside its name.
    A signal ignored when pyvmm started (`nohup pyvmm img convert ...`) stays ignored (handling()).

    Only around new images: a command changing an image in place (resize, check -r) is
    better killed, which its metadata's write order survives, than stopped between two
    updates of its cached metadata that closing the image would then write.
    """

    def stop(signum, _frame):
        raise _Stopped(f"stopped by {signal.Signals(signum).name}")

    with handling((signal.SIGTERM, signal.SIGHUP), stop):
        yield


@contextlib.contextmanager
def _progress(length: int, label: str, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on a terminal, nothing otherwise."""
    if quiet or not sys.stdout.isatty() or length <= 0:
        yield None
        return
    with click.progressbar(length=length, label=label) as bar:
        yield bar.update


@click.group(name="img")
def img() -> None:
    """Create, inspect, check and convert disk images (raw, qcow2), like qemu-img."""


@img.command()
@click.option("-f", "fmt", type=FORMAT_CHOICE, default="raw", show_default=True, help="image format")
@click.option("-b", "backing", help="backing file (qcow2 only); relative to the new image")
@click.option("-F", "backing_fmt", type=FORMAT_CHOICE, help="format of the backing file")
@click.option("-o", "options", help="qcow2 options: cluster_size, compat, refcount_bits, compression_type")
@click.option("-q", "quiet", is_flag=True, help="print nothing on success")
@click.argument("filename")
@click.argument("size", required=False)
@_fails_with()
def create(fmt, backing, backing_fmt, options, quiet, filename, size) -> None:
    """Create FILENAME of SIZE bytes (K, M, G, T suffixes), optionally over a BACKING file."""
    opts = parse_qcow2_options(options) if fmt == "qcow2" else None
    if options and fmt != "qcow2":
        raise PyvmmError("-o options are only supported for qcow2")
    nbytes = parse_size(size, "image size") if size is not None else None
    with _stopped_by_signals(), atomic_output(filename) as tmp:
        nbytes = create_image(tmp, fmt, nbytes, backing_file=backing, backing_format=backing_fmt,
                              options=opts, target=filename)
        # Printed before the image takes its name: a command that fails here leaves no image.
        if not quiet:
            extra = f" {opts.describe()}" if opts else ""
            back = f" backing_file={backing}" if backing else ""
            click.echo(f"Formatting '{filename}', fmt={fmt}{extra} size={nbytes}{back}")


@img.command()
@click.option("-f", "fmt", type=FORMAT_CHOICE, help="image format (probed if not given)")
@click.option("--output", "output", type=click.Choice(["human", "json"]), default="human")
@click.option("--backing-chain", is_flag=True, help="also show every backing image")
@click.argument("filename")
@_fails_with()
def info(fmt, output, backing_chain, filename) -> None:
    """Show the format, sizes, backing file and snapshots of FILENAME."""
    # Like qemu-img, plain `info` does not need (or open) the backing chain.
    with open_image(filename, fmt, backing=backing_chain) as image:
        layers = image.chain() if backing_chain else [image]
        infos = [image_info(layer) for layer in layers]
    if output == "json":
        click.echo(json.dumps(infos if backing_chain else infos[0], indent=4))
    else:
        click.echo("\n\n".join(format_info_human(i) for i in infos))


@img.command()
@click.option("-f", "fmt", type=FORMAT_CHOICE, help="image format (probed if not given)")
@click.option("--output", "output", type=click.Choice(["human", "json"]), default="human")
@click.option("-r", "repair", type=click.Choice(["leaks", "all"]), help="repair leaks, or everything")
@click.option("-q", "quiet", is_flag=True, help="print nothing but errors")
@click.argument("filename")
@_fails_with(1)
def check(fmt, output, repair, quiet, filename) -> None:
    """Check FILENAME for leaks and corruption (exit 0 clean, 2 corrupt, 3 leaks only)."""
    from vmm.image.qcow2_check import check_qcow2

    with open_image(filename, fmt, readonly=not repair, backing=False, repair=bool(repair)) as image:
        if not isinstance(image, Qcow2Image):
            click.echo("pyvmm: this image format does not support checks", err=True)
            sys.exit(63)
        total = sum(1 for e in image._l1 if e)
        with _progress(total, "Checking", quiet or output == "json") as update:
            last = [0]

            def advance(done: int, _total: int) -> None:
                if update:
                    update(done - last[0])
                    last[0] = done

            result = check_qcow2(image, repair, advance)
    if output == "json":
        click.echo(json.dumps(result.to_json(), indent=4))
    elif not quiet:
        _print_check(result, repair)
    sys.exit(result.exit_status)


def _print_check(result, repair) -> None:
    for message in result.messages:
        click.echo(message, err=True)
    if repair and (result.leaks_fixed or result.corruptions_fixed):
        click.echo("The following inconsistencies were found and repaired:\n\n"
                   f"    {result.leaks_fixed} leaked clusters\n"
                   f"    {result.corruptions_fixed} corruptions\n\n"
                   "Double checking the fixed image now...")
    if not (result.corruptions or result.leaks or result.check_errors):
        click.echo("No errors were found on the image.")
    if result.corruptions:
        click.echo(f"\n{result.corruptions} errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image may corrupt it.")
    if result.leaks:
        click.echo(f"\n{result.leaks} leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.")
    if result.total_clusters and result.allocated_clusters:
        t, a = result.total_clusters, result.allocated_clusters
        click.echo(f"{a}/{t} = {100 * a / t:0.2f}% allocated, "
                   f"{100 * result.fragmented_clusters / a:0.2f}% fragmented, "
                   f"{100 * result.compressed_clusters / a:0.2f}% compressed clusters")
    if result.image_end_offset:
        click.echo(f"Image end offset: {result.image_end_offset}")


@img.command(name="convert")
@click.option("-f", "src_fmt", type=FORMAT_CHOICE, help="source format (probed if not given)")
@click.option("-O", "dst_fmt", type=FORMAT_CHOICE, default="raw", show_default=True,
              help="output format")
@click.option("-c", "compress", is_flag=True, help="compress the output (qcow2)")
@click.option("-o", "options", help="qcow2 options for the output, as for create")
@click.option("-p", "show_progress", is_flag=True, help="(accepted; progress shows on a terminal)")
@click.option("-q", "quiet", is_flag=True, help="no progress bar")
@click.argument("source")
@click.argument("output")
@_fails_with()
def convert_command(src_fmt, dst_fmt, compress, options, show_progress, quiet, source, output) -> None:
    """Copy SOURCE (with its backing chain flattened) into a new image OUTPUT; holes stay sparse."""
    opts = parse_qcow2_options(options) if dst_fmt == "qcow2" else None
    if options and dst_fmt != "qcow2":
        raise PyvmmError("-o options are only supported for qcow2 output")
    if opts and compress and opts.compression_type not in COMPRESSION_NAMES:
        raise PyvmmError("unknown compression type")
    with open_image(source, src_fmt, backing=True) as src:
        size = src.size
    with _stopped_by_signals(), _progress(size, "Converting", quiet) as update:
        convert(source, src_fmt, output, dst_fmt, compress=compress, options=opts, progress=update)


@img.command(context_settings={"ignore_unknown_options": True})
@click.option("-f", "fmt", type=FORMAT_CHOICE, help="image format (probed if not given)")
@click.option("--shrink", is_flag=True, help="allow making a raw image smaller")
@click.option("-q", "quiet", is_flag=True)
@click.argument("filename")
@click.argument("size")
@_fails_with()
def resize(fmt, shrink, quiet, filename, size) -> None:
    """Set the virtual size of FILENAME to SIZE, or grow/shrink it by +SIZE/-SIZE."""
    sign = size[:1] if size[:1] in "+-" else ""
    amount = parse_size(size[len(sign):], "size")
    with open_image(filename, fmt, readonly=False, backing=False) as image:
        new = image.size + amount if sign == "+" else image.size - amount if sign == "-" else amount
        if new < 0:
            raise PyvmmError(f"new size {new} is negative")
        if new < image.size and not shrink:
            raise PyvmmError("use the --shrink option to make an image smaller "
                             "(data beyond the new end is lost)")
        image.resize(new)
    if not quiet:
        click.echo("Image resized.")


@img.command(name="compare")
@click.option("-f", "fmt_a", type=FORMAT_CHOICE, help="format of the first image")
@click.option("-F", "fmt_b", type=FORMAT_CHOICE, help="format of the second image")
@click.option("-s", "strict", is_flag=True, help="images of different sizes differ")
@click.option("-p", "show_progress", is_flag=True, help="(accepted; progress shows on a terminal)")
@click.option("-q", "quiet", is_flag=True)
@click.argument("first")
@click.argument("second")
@_fails_with(2)
def compare_command(fmt_a, fmt_b, strict, show_progress, quiet, first, second) -> None:
    """Compare the contents of two images (exit 0 identical, 1 different, 2 error)."""
    with open_image(first, fmt_a) as a:
        size = a.size
    with _progress(size, "Comparing", quiet) as update:
        same, message = compare(first, fmt_a, second, fmt_b, strict=strict, progress=update)
    if not quiet:
        click.echo(message)
    sys.exit(0 if same else 1)


@img.command()
@click.option("-l", "list_", is_flag=True, help="list the internal snapshots")
@click.option("-f", "fmt", type=FORMAT_CHOICE, help="image format (probed if not given)")
@click.argument("filename")
@_fails_with()
def snapshot(list_, fmt, filename) -> None:
    """List the internal snapshots of a qcow2 image (-l)."""
    if not list_:
        raise PyvmmError("only listing snapshots (-l) is supported")
    with open_image(filename, fmt, backing=False) as image:
        infos = image_info(image).get("snapshots", [])
    if infos:
        click.echo("Snapshot list:")
        click.echo("\n".join(snapshot_table(infos)))
