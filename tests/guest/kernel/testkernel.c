/* A tiny 64-bit "kernel" that reports what pyvmm's Linux loader handed it.
 *
 * It is booted like Linux (a bzImage, entered in 64-bit mode with RSI =
 * boot_params) and prints, on COM1, what it finds: the command line, the
 * e820 map, the initrd, the ACPI tables reached from boot_params.acpi_rsdp_addr
 * and by the legacy scan, the MADT's CPUs. It then starts every other CPU
 * with INIT/SIPI through the local APIC, takes the UART's interrupt through
 * the I/O APIC, and powers off through the FADT's sleep control register.
 * tests/guest/test_linux_loader.py asserts on the lines it prints.
 *
 * Each mechanism is one Linux relies on; the test runs in seconds where a
 * real kernel cannot run at all (the kvm_pvm hosts, PLATFORM.md). */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define COM1 0x3f8
#define LAPIC 0xFEE00000UL
#define TRAMPOLINE 0x10000UL
#define UART_VECTOR 0x24
#define MAX_CPUS 64

static inline void outb(u16 port, u8 value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio_read32(u64 address) { return *(volatile u32 *)address; }
static inline void mmio_write32(u64 address, u32 value) { *(volatile u32 *)address = value; }
static inline void pause(void) { __asm__ volatile("pause"); }

/* ---- output ------------------------------------------------------------ */

static volatile int print_lock;

static void lock(void) { while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE)) pause(); }
static void unlock(void) { __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE); }

static void put_char(char c) { outb(COM1, (u8)c); }
static void put_str(const char *s) { while (*s) put_char(*s++); }

static void put_hex(u64 value, int digits) {
    for (int shift = (digits - 1) * 4; shift >= 0; shift -= 4) put_char("0123456789abcdef"[(value >> shift) & 0xf]);
}

static void put_dec(u64 value) {
    char buffer[24];
    int n = 0;
    do { buffer[n++] = (char)('0' + value % 10); value /= 10; } while (value);
    while (n) put_char(buffer[--n]);
}

/* A printf with %s, %d (unsigned), %x (minimal hex), %X (16 digits), %c. */
static void say(const char *format, ...) {
    __builtin_va_list args;
    __builtin_va_start(args, format);
    lock();
    for (const char *p = format; *p; p++) {
        if (*p != '%') { put_char(*p); continue; }
        switch (*++p) {
        case 's': put_str(__builtin_va_arg(args, const char *)); break;
        case 'd': put_dec(__builtin_va_arg(args, u64)); break;
        case 'c': put_char((char)__builtin_va_arg(args, int)); break;
        case 'X': put_hex(__builtin_va_arg(args, u64), 16); break;
        case 'x': {
            u64 v = __builtin_va_arg(args, u64);
            int digits = 1;
            while (digits < 16 && (v >> (digits * 4))) digits++;
            put_hex(v, digits);
            break;
        }
        default: put_char(*p);
        }
    }
    unlock();
    __builtin_va_end(args);
}

static void power_off_via_debug_exit(u8 status) { outb(0xf4, status); for (;;) __asm__ volatile("cli; hlt"); }

/* ---- boot_params ------------------------------------------------------- */

#define BP_U8(bp, off) (*(volatile u8 *)((bp) + (off)))
#define BP_U16(bp, off) (*(volatile u16 *)((bp) + (off)))
#define BP_U32(bp, off) (*(volatile u32 *)((bp) + (off)))
#define BP_U64(bp, off) (*(volatile u64 *)((bp) + (off)))

static int memeq(const void *a, const void *b, u64 n) {
    const u8 *x = a, *y = b;
    for (u64 i = 0; i < n; i++) if (x[i] != y[i]) return 0;
    return 1;
}

static int checksum_ok(const u8 *table, u64 length) {
    u8 sum = 0;
    for (u64 i = 0; i < length; i++) sum += table[i];
    return sum == 0;
}

