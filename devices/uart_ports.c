/* The 16550A's port accesses in its common state, answered without Python
 * (devices/uart_ports.py says when, and why).
 *
 * `uart_port_in` and `uart_port_out` are the software CPU's IN and OUT hooks
 * (Unicorn's UC_HOOK_INSN signatures). An access to the UART's eight ports is
 * answered here while Python has handed the registers over (`granted`); when
 * it moves the interrupt line, the new level goes to Python's `python_irq`.
 * Everything else, and every access while the engine has been asked to stop,
 * goes to the Python hook unchanged. The rules are devices/uart.py's, restricted to what a granted
 * state allows: both FIFOs empty, no line-status error, no modem-status
 * delta, DLAB and loopback off, so the only interrupt that can be pending is
 * THR empty.
 *
 * One mutex guards the handed-over state: the hook takes it on the vCPU's
 * thread (no GIL), Python's `take`/`grant` on any thread that holds the
 * UART's own lock (cffi lets the GIL go for the call). The hook calls
 * `python_irq` with the mutex held, so that no take comes between a state
 * and its level: levels reach the line in the order of the states, as the
 * UART's lock gives them in Python. The hook calls the Python hooks without
 * it.
 */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Output gathered between two takes: the size of a pipe's atomic write. */
#define UART_OUTPUT_SIZE 4096

enum { THR = 0, IER = 1, IIR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7, REGISTERS = 8 };
#define IER_THRI 0x02
#define IER_MASK 0x0F
#define IIR_NO_INT 0x01
#define IIR_THRI 0x02
#define MCR_OUT2 0x08
#define MCR_LOOP 0x10

typedef uint32_t (*port_in_fn)(void *uc, uint32_t port, int size, void *user_data);
typedef void (*port_out_fn)(void *uc, uint32_t port, int size, uint32_t value, void *user_data);
typedef void (*irq_fn)(void *uc, int level);

struct uart_registers {
    uint8_t ier, lcr, mcr, lsr, msr, scr, fifo_bits;
    uint8_t thr_interrupt, transmitting, may_start_transmitting, irq_level;
    uint64_t transmitting_since_ns;
};

struct uart_ports {
    uint64_t ins, outs; /* accesses answered here, for the caller's counts */
    pthread_mutex_t lock;
    uint8_t granted, answered; /* answered: something changed since the grant */
    struct uart_registers regs;
    uint32_t transmitted, output_length;
    uint8_t output[UART_OUTPUT_SIZE];
    uint32_t base;
    const volatile uint64_t *stop; /* the stop hook's word: set, the access goes to Python */
    port_in_fn python_in;
    port_out_fn python_out;
    irq_fn python_irq;
};

struct uart_ports *uart_ports_new(uint32_t base, const uint64_t *stop, void *python_in, void *python_out,
                                  void *python_irq)
{
    struct uart_ports *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    pthread_mutex_init(&p->lock, NULL);
    p->base = base;
    p->stop = stop;
    p->python_in = (port_in_fn)python_in;
    p->python_out = (port_out_fn)python_out;
    p->python_irq = (irq_fn)python_irq;
    return p;
}

void uart_ports_free(struct uart_ports *p)
{
    pthread_mutex_destroy(&p->lock);
    free(p);
}

/* Take the registers back for Python: -1 if nothing changed since the grant, else how
 * many output bytes were copied to `output` (UART_OUTPUT_SIZE at most), with `regs` and
 * `transmitted` filled in. Until the next grant every access goes to Python. */
int uart_ports_take(struct uart_ports *p, struct uart_registers *regs, uint32_t *transmitted, uint8_t *output)
{
    int length = -1;
    pthread_mutex_lock(&p->lock);
    p->granted = 0;
    if (p->answered) {
        *regs = p->regs;
        *transmitted = p->transmitted;
        length = (int)p->output_length;
        memcpy(output, p->output, p->output_length);
        p->answered = 0;
        p->transmitted = 0;
        p->output_length = 0;
    }
    pthread_mutex_unlock(&p->lock);
    return length;
}

/* Move the gathered output (and how many bytes were transmitted) to Python, leaving the
 * registers handed over: what Python sends on at the end of a slice. Returns its length. */
int uart_ports_take_output(struct uart_ports *p, uint32_t *transmitted, uint8_t *output)
{
    pthread_mutex_lock(&p->lock);
    int length = (int)p->output_length;
    *transmitted = p->transmitted;
    memcpy(output, p->output, p->output_length);
    p->transmitted = 0;
    p->output_length = 0;
    pthread_mutex_unlock(&p->lock);
    return length;
}

