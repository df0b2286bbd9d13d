"""The AML encoder, byte for byte (expected bytes as iasl emits them)."""

import pytest

from boot.acpi import aml


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"), (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xC000_0000, b"\x0c\x00\x00\x00\xc0"), (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
        ((1 << 64) - 1, b"\xff"),
    ],
)
def test_integers_use_the_shortest_encoding(value, encoded):
    assert aml.integer(value) == encoded


def test_integer_range():
    for bad in (-1, 1 << 64):
        with pytest.raises(aml.AmlError):
            aml.integer(bad)


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"),  # 63 + 2 = 65 = 0x41
        (4093, b"\x4f\xff"), (4094, b"\x81\x00\x01"), ((1 << 20) - 4, b"\x8f\xff\xff"),
        (1 << 20, b"\xc4\x00\x00\x01"),
    ],
)
def test_pkg_length(length, encoded):
    assert aml.pkg_length(length) == encoded


def test_pkg_length_counts_itself():
    for length in (0, 61, 62, 63, 64, 4092, 4093, 4094, 100_000):
        encoded = aml.pkg_length(length)
        lead = encoded[0]
        if len(encoded) == 1:
            total = lead & 0x3F
        else:
            assert lead >> 6 == len(encoded) - 1
            total = (lead & 0xF) | int.from_bytes(encoded[1:], "little") << 4
        assert total == length + len(encoded)


def test_names():
    assert aml.name_string("_HID") == b"_HID"
    assert aml.name_string("RTC") == b"RTC_"
    assert aml.name_string("\\_SB") == b"\\_SB_"
    assert aml.name_string("\\_SB.COM1") == b"\\\x2e_SB_COM1"
    assert aml.name_string("\\_SB.PCI0.ISA") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert aml.name_string("^FOO") == b"^FOO_"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("", "toolong", "1ABC", "a", "AB-C", "A..B"):
        with pytest.raises(aml.AmlError):
            aml.name_string(bad)


def test_strings_buffers_packages():
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml.buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    assert aml.package(aml.integer(5), aml.integer(0)) == b"\x12\x05\x02\x0a\x05\x00"
    with pytest.raises(aml.AmlError):
        aml.string("a\0b")


def test_name_scope_device_method():
    assert aml.name("_UID", aml.integer(1)) == b"\x08_UID\x01"
    assert aml.scope("\\_SB") == b"\x10\x06\\_SB_"
    assert aml.device("COM1", aml.name("_UID", aml.integer(1))) == b"\x5b\x82\x0bCOM1\x08_UID\x01"
    # Method(_STA, 0, NotSerialized) { Return (0x0F) }
    assert aml.method("_STA", 0, aml.return_(aml.integer(0x0F))) == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    assert aml.method("FOO", 2, serialized=True)[-1] == 0x0A
    with pytest.raises(aml.AmlError):
        aml.method("FOO", 8)


def test_eisa_id():
    assert aml.eisa_id("PNP0501") == aml.integer(0x0105D041)
    assert aml.eisa_id("PNP0B00") == aml.integer(0x000BD041)
    assert aml.eisa_id("PNP0303") == aml.integer(0x0303D041)
    with pytest.raises(aml.AmlError):
        aml.eisa_id("pnp0501")


def test_resource_descriptors():
    assert aml.io(0x3F8, 0x3F8, 8, 8) == b"\x47\x01\xf8\x03\xf8\x03\x08\x08"
    assert aml.irq_no_flags(4) == b"\x22\x10\x00"
    assert aml.irq_no_flags(1, 12) == b"\x22\x02\x10"
    assert aml.irq(5, edge=False, active_low=True, shared=True) == b"\x23\x20\x00\x18"
    assert aml.memory32_fixed(0xC000_0000, 0x1000) == (
        b"\x86\x09\x00\x01" + b"\x00\x00\x00\xc0" + b"\x00\x10\x00\x00")
    assert aml.interrupt(5) == b"\x89\x06\x00\x01\x01\x05\x00\x00\x00"
    assert aml.interrupt(33, edge=True, active_low=True, shared=True)[3] == 0x0F
    assert aml.resource_template(aml.irq_no_flags(4)) == b"\x11\x08\x0a\x05\x22\x10\x00\x79\x00"
    for bad in (lambda: aml.irq_no_flags(16), lambda: aml.io(0x10000, 0, 0, 0),
                lambda: aml.memory32_fixed(1 << 32, 0), lambda: aml.interrupt()):
        with pytest.raises(aml.AmlError):
            bad()
