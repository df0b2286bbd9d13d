/* The compiled KVM exit loop (built by vmm/kvm/exit_loop_build.py; used by
 * vmm/kvm/exit_loop.py, which explains when and why).
 *
 * exit_loop_run() enters the guest with KVM_RUN and handles port-I/O and
 * MMIO exits itself: it decodes kvm_run, calls into Python for the device
 * access only (the four functions below, which call Bus.read / Bus.write),
 * puts a read's value
 * where the guest's instruction finds it, and enters the guest again. Every
 * other exit goes back to Python, which decodes it from kvm_run as the
 * pure-Python loop does. The GIL is released while this runs (cffi does it)
 * and taken again only for each device call. */
#include <errno.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

/* What exit_loop_run() returns. */
#define LOOP_EXIT 0          /* an exit for Python to decode: run->exit_reason */
#define LOOP_INTERRUPTED 1   /* KVM_RUN returned EINTR (a kick) or EAGAIN (waiting for INIT/SIPI) */
#define LOOP_RUN_FAILED 2    /* KVM_RUN failed otherwise; *error holds errno */
#define LOOP_DEVICE_RAISED 3 /* a device call raised; Python kept the exception */

/* The device calls into Python: cffi defines them after this source (exit_loop_build.py
 * declares them `extern "Python"`). Each returns 0, or -1 when the device raised. */
static int exit_loop_pio_write(void *vcpu, uint16_t port, uint32_t size, uint32_t value);
static int exit_loop_pio_read(void *vcpu, uint16_t port, uint32_t size, uint32_t *value);
static int exit_loop_mmio_write(void *vcpu, uint64_t address, uint32_t size, uint64_t value);
static int exit_loop_mmio_read(void *vcpu, uint64_t address, uint32_t size, uint64_t *value);

struct exit_counts {
    uint64_t io_out, io_in, mmio_write, mmio_read;
};

/* One port item: `count` of them for `rep outs` / `rep ins`, each a device access. */
static int port_io(void *vcpu, struct kvm_run *run) {
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    uint32_t size = run->io.size;
    for (uint32_t item = 0; item < run->io.count; item++, data += size) {
        uint32_t value = 0;
        if (run->io.direction == KVM_EXIT_IO_OUT) {
            memcpy(&value, data, size); /* x86 is little-endian, as the guest's bytes are */
            if (exit_loop_pio_write(vcpu, run->io.port, size, value) < 0)
                return -1;
        } else {
            if (exit_loop_pio_read(vcpu, run->io.port, size, &value) < 0)
                return -1;
            memcpy(data, &value, size);
        }
    }
    return 0;
}

static int mmio(void *vcpu, struct kvm_run *run) {
    /* The kernel never says more than 8; the data area holds 8. */
    uint32_t size = run->mmio.len < 8 ? run->mmio.len : 8;
    uint64_t value = 0;
    if (run->mmio.is_write) {
        memcpy(&value, run->mmio.data, size);
        return exit_loop_mmio_write(vcpu, run->mmio.phys_addr, size, value);
    }
    if (exit_loop_mmio_read(vcpu, run->mmio.phys_addr, size, &value) < 0)
        return -1;
    memcpy(run->mmio.data, &value, size);
    return 0;
}

static int exit_loop_run(int fd, struct kvm_run *run, void *vcpu, struct exit_counts *counts, int *error) {
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                return LOOP_INTERRUPTED;
            *error = errno;
            return LOOP_RUN_FAILED;
        }
        int failed;
        if (run->exit_reason == KVM_EXIT_IO) {
            if (run->io.direction == KVM_EXIT_IO_OUT)
                counts->io_out++;
            else
                counts->io_in++;
            failed = port_io(vcpu, run);
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            if (run->mmio.is_write)
                counts->mmio_write++;
            else
                counts->mmio_read++;
            failed = mmio(vcpu, run);
        } else {
            return LOOP_EXIT;
        }
        if (failed)
            return LOOP_DEVICE_RAISED;
    }
}
