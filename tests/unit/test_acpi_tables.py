"""ACPI tables: checksums, structure, how the kernel finds them, and iasl's verdict."""

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from boot.acpi import build_acpi_tables, layout_acpi_tables
from boot.acpi.table_loader import LOADER_FILE, RSDP_FILE, build_loader_files
from boot.acpi.tables import checksum
from devices.virtio import mmio
from tests.unit.board import make_board
from vmm.builder import DEVICES
from vmm.config import MachineConfig
from vmm.errors import PyvmmError
from vmm.layout import (
    ACPI_PM_TIMER_PORT,
    ACPI_RESET_PORT,
    ACPI_RESET_VALUE,
    ACPI_RSDP_ADDRESS,
    ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT,
    ACPI_TABLES_END,
)
from vmm.memory import GuestMemory

MiB = 1 << 20
VIRTIO = [(0xC000_0000 + i * 0x1000, 0x1000, 5 + i) for i in range(3)]


def dsdt_devices(windows=VIRTIO) -> list[bytes]:
    """The DSDT entries a Linux machine's devices make (vmm/builder.py's list), then virtio windows."""
    memory = GuestMemory(16 * MiB)
    try:
        board = make_board(memory)
        linux = MachineConfig(kernel=Path("bzImage"))
        for _, plug, wanted in DEVICES:
            if wanted(linux):
                plug(board)
    finally:
        memory.close()
    return board.acpi + [mmio.acpi_description(i, mmio.Window(*w)) for i, w in enumerate(windows)]


@pytest.fixture
def memory():
    mem = GuestMemory(16 * MiB)
    yield mem
    mem.close()


def find_rsdp_like_the_kernel(memory):
    """Linux's legacy scan: 16-byte boundaries of 0xE0000-0xFFFFF, signature and checksum."""
    for address in range(0xE0000, 0x100000, 16):
        candidate = memory.read(address, 36)
        if candidate[:8] == b"RSD PTR " and sum(candidate[:20]) % 256 == 0:
            return address
    return None


def read_table(memory, address):
    length = memory.read_u32(address + 4)
    return memory.read(address, length)


def walk(memory, rsdp_address):
    """Follow RSDP -> XSDT -> tables (and FADT -> DSDT) as the kernel does: {signature: table}."""
    rsdp = memory.read(rsdp_address, 36)
    xsdt = read_table(memory, struct.unpack_from("<Q", rsdp, 24)[0])
    tables = {b"XSDT": xsdt}
    for (address,) in struct.iter_unpack("<Q", xsdt[36:]):
        table = read_table(memory, address)
        tables[table[:4]] = table
    tables[b"DSDT"] = read_table(memory, struct.unpack_from("<Q", tables[b"FACP"], 140)[0])
    return tables


def test_rsdp_is_found_by_address_and_by_the_legacy_scan(memory):
    address = build_acpi_tables(memory, cpus=2, devices=dsdt_devices())
    assert address == ACPI_RSDP_ADDRESS == 0xE0000
    assert find_rsdp_like_the_kernel(memory) == address
    rsdp = memory.read(address, 36)
    assert rsdp[15] == 2  # revision: ACPI 2.0+, has an XSDT
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0  # both checksums


def test_every_table_checksums_and_fits_below_1_mib(memory):
    tables = walk(memory, build_acpi_tables(memory, cpus=4, devices=dsdt_devices()))
    assert set(tables) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    for table in tables.values():
        assert sum(table) % 256 == 0
        assert struct.unpack_from("<I", table, 4)[0] == len(table)
    for address, table in layout_acpi_tables(4, dsdt_devices()).items():
        assert ACPI_RSDP_ADDRESS <= address and address + len(table) <= ACPI_TABLES_END


def test_checksum_helper():
    assert checksum(b"\x01\x02") == 0xFD
    assert (sum(b"\x01\x02") + checksum(b"\x01\x02")) % 256 == 0


