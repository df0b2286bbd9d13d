"""The KVM userspace API structures (linux/kvm.h, asm/kvm.h for x86_64), for cffi.

Layouts are pinned by tests/unit/test_kvm_uapi.py against the sizes and
offsets the kernel headers give, so a typo here fails a test instead of
corrupting an ioctl. `make install` parses the declarations ahead of time
(vmm/cffi_prebuilt.py); without that they are parsed here, at import.
"""

from vmm import cffi_prebuilt

DECLARATIONS = """
    typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32; typedef uint64_t __u64;
    typedef int32_t __s32;

    struct kvm_regs {
        __u64 rax, rbx, rcx, rdx;
        __u64 rsi, rdi, rsp, rbp;
        __u64 r8,  r9,  r10, r11;
        __u64 r12, r13, r14, r15;
        __u64 rip, rflags;
    };

    struct kvm_segment {
        __u64 base;
        __u32 limit;
        __u16 selector;
        __u8  type;
        __u8  present, dpl, db, s, l, g, avl;
        __u8  unusable;
        __u8  padding;
    };

    struct kvm_dtable {
        __u64 base;
        __u16 limit;
        __u16 padding[3];
    };

    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss;
        struct kvm_segment tr, ldt;
        struct kvm_dtable gdt, idt;
        __u64 cr0, cr2, cr3, cr4, cr8;
        __u64 efer;
        __u64 apic_base;
        __u64 interrupt_bitmap[4];
    };

    struct kvm_fpu {
        __u8  fpr[8][16];
        __u16 fcw;
        __u16 fsw;
        __u8  ftwx;
        __u8  pad1;
        __u16 last_opcode;
        __u64 last_ip;
        __u64 last_dp;
        __u8  xmm[16][16];
        __u32 mxcsr;
        __u32 pad2;
    };

    struct kvm_msr_entry {
        __u32 index;
        __u32 reserved;
        __u64 data;
    };

    struct kvm_msrs {
        __u32 nmsrs;
        __u32 pad;
        struct kvm_msr_entry entries[];
    };

    struct kvm_msr_list {
        __u32 nmsrs;
        __u32 indices[];
    };

    struct kvm_cpuid_entry2 {
        __u32 function;
        __u32 index;
        __u32 flags;
        __u32 eax;
        __u32 ebx;
        __u32 ecx;
        __u32 edx;
        __u32 padding[3];
    };

    struct kvm_cpuid2 {
        __u32 nent;
        __u32 padding;
        struct kvm_cpuid_entry2 entries[];
    };

    struct kvm_userspace_memory_region {
        __u32 slot;
        __u32 flags;
        __u64 guest_phys_addr;
        __u64 memory_size;
        __u64 userspace_addr;
    };

    struct kvm_irq_level {
        __u32 irq;   /* a union with __s32 status in the kernel header */
        __u32 level;
    };

    struct kvm_irq_routing_irqchip {
        __u32 irqchip;
        __u32 pin;
    };

    struct kvm_irq_routing_entry {
        __u32 gsi;
        __u32 type;
        __u32 flags;
        __u32 pad;
        union {
            struct kvm_irq_routing_irqchip irqchip;
            __u32 pad[8];
        } u;
    };

    struct kvm_irq_routing {
        __u32 nr;
        __u32 flags;
        struct kvm_irq_routing_entry entries[];
    };

    struct kvm_pic_state {
        __u8 last_irr;
        __u8 irr;
        __u8 imr;
        __u8 isr;
        __u8 priority_add;
        __u8 irq_base;
        __u8 read_reg_select;
        __u8 poll;
        __u8 special_mask;
        __u8 init_state;
        __u8 auto_eoi;
        __u8 rotate_on_auto_eoi;
        __u8 special_fully_nested_mode;
        __u8 init4;
        __u8 elcr;
        __u8 elcr_mask;
    };

    struct kvm_irqchip {
        __u32 chip_id;
        __u32 pad;
        union {
            char dummy[512];
            struct kvm_pic_state pic;
        } chip;   /* the kernel's union also holds struct kvm_ioapic_state */
    };

    struct kvm_pit_config {
        __u32 flags;
        __u32 pad[15];
    };

    struct kvm_irqfd {
        __u32 fd;
        __u32 gsi;
        __u32 flags;
        __u32 resamplefd;
        __u8  pad[16];
    };

    struct kvm_ioeventfd {
        __u64 datamatch;
        __u64 addr;
        __u32 len;
        __s32 fd;
        __u32 flags;
        __u8  pad[36];
    };

    struct kvm_lapic_state {
        char regs[1024];
    };

    struct kvm_mp_state {
        __u32 mp_state;
    };

    struct kvm_translation {
        __u64 linear_address;
        __u64 physical_address;
        __u8  valid;
        __u8  writeable;
        __u8  usermode;
        __u8  pad[5];
    };

    struct kvm_guest_debug {
        __u32 control;
        __u32 pad;
        __u64 debugreg[8];   /* struct kvm_guest_debug_arch: DR0-DR7 */
    };

    struct kvm_run {
        __u8 request_interrupt_window;
        __u8 immediate_exit;
        __u8 padding1[6];
        __u32 exit_reason;
        __u8 ready_for_interrupt_injection;
        __u8 if_flag;
        __u16 flags;
        __u64 cr8;
        __u64 apic_base;
        union {
            struct { __u64 hardware_exit_reason; } hw;
            struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
            struct { __u32 exception; __u32 error_code; } ex;
            struct { __u32 exception; __u32 pad; __u64 pc; __u64 dr6; __u64 dr7; } debug;
            struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
            struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
            struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
            struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
            char padding[256];
        };
        __u64 kvm_valid_regs;
        __u64 kvm_dirty_regs;
        union { char padding[2048]; } s;
    };

    int ioctl(int fd, unsigned long request, ...);
"""

ffi = cffi_prebuilt.load(DECLARATIONS, "vmm.kvm._uapi_prebuilt")

# libc, for ioctl: cffi releases the GIL around the call and reports EINTR
# instead of retrying, which KVM_RUN needs.
libc = ffi.dlopen(None)

# kvm_run.exit_reason values.
KVM_EXIT_IO = 2
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_API_VERSION = 12

# Capabilities (KVM_CHECK_EXTENSION arguments).
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_PIT2 = 33
KVM_CAP_IRQFD = 32
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_SET_GUEST_DEBUG2 = 195

# kvm_guest_debug.control (linux/kvm.h, asm/kvm.h).
KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_GUESTDBG_USE_HW_BP = 0x20000
KVM_GUESTDBG_INJECT_DB = 0x40000
KVM_GUESTDBG_INJECT_BP = 0x80000
KVM_GUESTDBG_BLOCKIRQ = 0x100000

KVM_PIT_SPEAKER_DUMMY = 1
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
