"""Bootable images built from Debian packages, without root and without mounting anything.

`syslinux_disk()`: a disk with an MBR partition table (written here), syslinux's
MBR code (`syslinux-common`'s mbr.bin), one FAT16 partition (and 1 MiB unpartitioned after it) made with
`mkfs.fat` and filled with `mcopy` (mtools), and syslinux installed into it by
the mtools-based `syslinux --install`; the partition holds the kernel, the
initramfs and a syslinux.cfg that boots them with a serial console.

`isohybrid_iso()`: an ISO 9660 image made by `xorriso` with isolinux as its
El Torito boot loader and isolinux's isohybrid MBR, so firmware boots it as a
disk, as Debian's installer ISOs boot from a USB stick.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.boot.virtio_guest import need_tool

SECTOR = 512
MiB = 1 << 20
PARTITION_START = 2048  # sectors: the first partition at 1 MiB, as fdisk places it
MBR_CODE_SIZE = 440  # the boot code before the disk signature and the partition table
PARTITION_TYPE_FAT16_LBA = 0x0E
ACTIVE = 0x80
LBA_ONLY_CHS = b"\xfe\xff\xff"  # "use the LBA fields", as partitioners write past 8 GiB
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
ISOHYBRID_MBR = Path("/usr/lib/ISOLINUX/isohdpfx.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
TOOL_TIMEOUT = 60
SPARE_AT_END = MiB  # unpartitioned space after the partition, for tests to write into


def need_file(path: Path, package: str) -> None:
    if not path.is_file():
        pytest.skip(f"{path} is missing: apt-get install {package}")


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=TOOL_TIMEOUT)


def syslinux_config(append: str) -> bytes:
    # Serial console for syslinux itself too; no prompt, no wait.
    return (f"SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\n"
            f"LABEL linux\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND {append}\n").encode()


def mbr(partition_start: int, partition_sectors: int) -> bytes:
    """syslinux's MBR code, a disk signature, one active FAT16 partition and the boot signature."""
    code = SYSLINUX_MBR.read_bytes()[:MBR_CODE_SIZE].ljust(MBR_CODE_SIZE, b"\0")
    entry = struct.pack("<B3sB3sII", ACTIVE, LBA_ONLY_CHS, PARTITION_TYPE_FAT16_LBA, LBA_ONLY_CHS,
                        partition_start, partition_sectors)
    sector = code + struct.pack("<I", 0x50594D4D) + b"\0\0" + entry + bytes(48) + b"\x55\xaa"
    assert len(sector) == SECTOR
    return sector


def syslinux_disk(path: Path, kernel: Path, initrd: Path, append: str) -> Path:
    """Write a bootable raw disk image to `path` (see the module docstring)."""
    mkfs_fat = need_tool("mkfs.fat", "dosfstools")
    mcopy = need_tool("mcopy", "mtools")
    syslinux = need_tool("syslinux", "syslinux")
    need_file(SYSLINUX_MBR, "syslinux-common")
    payload = kernel.stat().st_size + initrd.stat().st_size
    partition_bytes = (payload + 16 * MiB + MiB - 1) // MiB * MiB
    fat = path.with_name(path.name + ".fat")
    with open(fat, "wb") as f:
        f.truncate(partition_bytes)
    # -h: the sectors before the partition, which syslinux's boot sector adds to its reads.
    _run(mkfs_fat, "-F", "16", "-h", str(PARTITION_START), "-n", "PYVMMBOOT", str(fat))
    config = path.with_name("syslinux.cfg")
    config.write_bytes(syslinux_config(append))
    for source, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (config, "syslinux.cfg")):
        _run(mcopy, "-i", str(fat), str(source), f"::{name}")
    _run(syslinux, "--install", str(fat))
    with open(path, "wb") as disk:
        disk.write(mbr(PARTITION_START, partition_bytes // SECTOR))
        disk.seek(PARTITION_START * SECTOR)
        with open(fat, "rb") as source:
            shutil.copyfileobj(source, disk, MiB)
        disk.truncate(PARTITION_START * SECTOR + partition_bytes + SPARE_AT_END)
    fat.unlink()
    return path


def isohybrid_iso(path: Path, kernel: Path, initrd: Path, append: str, extra: dict[str, bytes]) -> Path:
    """An isohybrid ISO at `path` booting `kernel` with `initrd`; `extra` files go in its root."""
    xorriso = need_tool("xorriso", "xorriso")
    need_file(ISOLINUX_BIN, "isolinux")
    need_file(LDLINUX_C32, "syslinux-common")
    tree = path.with_name(path.name + ".tree")
    (tree / "isolinux").mkdir(parents=True)
    shutil.copy(ISOLINUX_BIN, tree / "isolinux" / "isolinux.bin")
    shutil.copy(LDLINUX_C32, tree / "isolinux" / "ldlinux.c32")
    (tree / "isolinux" / "isolinux.cfg").write_bytes(syslinux_config(append))
    shutil.copy(kernel, tree / "vmlinuz")
    shutil.copy(initrd, tree / "initrd.img")
    for name, data in extra.items():
        (tree / name).write_bytes(data)
    _run(xorriso, "-as", "mkisofs", "-o", str(path), "-isohybrid-mbr", str(ISOHYBRID_MBR),
         "-c", "isolinux/boot.cat", "-b", "isolinux/isolinux.bin", "-no-emul-boot", "-boot-load-size", "4",
         "-boot-info-table", "-V", "PYVMMISO", str(tree))
    shutil.rmtree(tree)
    return path