def test_fadt_is_hardware_reduced_with_sleep_reset_and_pm_timer_registers(memory):
    fadt = walk(memory, build_acpi_tables(memory, cpus=1))[b"FACP"]
    assert len(fadt) == 276 and fadt[8] == 6  # ACPI 6.0 FADT
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20)  # HW_REDUCED_ACPI
    assert flags & (1 << 10)  # RESET_REG_SUP
    # The DSDT in both fields (SeaBIOS reads the 32-bit one, Linux X_DSDT).
    assert struct.unpack_from("<I", fadt, 40)[0] == struct.unpack_from("<Q", fadt, 140)[0] != 0
    assert struct.unpack_from("<H", fadt, 46)[0] == 0  # no SCI in hardware-reduced mode

    def gas(offset):
        return struct.unpack_from("<BBBBQ", fadt, offset)

    assert gas(116) == (1, 8, 0, 1, ACPI_RESET_PORT)  # SystemIO, 8 bits, byte access
    assert fadt[128] == ACPI_RESET_VALUE
    assert gas(244) == (1, 8, 0, 1, ACPI_SLEEP_CONTROL_PORT)
    assert gas(256) == (1, 8, 0, 1, ACPI_SLEEP_STATUS_PORT)
    # The PM timer: a 4-byte register (PM_TMR_LEN), read as a dword, for Linux only (X_PM_TMR_BLK;
    # SeaBIOS reads PM_TMR_BLK and keeps timing with the TSC).
    assert struct.unpack_from("<I", fadt, 76)[0] == 0 and fadt[91] == 4
    assert gas(208) == (1, 32, 0, 3, ACPI_PM_TIMER_PORT)
    assert not flags & (1 << 8)  # TMR_VAL_EXT clear: the timer counts in 24 bits
    assert struct.unpack_from("<H", fadt, 109)[0] & 0b10  # i8042 present


def madt_entries(madt):
    entries, offset = [], 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        entries.append((kind, madt[offset : offset + length]))
        offset += length
    assert offset == len(madt)
    return entries


@pytest.mark.parametrize("cpus", [1, 2, 32, 255])
def test_madt_has_one_local_apic_per_cpu(memory, cpus):
    madt = walk(memory, build_acpi_tables(memory, cpus=cpus))[b"APIC"]
    assert struct.unpack_from("<II", madt, 36) == (0xFEE0_0000, 1)
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", body) for kind, body in entries if kind == 0]
    assert [(uid, apic_id, flags) for _, _, uid, apic_id, flags in lapics] == [
        (i, i, 1) for i in range(cpus)]
    (ioapic,) = [struct.unpack("<BBBBII", body) for kind, body in entries if kind == 1]
    assert ioapic[4:] == (0xFEC0_0000, 0)
    (override,) = [struct.unpack("<BBBBIH", body) for kind, body in entries if kind == 2]
    assert override[2:] == (0, 0, 2, 0)  # ISA IRQ 0 -> GSI 2
    (nmi,) = [struct.unpack("<BBBHB", body) for kind, body in entries if kind == 4]
    assert (nmi[2], nmi[4]) == (0xFF, 1)  # all processors, LINT1


@pytest.mark.parametrize("cpus", [0, 256])
def test_madt_cpu_count_limits(memory, cpus):
    with pytest.raises(PyvmmError):
        build_acpi_tables(memory, cpus=cpus)


def test_dsdt_describes_devices_and_s5(memory):
    dsdt = walk(memory, build_acpi_tables(memory, cpus=1, devices=dsdt_devices()))[b"DSDT"]
    assert dsdt.count(b"\x0dLNRO0005\x00") == 3
    assert b"\x0dQEMU0001\x00" in dsdt  # pvpanic
    assert b"\x08\\_S5_\x12\x07\x04\x0a\x05\x00\x00\x00" in dsdt  # Package {5, 0, 0, 0}
    for base, size, irq in VIRTIO:
        memory32 = b"\x86\x09\x00\x01" + struct.pack("<II", base, size)
        interrupt = b"\x89\x06\x00\x03\x01" + struct.pack("<I", irq)  # consumer, edge, active high
        assert memory32 + interrupt in dsdt


def test_too_many_tables_for_the_reserved_area(memory):
    with pytest.raises(PyvmmError, match="ACPI tables need"):
        build_acpi_tables(memory, cpus=1, devices=dsdt_devices([(0xC000_0000, 0x1000, 5)] * 4000))


# -- the table loader: what firmware (SeaBIOS) does with etc/table-loader ----------------


