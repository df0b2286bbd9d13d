"""Builds the compiled KVM exit loop, `vmm.kvm._exit_loop`, from exit_loop.c (cffi API mode).

Run at install time: `make install` runs `python -m vmm.kvm.exit_loop_build`,
and `pip install` builds it through setup.py. A host without a C compiler or
Python's headers gets no module, is told so in one line, and pyvmm uses the
Python exit loop (vmm/kvm/exit_loop.py says which runs, and why both exist).
"""

from __future__ import annotations

from pathlib import Path

from vmm import compiled_module

MODULE = "vmm.kvm._exit_loop"
SOURCE = Path(__file__).with_name("exit_loop.c")

# What Python sees of exit_loop.c, and the four device calls it makes into Python.
DECLARATIONS = """
#define LOOP_EXIT 0
#define LOOP_INTERRUPTED 1
#define LOOP_RUN_FAILED 2
#define LOOP_DEVICE_RAISED 3
#define EXIT_LOOP_DIGEST ...

struct exit_counts { uint64_t io_out, io_in, mmio_write, mmio_read; };
struct kvm_run;

int exit_loop_run(int fd, struct kvm_run *run, void *vcpu, struct exit_counts *counts, int *error);

extern "Python" int exit_loop_pio_write(void *vcpu, uint16_t port, uint32_t size, uint32_t value);
extern "Python" int exit_loop_pio_read(void *vcpu, uint16_t port, uint32_t size, uint32_t *value);
extern "Python" int exit_loop_mmio_write(void *vcpu, uint64_t address, uint32_t size, uint64_t value);
extern "Python" int exit_loop_mmio_read(void *vcpu, uint64_t address, uint32_t size, uint64_t *value);
"""


def source_digest() -> int | None:
    """A checksum of what the module is built from (None: the sources are not installed)."""
    return compiled_module.source_digest(SOURCE, DECLARATIONS)


def builder():
    return compiled_module.builder(MODULE, SOURCE, DECLARATIONS, "EXIT_LOOP_DIGEST")


def build() -> bool:
    """Compile the module next to this file; False (and one line on stderr) when this host cannot."""
    return compiled_module.build(builder(), SOURCE, "the compiled KVM exit loop", "the Python one")


if __name__ == "__main__":
    build()
