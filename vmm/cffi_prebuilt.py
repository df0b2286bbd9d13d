"""C declarations for cffi: parsed once at install time, or at import time when that was not done.

Parsing declarations (cffi's `FFI.cdef`, through pycparser) costs a good
part of pyvmm's start-up. cffi's out-of-line ABI mode does it ahead of time:
`python -m vmm.cffi_prebuilt` (run by `make install`) writes, for every
module listed in MODULES, a small generated Python module holding the
parsed declarations, which imports in a fraction of the time and needs no
C compiler. Each generated module records a digest of the declarations it
was made from; `load` uses it only when the digest still matches, and
otherwise (never built, or built from older declarations) parses the
declarations in-line, as cffi's plain ABI mode does.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import zlib

# The modules whose `DECLARATIONS` are prebuilt, and where their parsed form goes.
MODULES = {"vmm.kvm.uapi": "vmm.kvm._uapi_prebuilt", "boot.lz4_legacy": "boot._lz4_prebuilt"}

# Set (to anything) to ignore prebuilt modules: how the in-line path is tested.
INLINE_ENV = "PYVMM_CFFI_INLINE"


def digest(declarations: str) -> str:
    """Tells declarations apart (a checksum: this guards against staleness, not tampering)."""
    return f"{zlib.crc32(declarations.encode()):08x}-{len(declarations)}"


def load(declarations: str, prebuilt: str):
    """An FFI for `declarations`: the prebuilt one in module `prebuilt` if it is current."""
    if not os.environ.get(INLINE_ENV):
        try:
            module = importlib.import_module(prebuilt)
        except ImportError:
            module = None
        if module is not None and getattr(module, "DECLARATIONS_DIGEST", None) == digest(declarations):
            return module.ffi
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(declarations)
    return ffi


def write(declarations: str, prebuilt: str, path: str) -> None:
    """Parse `declarations` and write them to `path` as the module named `prebuilt`."""
    from cffi import FFI

    builder = FFI()
    builder.cdef(declarations)
    builder.set_source(prebuilt, None)  # None: ABI mode, a Python module, no compiler
    # Written beside it and renamed into place: a pyvmm starting meanwhile imports the old
    # module or the new one, never half of one (a SyntaxError `load` would not catch).
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        builder.emit_python_code(partial)
        with open(partial, "a") as f:
            f.write(f"DECLARATIONS_DIGEST = {digest(declarations)!r}\n")
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def build() -> list[str]:
    """Write every module in MODULES next to its source; the paths written."""
    written = []
    for source, prebuilt in MODULES.items():
        module = importlib.import_module(source)
        path = os.path.join(os.path.dirname(module.__file__), prebuilt.rpartition(".")[2] + ".py")
        write(module.DECLARATIONS, prebuilt, path)
        written.append(path)
    return written

if __name__ == "__main__":
    from vmm.host_output import use_standard_streams

    # cffi says what it generates on stdout; to stderr with it, which drops what it cannot write
    # (`make install 2>&1 | head` after head exited) instead of failing the install.
    use_standard_streams()
    sys.stdout = sys.stderr
    build()