def run_table_loader(memory, files, places):
    """Execute the loader's commands like SeaBIOS's romfile_loader: `places` says where each
    zone's allocation goes (the firmware's choice). Returns {file name: address}."""
    addresses = {}
    loader = files[LOADER_FILE]
    for offset in range(0, len(loader), 128):
        command = loader[offset : offset + 128]
        kind = struct.unpack_from("<I", command)[0]
        name = command[4:60].rstrip(b"\0").decode()
        if kind == 1:  # ALLOCATE file, align, zone
            align, zone = struct.unpack_from("<IB", command, 60)
            address = places[zone]
            assert address % align == 0
            addresses[name] = address
            memory.write(address, files[name])
        elif kind == 2:  # ADD_POINTER dest, src, offset, size
            source = command[60:116].rstrip(b"\0").decode()
            where, size = struct.unpack_from("<IB", command, 116)
            assert where + size <= len(files[name])
            target = addresses[name] + where
            value = int.from_bytes(memory.read(target, size), "little") + addresses[source]
            memory.write(target, value.to_bytes(size, "little"))
        elif kind == 3:  # ADD_CHECKSUM file, offset, start, length
            where, start, length = struct.unpack_from("<III", command, 60)
            base = addresses[name]
            data = memory.read(base + start, length)
            memory.write(base + where, bytes([(memory.read_u8(base + where) - sum(data)) & 0xFF]))
        else:
            raise AssertionError(f"unknown loader command {kind}")
    return addresses


def test_table_loader_gives_firmware_the_same_tables_wherever_it_puts_them(memory):
    files = dict(build_loader_files(cpus=2, devices=dsdt_devices()).items())
    addresses = run_table_loader(memory, files, {1: 0x80_0000, 2: 0xF_5A50})
    assert find_rsdp_like_the_kernel(memory) == addresses[RSDP_FILE] == 0xF_5A50
    rsdp = memory.read(addresses[RSDP_FILE], 36)
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    loaded = walk(memory, addresses[RSDP_FILE])
    assert set(loaded) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    for table in loaded.values():
        assert sum(table) % 256 == 0
    # SeaBIOS follows the FADT's 32-bit DSDT field; it leads to the same DSDT as X_DSDT.
    fadt = loaded[b"FACP"]
    assert struct.unpack_from("<I", fadt, 40)[0] == struct.unpack_from("<Q", fadt, 140)[0]
    # The same tables a direct kernel boot gets, apart from where they sit.
    direct = walk(memory, build_acpi_tables(memory, cpus=2, devices=dsdt_devices()))
    for signature in (b"DSDT", b"APIC"):
        assert loaded[signature] == direct[signature]


# -- iasl: the reference disassembler/compiler must accept every table -------------------

iasl = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(iasl is None, reason="needs iasl (Debian package acpica-tools)")


def run_iasl(*args, cwd):
    result = subprocess.run([iasl, *args], cwd=cwd, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not re.search(r"\b(error|warning)\b", output, re.IGNORECASE) or re.search(
        r"\b0 Errors, 0 Warnings\b", output), output
    return output


def dsl_text(dsl: str) -> str:
    """iasl's disassembly as one line: no comments, no [offset] columns, whitespace collapsed."""
    text = re.sub(r"/\*.*?\*/", "", dsl, flags=re.DOTALL)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"\[[0-9A-F]{3}h \d{4} +\d+\]", "", text)
    return re.sub(r" \)", ")", " ".join(text.split()))


