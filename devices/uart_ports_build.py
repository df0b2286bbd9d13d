"""Builds the UART's compiled port path, `devices._uart_ports`, from uart_ports.c.

Run at install time: `make install` runs `python -m devices.uart_ports_build`,
and `pip install` builds it through setup.py. A host without a C compiler or
Python's headers gets no module, is told so in one line, and every access to
the serial port goes through Python (devices/uart_ports.py says which runs,
and why both exist).
"""

from __future__ import annotations

from pathlib import Path

from vmm import compiled_module

MODULE = "devices._uart_ports"
SOURCE = Path(__file__).with_name("uart_ports.c")

# What Python sees of uart_ports.c.
DECLARATIONS = """
#define UART_OUTPUT_SIZE ...
#define UART_PORTS_DIGEST ...

struct uart_registers {
    uint8_t ier, lcr, mcr, lsr, msr, scr, fifo_bits;
    uint8_t thr_interrupt, transmitting, may_start_transmitting, irq_level;
    uint64_t transmitting_since_ns;
};
struct uart_ports { uint64_t ins, outs; uint32_t output_length; ...; };

struct uart_ports *uart_ports_new(uint32_t base, const uint64_t *stop, void *python_in, void *python_out,
                                  void *python_irq);
void uart_ports_free(struct uart_ports *p);
int uart_ports_take(struct uart_ports *p, struct uart_registers *regs, uint32_t *transmitted, uint8_t *output);
int uart_ports_take_output(struct uart_ports *p, uint32_t *transmitted, uint8_t *output);
void uart_ports_grant(struct uart_ports *p, const struct uart_registers *regs);
uint32_t uart_port_in(void *uc, uint32_t port, int size, void *user_data);
void uart_port_out(void *uc, uint32_t port, int size, uint32_t value, void *user_data);
"""


def source_digest() -> int | None:
    return compiled_module.source_digest(SOURCE, DECLARATIONS)


def builder():
    return compiled_module.builder(MODULE, SOURCE, DECLARATIONS, "UART_PORTS_DIGEST")


def build() -> bool:
    """Compile the module next to this file; False (and one line on stderr) when this host cannot."""
    return compiled_module.build(builder(), SOURCE, "the serial port's compiled port path", "the Python one")


if __name__ == "__main__":
    build()