static void report_boot_params(u64 bp) {
    say("testkernel: boot_params at %x, header %s\n", bp,
        BP_U32(bp, 0x202) == 0x53726448 ? "HdrS" : "missing");
    u64 cmdline = BP_U32(bp, 0x228) | ((u64)BP_U32(bp, 0x0c8) << 32);
    say("cmdline: %s\n", (const char *)cmdline);
    u8 entries = BP_U8(bp, 0x1e8);
    u64 ram = 0;
    for (int i = 0; i < entries; i++) {
        u64 entry = bp + 0x2d0 + 20 * i;
        u64 address = BP_U64(entry, 0), size = BP_U64(entry, 8);
        u32 type = BP_U32(entry, 16);
        say("e820: %X-%X type %d\n", address, address + size - 1, (u64)type);
        if (type == 1) ram += size;
    }
    say("e820: %d MiB of RAM\n", ram >> 20);
    u64 initrd = BP_U32(bp, 0x218) | ((u64)BP_U32(bp, 0x0c0) << 32);
    u64 initrd_size = BP_U32(bp, 0x21c) | ((u64)BP_U32(bp, 0x0c4) << 32);
    if (initrd_size) {
        char text[33];
        u64 n = initrd_size < 32 ? initrd_size : 32;
        for (u64 i = 0; i < n; i++) {
            char c = ((const char *)initrd)[i];
            text[i] = (c >= 32 && c < 127) ? c : '.';
        }
        text[n] = 0;
        say("initrd: %d bytes at %x (page aligned: %s): %s\n", initrd_size, initrd,
            (initrd & 0xfff) ? "no" : "yes", text);
    } else {
        say("initrd: none\n");
    }
}

/* ---- ACPI -------------------------------------------------------------- */

static u32 cpu_apic_ids[MAX_CPUS];
static int cpu_count;
static u64 ioapic_base;
static u64 sleep_control_port;

static void parse_madt(const u8 *madt) {
    u32 length = *(const u32 *)(madt + 4);
    for (u32 offset = 44; offset + 2 <= length; offset += madt[offset + 1]) {
        const u8 *entry = madt + offset;
        if (entry[1] == 0) break;
        if (entry[0] == 0 && (*(const u32 *)(entry + 4) & 1) && cpu_count < MAX_CPUS)
            cpu_apic_ids[cpu_count++] = entry[3];
        if (entry[0] == 1) ioapic_base = *(const u32 *)(entry + 4);
        if (entry[0] == 2)
            say("madt: interrupt override irq %d -> gsi %d\n", (u64)entry[3], (u64)*(const u32 *)(entry + 4));
    }
    say("madt: %d local apics, ioapic at %x\n", (u64)cpu_count, ioapic_base);
}

static void parse_fadt(const u8 *fadt) {
    u32 flags = *(const u32 *)(fadt + 112);
    say("fadt: revision %d, hardware-reduced %s\n", (u64)fadt[8], (flags & (1 << 20)) ? "yes" : "no");
    const u8 *sleep_control = fadt + 244;  /* a Generic Address Structure */
    if (sleep_control[0] == 1) sleep_control_port = *(const u64 *)(sleep_control + 4);
    say("fadt: sleep control register at port %x\n", sleep_control_port);
}

static void report_acpi(u64 bp) {
    u64 rsdp = BP_U64(bp, 0x070);
    u64 scanned = 0;
    for (u64 a = 0xE0000; a < 0x100000; a += 16)
        if (memeq((const void *)a, "RSD PTR ", 8)) { scanned = a; break; }
    say("rsdp: boot_params %x, legacy scan %x\n", rsdp, scanned);
    if (!rsdp || !memeq((const void *)rsdp, "RSD PTR ", 8)) { say("rsdp: missing\n"); return; }
    const u8 *r = (const u8 *)rsdp;
    say("rsdp: revision %d, checksums %s\n", (u64)r[15],
        checksum_ok(r, 20) && checksum_ok(r, *(const u32 *)(r + 20)) ? "ok" : "BAD");
    const u8 *xsdt = (const u8 *)*(const u64 *)(r + 24);
    u32 length = *(const u32 *)(xsdt + 4);
    say("xsdt: %s, checksum %s\n", memeq(xsdt, "XSDT", 4) ? "found" : "BAD", checksum_ok(xsdt, length) ? "ok" : "BAD");
    for (u32 offset = 36; offset + 8 <= length; offset += 8) {
        const u8 *table = (const u8 *)*(const u64 *)(xsdt + offset);
        u32 table_length = *(const u32 *)(table + 4);
        say("acpi: %c%c%c%c checksum %s\n", table[0], table[1], table[2], table[3],
            checksum_ok(table, table_length) ? "ok" : "BAD");
        if (memeq(table, "APIC", 4)) parse_madt(table);
        if (memeq(table, "FACP", 4)) {
            parse_fadt(table);
            const u8 *dsdt = (const u8 *)*(const u64 *)(table + 140);
            say("acpi: %c%c%c%c checksum %s\n", dsdt[0], dsdt[1], dsdt[2], dsdt[3],
                checksum_ok(dsdt, *(const u32 *)(dsdt + 4)) ? "ok" : "BAD");
        }
    }
}

