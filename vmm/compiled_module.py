"""pyvmm's optional C modules (cffi API mode): building them, and telling a stale one apart.

There are three, each with a Python version that does the same work and runs
where the module is absent: the KVM exit loop (vmm/kvm/exit_loop_build.py),
virtio-blk's request path (devices/virtio/blk_requests_build.py) and the
serial port's port path on the software CPU (devices/uart_ports_build.py). Both
are built at install time (`make install`, or `pip install` through
setup.py) where a C compiler and Python's headers are present; elsewhere the
build says so in one line. A module records a checksum of what it was built
from (its C source and the declarations Python sees), and its Python side
uses it only while that still matches the files beside it.

Nothing here imports more than cffi and vmm/errors.py (the standard library
only): setup.py loads the build modules before pyvmm's dependencies are installed.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from vmm.errors import report


def source_digest(source: Path, declarations: str) -> int | None:
    """A checksum of what a module is built from (None: the sources are not installed)."""
    try:
        return zlib.crc32(source.read_bytes() + declarations.encode())
    except OSError:
        return None


def built_from_sources(lib, digest_name: str, expected: int | None) -> bool:
    """Whether a loaded module (`lib`; None: not built) was built from the sources beside it
    (`expected`, their digest; None: not installed, nothing to compare with)."""
    return lib is not None and (expected is None or getattr(lib, digest_name) == expected)


def builder(module: str, source: Path, declarations: str, digest_name: str):
    """The cffi builder of `module` from `source`; the module records its digest as `digest_name`."""
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(declarations)
    text = f"#define {digest_name} {source_digest(source, declarations)}u\n" + source.read_text()
    ffi.set_source(module, text, extra_compile_args=["-O2"])
    return ffi


def build(ffi, source: Path, what: str, fallback: str) -> bool:
    """Compile the module next to `source`; False (and one line on stderr) when this host cannot."""
    from cffi import VerificationError

    tmpdir = Path(__file__).resolve().parents[1] / "build" / source.stem
    try:
        built = Path(ffi.compile(tmpdir=str(tmpdir), verbose=False))
    except (VerificationError, OSError) as err:  # no compiler, no headers, no room
        # report(): a stderr that is gone (`make install 2>&1 | head`) must not turn this notice into a traceback.
        report(f"{what} was not built ({err}); pyvmm will use {fallback} "
               "(apt-get install gcc python3-dev, then make install)")
        return False
    # cffi leaves the module under tmpdir in its package's directories: put it beside the source.
    built.replace(source.with_name(built.name))
    return True
