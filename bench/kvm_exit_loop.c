/* The peer for bench_exits.py: the smallest useful KVM exit loop in C.
 *
 * Loads a flat real-mode image at 0x10000, enters it at 1000:0000 and
 * handles port-I/O and MMIO exits (a read gets zeros) until the guest writes
 * to port 0xf4, the same contract as `pyvmm boot --flat`. No devices, no threads: this is the floor
 * a VMM's exit path cannot go below. */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define MEM_SIZE (2 << 20)

static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s IMAGE\n", argv[0]); return 2; }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    unsigned char *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    FILE *image = fopen(argv[1], "rb");
    if (!image) die(argv[1]);
    fread(mem + 0x10000, 1, MEM_SIZE - 0x10000, image);
    fclose(image);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (unsigned long)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    struct kvm_sregs sregs;
    ioctl(vcpu, KVM_GET_SREGS, &sregs);
    sregs.cs.selector = 0x1000;
    sregs.cs.base = 0x10000;
    ioctl(vcpu, KVM_SET_SREGS, &sregs);
    struct kvm_regs regs = {.rip = 0, .rflags = 2};
    ioctl(vcpu, KVM_SET_REGS, &regs);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (run->exit_reason == KVM_EXIT_MMIO) {
            if (!run->mmio.is_write) memset(run->mmio.data, 0, sizeof run->mmio.data);
            continue;
        }
        if (run->exit_reason != KVM_EXIT_IO) { fprintf(stderr, "exit %d\n", run->exit_reason); return 1; }
        if (run->io.port == 0xf4) return 0;
    }
}