/* ---- SMP --------------------------------------------------------------- */

extern char ap_trampoline[], ap_trampoline_end[], ap_cr3[], ap_stack[];
static u8 ap_stacks[MAX_CPUS][4096] __attribute__((aligned(16)));
static volatile int aps_started;

static int gdb_mode;
void gdb_ap_work(void);

void ap_main(void) {
    u32 id = mmio_read32(LAPIC + 0x20) >> 24;
    say("smp: cpu with apic id %d is up\n", (u64)id);
    __atomic_add_fetch(&aps_started, 1, __ATOMIC_SEQ_CST);
    if (gdb_mode) gdb_ap_work();   /* a breakpoint there stops both CPUs */
    for (;;) __asm__ volatile("cli; hlt");
}

static void send_ipi(u32 apic_id, u32 command) {
    mmio_write32(LAPIC + 0x310, apic_id << 24);
    mmio_write32(LAPIC + 0x300, command);
    for (int i = 0; i < 100000 && (mmio_read32(LAPIC + 0x300) & (1 << 12)); i++) pause();
}

static int wait_for(volatile int *counter, int value) {
    for (long i = 0; i < 20000000; i++) {
        if (*counter >= value) return 1;
        pause();
    }
    return 0;
}

static void start_other_cpus(void) {
    u32 self = mmio_read32(LAPIC + 0x20) >> 24;
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 size = (u64)(ap_trampoline_end - ap_trampoline);
    for (u64 i = 0; i < size; i++) ((volatile u8 *)TRAMPOLINE)[i] = ap_trampoline[i];
    *(volatile u64 *)(TRAMPOLINE + (ap_cr3 - ap_trampoline)) = cr3;
    int started = 0;
    for (int i = 0; i < cpu_count; i++) {
        if (cpu_apic_ids[i] == self) continue;
        *(volatile u64 *)(TRAMPOLINE + (ap_stack - ap_trampoline)) = (u64)&ap_stacks[i][4096];
        send_ipi(cpu_apic_ids[i], 0x4500);                          /* INIT */
        send_ipi(cpu_apic_ids[i], 0x4600 | (TRAMPOLINE >> 12));     /* SIPI */
        if (!wait_for(&aps_started, started + 1)) {
            send_ipi(cpu_apic_ids[i], 0x4600 | (TRAMPOLINE >> 12)); /* the second SIPI of the MP spec */
            if (!wait_for(&aps_started, started + 1)) {
                say("smp: apic id %d did not start\n", (u64)cpu_apic_ids[i]);
                continue;
            }
        }
        started++;
    }
    say("smp: %d cpus online\n", (u64)(started + 1));
}

/* ---- the UART interrupt through the I/O APIC --------------------------- */

struct idt_gate { u16 offset_low, selector; u8 ist, type; u16 offset_mid; u32 offset_high, reserved; };
static struct idt_gate idt[256] __attribute__((aligned(16)));
static volatile int uart_interrupts;
extern char uart_irq_entry[];

void uart_irq(void) {
    (void)inb(COM1 + 2);            /* reading IIR acknowledges the THR-empty interrupt */
    outb(COM1 + 1, 0);              /* IER: no more interrupts */
    uart_interrupts++;
    mmio_write32(LAPIC + 0xB0, 0);  /* EOI */
}

static void ioapic_write(u32 reg, u32 value) {
    mmio_write32(ioapic_base, reg);
    mmio_write32(ioapic_base + 0x10, value);
}

/* The 8259s are left as the VMM's firmware state has them, because Linux on
 * a hardware-reduced ACPI machine never programs them: LINT0 is ExtINT, so
 * unless they are masked this interrupt would also arrive as vector 4 (#OF),
 * which has no gate here. */