/* Hand the registers over (Python checked that the state is one this file handles). */
void uart_ports_grant(struct uart_ports *p, const struct uart_registers *regs)
{
    pthread_mutex_lock(&p->lock);
    p->regs = *regs;
    p->granted = 1;
    pthread_mutex_unlock(&p->lock);
}

static int irq_level(const struct uart_registers *r)
{
    int wired = (r->mcr & (MCR_OUT2 | MCR_LOOP)) == MCR_OUT2;
    return wired && (r->ier & IER_THRI) && r->thr_interrupt;
}

/* The guest turned to a register other than THR: the transmitter reports itself empty. */
static void turn_away(struct uart_registers *r)
{
    if (r->transmitting) {
        r->transmitting = 0;
        r->thr_interrupt = 1;
    }
}

/* A read on the state `r` (a copy); 0 if Python must make it. */
static int read_register(struct uart_registers *r, uint32_t offset, uint8_t *value)
{
    turn_away(r);
    switch (offset) {
    case THR: *value = 0; return 1; /* RBR, the receive FIFO empty */
    case IER: *value = r->ier; return 1;
    case IIR:
        if ((r->ier & IER_THRI) && r->thr_interrupt) {
            r->thr_interrupt = 0; /* reading IIR naming THRE acknowledges it */
            *value = IIR_THRI | r->fifo_bits;
        } else {
            *value = IIR_NO_INT | r->fifo_bits;
        }
        return 1;
    case LCR: *value = r->lcr; return 1;
    case MCR: *value = r->mcr; return 1;
    case LSR: *value = r->lsr; return 1; /* no error bits to clear, no data ready */
    case MSR: *value = r->msr; return 1; /* no deltas to clear */
    case SCR: *value = r->scr; return 1;
    }
    return 0;
}

/* A write on the state `r` (a copy); 0 if Python must make it. */
static int write_register(struct uart_ports *p, struct uart_registers *r, uint32_t offset, uint8_t value)
{
    if (offset == THR) {
        if (p->output_length == UART_OUTPUT_SIZE)
            return 0; /* full: Python's take sends it on */
        if (!r->transmitting) {
            if (!r->may_start_transmitting)
                return 0; /* Python starts the thread that reports a silent transmitter empty */
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            r->transmitting = 1;
            r->transmitting_since_ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
        }
        r->thr_interrupt = 0;
        return 1;
    }
    turn_away(r);
    switch (offset) {
    case IER: {
        uint8_t enabled = value & IER_MASK;
        if (enabled & ~r->ier & IER_THRI)
            r->thr_interrupt = 1; /* enabling THRI with THR empty raises it at once */
        else if (!(enabled & IER_THRI))
            r->thr_interrupt = 0;
        r->ier = enabled;
        return 1;
    }
    case SCR: r->scr = value; return 1;
    case LSR: case MSR: return 1; /* read-only */
    }
    return 0; /* FCR, LCR, MCR change what this file may answer */
}

/* Make `next` the state (lock held), and drive the line to its level if that moved. */
static void commit(struct uart_ports *p, void *uc, struct uart_registers *next)
{
    int level = irq_level(next);
    int moved = level != next->irq_level;
    next->irq_level = (uint8_t)level;
    p->regs = *next;
    p->answered = 1;
    if (moved)
        p->python_irq(uc, level);
}

uint32_t uart_port_in(void *uc, uint32_t port, int size, void *user_data)
{
    struct uart_ports *p = user_data;
    uint32_t offset = port - p->base; /* wraps to a large number below the base */
    if (offset < REGISTERS && size == 1 && !*p->stop) {
        pthread_mutex_lock(&p->lock);
        struct uart_registers next = p->regs;
        uint8_t value;
        if (p->granted && read_register(&next, offset, &value)) {
            commit(p, uc, &next);
            pthread_mutex_unlock(&p->lock);
            p->ins++;
            return value;
        }
        pthread_mutex_unlock(&p->lock);
    }
    return p->python_in(uc, port, size, NULL);
}

void uart_port_out(void *uc, uint32_t port, int size, uint32_t value, void *user_data)
{
    struct uart_ports *p = user_data;
    uint32_t offset = port - p->base;
    if (offset < REGISTERS && size == 1 && !*p->stop) {
        pthread_mutex_lock(&p->lock);
        struct uart_registers next = p->regs;
        uint8_t byte = value & 0xFF;
        if (p->granted && write_register(p, &next, offset, byte)) {
            if (offset == THR) {
                p->output[p->output_length++] = byte;
                p->transmitted++;
            }
            commit(p, uc, &next);
            pthread_mutex_unlock(&p->lock);
            p->outs++;
            return;
        }
        pthread_mutex_unlock(&p->lock);
    }
    p->python_out(uc, port, size, value, NULL);
}
