"""`pip install` builds the compiled KVM exit loop (vmm/kvm/exit_loop_build.py) when it can.

Everything else is in pyproject.toml. The loop is optional: on a host without a
C compiler or Python's headers the install goes on without it, says so in one
line, and pyvmm uses the Python exit loop (vmm/kvm/exit_loop.py).
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext


def exit_loop_builder():
    """vmm/kvm/exit_loop_build.py's builder, loaded from this checkout by path (an installed
    pyvmm may shadow the `vmm` package here)."""
    spec = importlib.util.spec_from_file_location("exit_loop_build", Path(__file__).parent / "vmm/kvm/exit_loop_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.builder()


class OptionalBuildExt(build_ext):
    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - any compiler failure leaves the Python loop
            print(f"pyvmm: the compiled KVM exit loop was not built ({err}); pyvmm will use the Python one")


setup(ext_modules=[exit_loop_builder().distutils_extension("build/exit_loop")], cmdclass={"build_ext": OptionalBuildExt})