static void take_uart_interrupt(void) {
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    u64 handler = (u64)uart_irq_entry;
    idt[UART_VECTOR] = (struct idt_gate){(u16)handler, cs, 0, 0x8E, (u16)(handler >> 16), (u32)(handler >> 32), 0};
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
    mmio_write32(LAPIC + 0xF0, 0x1FF);  /* software-enable the LAPIC, spurious vector 0xff */
    mmio_write32(LAPIC + 0x80, 0);      /* TPR: accept everything */
    u32 self = mmio_read32(LAPIC + 0x20) >> 24;
    ioapic_write(0x10 + 2 * 4 + 1, self << 24);   /* pin 4 (COM1): to this CPU */
    ioapic_write(0x10 + 2 * 4, UART_VECTOR);      /* fixed, edge, active high, unmasked */
    outb(COM1 + 4, 0x08);           /* MCR: OUT2 gates the UART's interrupt onto the bus, as on a PC */
    __asm__ volatile("sti");
    outb(COM1 + 1, 0x02);           /* IER: THR empty -> the UART interrupts at once */
    for (long i = 0; i < 20000000 && !uart_interrupts; i++) pause();
    __asm__ volatile("cli");
    say("uart irq: %s\n", uart_interrupts ? "taken through the ioapic" : "MISSING");
}

/* ---- CPU tests: exceptions, timers, ring 3 and SYSCALL (testkernel=cpu) --- */

struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error_code, rip, cs, rflags, rsp, ss;
};

extern char isr_13[], isr_14[], isr_0x30[], isr_0x31[], isr_0x80[], isr_0x40[];
extern char probe_fixup[], syscall_entry[], user_main[];
extern u64 probe_read(u64 address);
extern u64 probe_write(u64 address);
extern void enter_user(void *entry, void *stack);

static u64 gdt[7] __attribute__((aligned(16)));
static u8 tss[104] __attribute__((aligned(16)));
static u8 ring0_stack[8192] __attribute__((aligned(16)));
static u8 user_stack[8192] __attribute__((aligned(16)));
static volatile int lapic_ticks, pit_ticks, int80_from_cpl[4];
static volatile u64 last_cr2, last_error;
static void virtio_interrupt(void);

static inline u64 rdmsr(u32 msr) {
    u32 low, high;
    __asm__ volatile("rdmsr" : "=a"(low), "=d"(high) : "c"(msr));
    return low | ((u64)high << 32);
}
static inline void wrmsr(u32 msr, u64 value) {
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)));
}

static void set_gate(int vector, void *handler, int dpl) {
    u64 h = (u64)handler;
    idt[vector] = (struct idt_gate){(u16)h, 0x08, 0, (u8)(0x8E | (dpl << 5)), (u16)(h >> 16), (u32)(h >> 32), 0};
}

void isr_dispatch(struct frame *f) {
    switch (f->vector) {
    case 14: {
        u64 cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        last_cr2 = cr2;
        last_error = f->error_code;
        f->rip = (u64)probe_fixup;      /* resume as if the probe returned -1 */
        return;
    }
    case 13:
        say("cpu: unexpected #GP at %x, error %x\n", f->rip, f->error_code);
        power_off_via_debug_exit(1);
        return;
    case 0x30: lapic_ticks++; break;
    case 0x31: pit_ticks++; break;
    case 0x80: int80_from_cpl[f->cs & 3]++; return;   /* software interrupts take no EOI */
    case 0x40: virtio_interrupt(); break;
    }
    mmio_write32(LAPIC + 0xB0, 0);
}

static volatile u64 syscall_number, syscall_argument, syscall_user_rip;

void syscall_handler(u64 number, u64 argument, u64 *stack) {
    syscall_number = number;
    syscall_argument = argument;
    syscall_user_rip = stack[1];        /* RCX as SYSCALL saved it: the return address */
}

/* Our own GDT (the loader's has no ring-3 segments) with a TSS for ring 3 -> 0. */
static void load_descriptor_tables(void) {
    u64 base = (u64)tss;
    gdt[1] = 0x00AF9A000000FFFFUL;      /* 0x08 kernel code */
    gdt[2] = 0x00CF92000000FFFFUL;      /* 0x10 kernel data */
    gdt[3] = 0x00CFF2000000FFFFUL;      /* 0x18 user data (DPL 3) */
    gdt[4] = 0x00AFFA000000FFFFUL;      /* 0x20 user code (DPL 3) */
    gdt[5] = 103 | ((base & 0xFFFFFF) << 16) | (0x89UL << 40) | (((base >> 24) & 0xFF) << 56);
    gdt[6] = base >> 32;
    *(u64 *)(tss + 4) = (u64)&ring0_stack[sizeof(ring0_stack)];   /* RSP0 */
    *(u16 *)(tss + 102) = sizeof(tss);                            /* no I/O bitmap */
    struct { u16 limit; u64 base; } __attribute__((packed)) gdtr = {sizeof(gdt) - 1, (u64)gdt};
    __asm__ volatile(
        "lgdt %0\n"
        "pushq $0x08\n"
        "lea 1f(%%rip), %%rax\n"
        "pushq %%rax\n"
        "lretq\n"
        "1: mov $0x10, %%ax\n"
        "mov %%ax, %%ds\n mov %%ax, %%es\n mov %%ax, %%ss\n"
        "mov $0x28, %%ax\n ltr %%ax\n"
        : : "m"(gdtr) : "rax", "memory");
    set_gate(13, isr_13, 0);
    set_gate(14, isr_14, 0);
    set_gate(0x30, isr_0x30, 0);
    set_gate(0x31, isr_0x31, 0);
    set_gate(0x80, isr_0x80, 3);        /* DPL 3: user code may `int $0x80` */
    set_gate(0x40, isr_0x40, 0);
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
    say("cpu: gdt, tss and idt loaded\n");
}