def what_iasl_must_read(cpus: int, addresses: dict[str, int]) -> dict[str, list[str]]:
    """Per table, what the disassembly must say, in iasl's words (after dsl_text)."""
    def io(port: str, alignment: str, length: str) -> str:
        return f"IO (Decode16, {port}, {port}, {alignment}, {length},)"

    def crs(*resources: str) -> str:
        return "Name (_CRS, ResourceTemplate () { " + " ".join(resources) + " })"

    def gas(port: int) -> str:
        return ("[Generic Address Structure] Space ID : 01 [SystemIO] Bit Width : 08 Bit Offset : 00 "
                f"Encoded Access Width : 01 [Byte Access:8] Address : {port:016X}")

    uid = {0: "Zero", 1: "One"}
    return {
        "DSDT": [
            "Scope (\\_SB)",
            'Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_UID, One) '
            + crs(io("0x03F8", "0x08", "0x08"), "IRQNoFlags () {4}") + " }",
            'Device (RTC) { Name (_HID, EisaId ("PNP0B00")) ' + crs(io("0x0070", "0x01", "0x02"), "IRQNoFlags () {8}") + " }",
            'Device (PS2K) { Name (_HID, EisaId ("PNP0303")) '
            + crs(io("0x0060", "0x01", "0x01"), io("0x0064", "0x01", "0x01"), "IRQNoFlags () {1}") + " }",
            'Device (PEVT) { Name (_HID, "QEMU0001") ' + crs(io("0x0505", "0x01", "0x01")) + " }",
            *[f'Device (V{i:03X}) {{ Name (_HID, "LNRO0005") Name (_UID, {uid.get(i, f"0x{i:02X}")}) '
              "Name (_CCA, One) " + crs(f"Memory32Fixed (ReadWrite, 0x{base:08X}, 0x{size:08X},)",
                                        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,,) "
                                        f"{{ 0x{irq:08X}, }}") + " }"
              for i, (base, size, irq) in enumerate(VIRTIO)],
            "Name (\\_S5, Package (0x04) { 0x05, Zero, Zero, Zero })",
        ],
        "FACP": ["Hardware Reduced (V5) : 1", "Reset Register Supported (V2) : 1",
                 f"Reset Register : {gas(ACPI_RESET_PORT)} Value to cause reset : {ACPI_RESET_VALUE:02X}",
                 f"Sleep Control Register : {gas(ACPI_SLEEP_CONTROL_PORT)}",
                 f"Sleep Status Register : {gas(ACPI_SLEEP_STATUS_PORT)}",
                 f"DSDT Address : {addresses['DSDT']:016X}"],
        "APIC": ["Local Apic Address : FEE00000",
                 *[f"Subtable Type : 00 [Processor Local APIC] Length : 08 Processor ID : {i:02X} "
                   f"Local Apic ID : {i:02X} Flags (decoded below) : 00000001 Processor Enabled : 1"
                   for i in range(cpus)],
                 "Subtable Type : 01 [I/O APIC] Length : 0C I/O Apic ID : 00 Reserved : 00 "
                 "Address : FEC00000 Interrupt : 00000000",
                 "Subtable Type : 02 [Interrupt Source Override] Length : 0A Bus : 00 Source : 00 "
                 "Interrupt : 00000002",
                 "Subtable Type : 04 [Local APIC NMI] Length : 06 Processor ID : FF",
                 "Interrupt Input LINT : 01"],
        "XSDT": [f"ACPI Table Address 0 : {addresses['FACP']:016X} "
                 f"ACPI Table Address 1 : {addresses['APIC']:016X}"],
    }


@needs_iasl
@pytest.mark.parametrize("cpus", [1, 8])
def test_iasl_disassembles_every_table_and_recompiles_it_identically(tmp_path, cpus):
    tables = layout_acpi_tables(cpus, dsdt_devices())
    addresses = {table[:4].decode(): address for address, table in tables.items()}
    expected = what_iasl_must_read(cpus, addresses)
    assert sorted(addresses) == sorted(["RSD ", *expected])
    for table in tables.values():
        signature = table[:4].decode()
        if signature == "RSD ":
            continue  # iasl 2020's -d rejects a bare RSDP file; its checksums are tested above
        (tmp_path / f"{signature}.dat").write_bytes(table)
        run_iasl("-d", f"{signature}.dat", cwd=tmp_path)
        dsl = (tmp_path / f"{signature}.dsl").read_text()
        assert "****" not in dsl.replace("/****", "").replace("****/", ""), dsl  # iasl's complaints
        text = dsl_text(dsl)
        missing = [fact for fact in expected[signature] if fact not in text]
        assert missing == [], f"{signature}: iasl reads\n{text}"
        # Compiling the disassembly back (-oa: no optimisations) gives our bytes again.
        output = run_iasl("-oa", "-p", f"again_{signature}", f"{signature}.dsl", cwd=tmp_path)
        assert re.search(r"\b0 Errors\b", output) or "Compilation successful" in output, output
        again = (tmp_path / f"again_{signature}.aml").read_bytes()
        assert again[36:] == table[36:], signature  # the header's compiler id may differ
