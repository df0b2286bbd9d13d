"""`pip install` builds pyvmm's optional C modules when it can (vmm/compiled_module.py).

They are the compiled KVM exit loop (vmm/kvm/exit_loop_build.py),
virtio-blk's compiled request path (devices/virtio/blk_requests_build.py) and
the serial port's compiled port path (devices/uart_ports_build.py).
Everything else is in pyproject.toml. On a host without a C compiler or
Python's headers the install goes on without them, says so in one line each,
and pyvmm uses their Python versions.
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# This checkout's build modules (an installed pyvmm may shadow the packages here); they
# import nothing but cffi.
sys.path.insert(0, str(Path(__file__).parent))
from devices import uart_ports_build  # noqa: E402
from devices.virtio import blk_requests_build  # noqa: E402
from vmm.kvm import exit_loop_build  # noqa: E402


class OptionalBuildExt(build_ext):
    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - any compiler failure leaves the Python version
            print(f"pyvmm: {ext.name} was not built ({err}); pyvmm will use its Python version")


setup(ext_modules=[exit_loop_build.builder().distutils_extension("build/exit_loop"),
                   blk_requests_build.builder().distutils_extension("build/blk_requests"),
                   uart_ports_build.builder().distutils_extension("build/uart_ports")],
      cmdclass={"build_ext": OptionalBuildExt})