static void test_page_faults(void) {
    /* The loader maps the first 4 GiB; 5 GiB is not mapped. */
    u64 value = probe_read(0x140000000UL);
    say("pf: read returned %x, cr2 %x, error code %x\n", value, last_cr2, last_error);
    value = probe_write(0x140001000UL);
    say("pf: write returned %x, cr2 %x, error code %x\n", value, last_cr2, last_error);
}

static void wait_for_interrupts(volatile int *counter, int target) {
    for (long i = 0; i < 20000000 && *counter < target; i++) __asm__ volatile("sti; hlt; cli");
}

static void test_timers(void) {
    mmio_write32(LAPIC + 0xF0, 0x1FF);          /* LAPIC on, spurious vector 0xff */
    mmio_write32(LAPIC + 0x80, 0);
    /* The 8259s as the VMM leaves them (see take_uart_interrupt): the PIT's IRQ 0 reaches only the I/O APIC. */
    mmio_write32(LAPIC + 0x3E0, 0xB);           /* divide by 1 */
    mmio_write32(LAPIC + 0x320, 0x30);          /* LVT timer: one-shot, vector 0x30 */
    mmio_write32(LAPIC + 0x380, 1000000);
    wait_for_interrupts(&lapic_ticks, 1);
    say("timer: lapic one-shot %s\n", lapic_ticks == 1 ? "fired once" : "MISSING");
    u32 self = mmio_read32(LAPIC + 0x20) >> 24;
    ioapic_write(0x10 + 2 * 2 + 1, self << 24); /* I/O APIC pin 2 is the PIT (the MADT's IRQ0 override) */
    ioapic_write(0x10 + 2 * 2, 0x31);
    outb(0x43, 0x34);                           /* PIT channel 0, lobyte/hibyte, mode 2 */
    outb(0x40, 1193 & 0xff);                    /* 1 ms */
    outb(0x40, 1193 >> 8);
    wait_for_interrupts(&pit_ticks, 3);
    ioapic_write(0x10 + 2 * 2, 0x10000);        /* mask the pin again */
    say("timer: pit through the ioapic %s\n", pit_ticks >= 3 ? "ticking" : "MISSING");
}

static void test_ring3(void) {
    /* Let ring 3 use the first 2 MiB, where this image and its stacks live. */
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 *pml4 = (u64 *)(cr3 & ~0xFFFUL);
    u64 *pdpt = (u64 *)(pml4[0] & ~0xFFFUL);
    u64 *pd = (u64 *)(pdpt[0] & ~0xFFFUL);
    pml4[0] |= 4;
    pdpt[0] |= 4;
    pd[0] |= 4;
    __asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
    wrmsr(0xC0000080, rdmsr(0xC0000080) | 1);             /* EFER.SCE */
    wrmsr(0xC0000081, (0x10UL << 48) | (0x08UL << 32));   /* STAR: SYSRET base 0x10, SYSCALL CS 0x08 */
    wrmsr(0xC0000082, (u64)syscall_entry);                /* LSTAR */
    wrmsr(0xC0000084, 0x200);                             /* SFMASK: IF off in the kernel */
    enter_user(user_main, &user_stack[sizeof(user_stack)]);
    say("ring3: syscall %d with argument %d, returning to %x (user_main %x)\n",
        syscall_number, syscall_argument, syscall_user_rip, (u64)user_main);
    say("ring3: int 0x80 taken from cpl 3: %d times\n", (u64)int80_from_cpl[3]);
    say("ring3: back in the kernel\n");
}

