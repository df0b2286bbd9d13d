"""Offsets and flags of `struct boot_params` and `struct setup_header`.

Facts from the kernel's arch/x86/include/uapi/asm/bootparam.h and
Documentation/arch/x86/boot.rst (the x86 boot protocol). The setup header
lives at 0x1f1 both in a bzImage file and in boot_params (the "zero page"),
so every header offset below is valid in both; tests pin them.
"""

BOOT_PARAMS_SIZE = 4096

# -- struct boot_params, outside the setup header ---------------------------------
ACPI_RSDP_ADDR = 0x070  # u64
EXT_RAMDISK_IMAGE = 0x0C0  # u32: bits 32-63 of ramdisk_image
EXT_RAMDISK_SIZE = 0x0C4  # u32: bits 32-63 of ramdisk_size
EXT_CMD_LINE_PTR = 0x0C8  # u32: bits 32-63 of cmd_line_ptr
E820_ENTRIES = 0x1E8  # u8
SENTINEL = 0x1EF  # u8: non-zero tells the kernel the loader copied garbage
E820_TABLE = 0x2D0  # struct boot_e820_entry[E820_MAX_ENTRIES]
E820_MAX_ENTRIES = 128
E820_ENTRY_SIZE = 20  # u64 addr, u64 size, u32 type (packed)

# -- struct setup_header (offsets from the start of the file / boot_params) -------
SETUP_HEADER = 0x1F1
SETUP_SECTS = 0x1F1  # u8: size of the real-mode setup code in 512-byte sectors
SYSSIZE = 0x1F4  # u32: size of the protected-mode code in 16-byte paragraphs
VID_MODE = 0x1FA  # u16
BOOT_FLAG = 0x1FE  # u16: 0xAA55
JUMP = 0x200  # u16: a short jump (0xEB, offset); its offset byte gives the header length
HEADER = 0x202  # u32: "HdrS"
VERSION = 0x206  # u16: boot protocol version, e.g. 0x020F for 2.15
CODE32_START = 0x214  # u32
TYPE_OF_LOADER = 0x210  # u8
LOADFLAGS = 0x211  # u8
RAMDISK_IMAGE = 0x218  # u32
RAMDISK_SIZE = 0x21C  # u32
HEAP_END_PTR = 0x224  # u16
CMD_LINE_PTR = 0x228  # u32
INITRD_ADDR_MAX = 0x22C  # u32 (protocol 2.03+)
KERNEL_ALIGNMENT = 0x230  # u32 (2.05+)
RELOCATABLE_KERNEL = 0x234  # u8 (2.05+)
MIN_ALIGNMENT = 0x235  # u8 (2.10+), log2
XLOADFLAGS = 0x236  # u16 (2.12+)
CMDLINE_SIZE = 0x238  # u32 (2.06+): longest command line, without the NUL
PAYLOAD_OFFSET = 0x248  # u32 (2.08+), from the start of the protected-mode code
PAYLOAD_LENGTH = 0x24C  # u32 (2.08+)
PREF_ADDRESS = 0x258  # u64 (2.10+)
INIT_SIZE = 0x260  # u32 (2.10+)
SETUP_HEADER_END_2_10 = 0x264  # the header reaches at least here from protocol 2.10

HEADER_MAGIC = b"HdrS"
BOOT_FLAG_MAGIC = 0xAA55
SHORT_JUMP_OPCODE = 0xEB

# loadflags
LOADED_HIGH = 1 << 0  # protected-mode code is loaded at 0x100000 (a bzImage)
CAN_USE_HEAP = 1 << 7  # heap_end_ptr is valid

# xloadflags
XLF_KERNEL_64 = 1 << 0  # has the 64-bit entry point at load address + 0x200

TYPE_OF_LOADER_UNDEFINED = 0xFF  # "a boot loader without an assigned id"
VID_MODE_NORMAL = 0xFFFF
# heap_end_ptr: end of the setup heap as an offset from the real-mode code,
# minus 0x200; 0xFE00 is the whole 64 KiB real-mode segment, as other loaders give.
HEAP_END_PTR_VALUE = 0xFE00

# The 64-bit entry point is this far into the protected-mode code.
STARTUP_64_OFFSET = 0x200

# Defaults the boot protocol gives for fields a kernel (or an ELF vmlinux) lacks.
DEFAULT_INITRD_ADDR_MAX = 0x37FF_FFFF
X86_COMMAND_LINE_SIZE = 2048  # the kernel's COMMAND_LINE_SIZE on x86, NUL included