static void test_int80_in_ring0(void) {
    say("int 0x80 from ring 0: trying\n");
    __asm__ volatile("int $0x80");
    say("int 0x80 from ring 0: taken %d times\n", (u64)int80_from_cpl[0]);
}

/* ---- a minimal virtio-blk driver (testkernel=virtio) ------------------------ */

/* virtio-mmio version 2 register offsets. */
enum {
    VIRTIO_MAGIC = 0x00, VIRTIO_VERSION = 0x04, VIRTIO_DEVICE_ID = 0x08, VIRTIO_DEVICE_FEATURES = 0x10,
    VIRTIO_DEVICE_FEATURES_SEL = 0x14, VIRTIO_DRIVER_FEATURES = 0x20, VIRTIO_DRIVER_FEATURES_SEL = 0x24,
    VIRTIO_QUEUE_SEL = 0x30, VIRTIO_QUEUE_NUM_MAX = 0x34, VIRTIO_QUEUE_NUM = 0x38, VIRTIO_QUEUE_READY = 0x44,
    VIRTIO_QUEUE_NOTIFY = 0x50, VIRTIO_INTERRUPT_STATUS = 0x60, VIRTIO_INTERRUPT_ACK = 0x64,
    VIRTIO_STATUS = 0x70, VIRTIO_QUEUE_DESC = 0x80, VIRTIO_QUEUE_DRIVER = 0x90, VIRTIO_QUEUE_DEVICE = 0xa0,
    VIRTIO_CONFIG = 0x100,
};
#define QUEUE_SIZE 8

struct virtq_desc { u64 address; u32 length; u16 flags, next; };
struct virtq_avail { u16 flags, index, ring[QUEUE_SIZE], used_event; };
struct virtq_used { u16 flags, index; struct { u32 id, length; } ring[QUEUE_SIZE]; u16 avail_event; };
struct blk_request { u32 type, reserved; u64 sector; };

static struct virtq_desc descs[QUEUE_SIZE] __attribute__((aligned(16)));
static struct virtq_avail avail __attribute__((aligned(2)));
static struct virtq_used used __attribute__((aligned(4)));
static struct blk_request request;
static u8 sector_buffer[512];
static volatile u8 request_status;
static u64 virtio_base;
static volatile int virtio_interrupts;

static void virtio_interrupt(void) {
    u32 pending = mmio_read32(virtio_base + VIRTIO_INTERRUPT_STATUS);
    mmio_write32(virtio_base + VIRTIO_INTERRUPT_ACK, pending);
    virtio_interrupts++;
}

static void set_queue_address(u32 reg, void *address) {
    mmio_write32(virtio_base + reg, (u32)(u64)address);
    mmio_write32(virtio_base + reg + 4, (u32)((u64)address >> 32));
}

/* One request (type 0 read, 1 write) of one sector to or from `buffer`, and wait for its interrupt. */
static int blk_request(u32 type, u64 sector, u8 *buffer) {
    request = (struct blk_request){type, 0, sector};
    request_status = 0xff;
    u16 data_flags = type == 0 ? 2 : 0;  /* VIRTQ_DESC_F_WRITE: the device writes a read's data */
    descs[0] = (struct virtq_desc){(u64)&request, sizeof(request), 1, 1};
    descs[1] = (struct virtq_desc){(u64)buffer, 512, (u16)(1 | data_flags), 2};
    descs[2] = (struct virtq_desc){(u64)&request_status, 1, 2, 0};
    int before = virtio_interrupts;
    u16 index = avail.index;
    avail.ring[index % QUEUE_SIZE] = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    avail.index = index + 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    mmio_write32(virtio_base + VIRTIO_QUEUE_NOTIFY, 0);
    for (long i = 0; i < 20000000 && virtio_interrupts == before; i++) __asm__ volatile("sti; hlt; cli");
    return virtio_interrupts > before && used.index == (u16)(index + 1) ? request_status : -1;
}

/* Find the first virtio-blk window, bring the device up, route its interrupt. */
static int virtio_blk_setup(void) {
    int slot = -1;
    for (int i = 0; i < 8; i++) {
        u64 base = 0xC0000000UL + 0x1000UL * i;
        if (mmio_read32(base + VIRTIO_MAGIC) == 0x74726976 && mmio_read32(base + VIRTIO_DEVICE_ID) == 2) {
            virtio_base = base;
            slot = i;
            break;
        }
    }
    if (slot < 0) { say("virtio: no block device\n"); return 0; }
    say("virtio: block device at %x, version %d\n", virtio_base, (u64)mmio_read32(virtio_base + VIRTIO_VERSION));
    mmio_write32(virtio_base + VIRTIO_STATUS, 0);
    mmio_write32(virtio_base + VIRTIO_STATUS, 1 | 2);                   /* ACKNOWLEDGE | DRIVER */
    mmio_write32(virtio_base + VIRTIO_DEVICE_FEATURES_SEL, 1);
    u32 high = mmio_read32(virtio_base + VIRTIO_DEVICE_FEATURES);
    mmio_write32(virtio_base + VIRTIO_DRIVER_FEATURES_SEL, 1);
    mmio_write32(virtio_base + VIRTIO_DRIVER_FEATURES, high & 1);       /* VIRTIO_F_VERSION_1 only */
    mmio_write32(virtio_base + VIRTIO_DRIVER_FEATURES_SEL, 0);
    mmio_write32(virtio_base + VIRTIO_DRIVER_FEATURES, 0);
    mmio_write32(virtio_base + VIRTIO_STATUS, 1 | 2 | 8);               /* FEATURES_OK */
    if (!(mmio_read32(virtio_base + VIRTIO_STATUS) & 8)) { say("virtio: features refused\n"); return 0; }
    u32 capacity = mmio_read32(virtio_base + VIRTIO_CONFIG);
    say("virtio: capacity %d sectors\n", (u64)capacity);
    mmio_write32(virtio_base + VIRTIO_QUEUE_SEL, 0);
    if (mmio_read32(virtio_base + VIRTIO_QUEUE_NUM_MAX) < QUEUE_SIZE) { say("virtio: queue too small\n"); return 0; }
    mmio_write32(virtio_base + VIRTIO_QUEUE_NUM, QUEUE_SIZE);
    set_queue_address(VIRTIO_QUEUE_DESC, descs);
    set_queue_address(VIRTIO_QUEUE_DRIVER, &avail);
    set_queue_address(VIRTIO_QUEUE_DEVICE, &used);
    mmio_write32(virtio_base + VIRTIO_QUEUE_READY, 1);
    mmio_write32(virtio_base + VIRTIO_STATUS, 1 | 2 | 8 | 4);           /* DRIVER_OK */

    /* Its interrupt: GSI 16 + slot, edge-triggered, active high, as the DSDT says. */
    mmio_write32(LAPIC + 0xF0, 0x1FF);
    u32 self = mmio_read32(LAPIC + 0x20) >> 24;
    ioapic_write(0x10 + 2 * (16 + slot) + 1, self << 24);
    ioapic_write(0x10 + 2 * (16 + slot), 0x40);
    return 1;
}

static void test_virtio_blk(void) {
    int status = blk_request(0, 0, sector_buffer);
    sector_buffer[31] = 0;
    say("virtio: read sector 0: status %d, data \"%s\"\n", (u64)(u32)status, (const char *)sector_buffer);
    const char *text = "written by the test kernel";
    for (int i = 0; i < 512; i++) sector_buffer[i] = 0;
    for (int i = 0; text[i]; i++) sector_buffer[i] = (u8)text[i];
    status = blk_request(1, 1, sector_buffer);
    say("virtio: wrote sector 1: status %d, interrupts %d\n", (u64)(u32)status, (u64)virtio_interrupts);
}

/* The device writes code over code the CPU has run (DMA into a page that
 * held a program, as a page cache does): the CPU must run the new code. A
 * software CPU that keeps its translation of the old code would not. */
static u8 code_page[4096] __attribute__((aligned(4096)));

static void test_dma_over_code(void) {
    int first_status = blk_request(0, 2, code_page);
    int first = ((int (*)(void))code_page)();
    int second_status = blk_request(0, 3, code_page);
    int second = ((int (*)(void))code_page)();
    say("virtio: code read from sector 2 (status %d) returned %d, then from sector 3 (status %d) returned %d\n",
        (u64)(u32)first_status, (u64)(u32)first, (u64)(u32)second_status, (u64)(u32)second);
}

static int has_word(const char *text, const char *word);

/* The tests named on the command line (test.pf test.timers test.ring3
 * test.int80 test.virtio test.dmacode), in that order, then power off. */
static void cpu_tests(const char *cmdline) {
    load_descriptor_tables();
    if (has_word(cmdline, "test.pf")) test_page_faults();
    if (has_word(cmdline, "test.timers")) test_timers();
    if (has_word(cmdline, "test.ring3")) test_ring3();
    if (has_word(cmdline, "test.int80")) test_int80_in_ring0();
    if (has_word(cmdline, "test.virtio") || has_word(cmdline, "test.dmacode")) {
        if (virtio_blk_setup()) {
            if (has_word(cmdline, "test.virtio")) test_virtio_blk();
            if (has_word(cmdline, "test.dmacode")) test_dma_over_code();
        }
    }
    say("cpu: done\n");
    outb((u16)sleep_control_port, (5 << 2) | (1 << 5));
    power_off_via_debug_exit(1);
}

static int has_word(const char *text, const char *word) {
    for (const char *p = text; *p; p++) {
        const char *a = p, *b = word;
        while (*a && *b && *a == *b) { a++; b++; }
        if (!*b && (p == text || p[-1] == ' ') && (*a == 0 || *a == ' ')) return 1;
    }
    return 0;
}

/* ---- a program for the debugger (tests/guest/test_gdb.py) -------------- */

/* Built with -g: gdb finds these by name, with their locals. noinline keeps
 * each a function to break on; volatile keeps values in memory. */
volatile u64 gdb_watched;   /* the watchpoint's variable */
volatile int gdb_release;   /* set from gdb to end the spin */
volatile u64 gdb_spins;     /* counts while the BSP spins */

__attribute__((noinline)) void gdb_checkpoint(void) { __asm__ volatile(""); }

__attribute__((noinline)) u64 gdb_compute(u64 seed) {
    volatile u64 local = seed * 3;
    gdb_checkpoint();       /* stopped here, `local` is 15 */
    local = local + 7;
    return local;
}

__attribute__((noinline)) void gdb_report(u64 value) { say("gdb: value %d\n", value); }

__attribute__((noinline)) void gdb_bump(void) { gdb_watched = gdb_watched + 1; }

volatile int gdb_ap_done;

/* On the AP, once the BSP spins (gdb_spins counts up while it is not stopped). */
__attribute__((noinline)) void gdb_ap_busy(void) { say("gdb: ap working\n"); }

__attribute__((noinline)) void gdb_ap_work(void) {
    while (!gdb_spins) pause();
    gdb_ap_busy();
    gdb_ap_done = 1;
}

/* testkernel=gdb: compute, report, bump a watched variable twice; with
 * gdb.spin (and --cpus 2, the AP calls gdb_ap_work) spin until gdb sets
 * gdb_release; exit with status 33 through the debug-exit port. */
static void gdb_program(u64 boot_params, const char *cmdline) {
    gdb_mode = 1;
    say("gdb: start\n");
    gdb_report(gdb_compute(5));
    gdb_bump();
    gdb_bump();
    say("gdb: watched %d\n", gdb_watched);
    if (has_word(cmdline, "gdb.spin")) {
        report_acpi(boot_params);   /* the MADT's CPUs, for start_other_cpus */
        start_other_cpus();
        /* Said once the loop has run: a test that interrupts the guest when it reads
         * this finds gdb_spins above zero, however late this vCPU got the host CPU. */
        while (!gdb_release)
            if (++gdb_spins == 1000) say("gdb: spinning\n");
        say("gdb: released\n");
        if (cpu_count > 1) while (!gdb_ap_done) pause();
    }
    say("gdb: done\n");
    power_off_via_debug_exit(33);
}

/* ---- main -------------------------------------------------------------- */

void kmain(u64 boot_params) {
    u64 cmdline = BP_U32(boot_params, 0x228) | ((u64)BP_U32(boot_params, 0x0c8) << 32);
    if (has_word((const char *)cmdline, "testkernel=gdb")) gdb_program(boot_params, (const char *)cmdline);
    if (has_word((const char *)cmdline, "testkernel=cpu")) {
        report_acpi(boot_params);   /* finds the I/O APIC and the sleep register */
        cpu_tests((const char *)cmdline);
    }
    report_boot_params(boot_params);
    report_acpi(boot_params);
    start_other_cpus();
    take_uart_interrupt();
    if (!sleep_control_port) {
        say("poweroff: no sleep control register\n");
        power_off_via_debug_exit(1);
    }
    say("poweroff: writing S5\n");
    outb((u16)sleep_control_port, (5 << 2) | (1 << 5));  /* SLP_TYP = 5 (our DSDT's _S5), SLP_EN */
    say("poweroff: still running\n");
    power_off_via_debug_exit(1);
}
