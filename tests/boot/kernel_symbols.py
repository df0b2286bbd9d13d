"""Addresses of the Debian kernel's symbols, for debugging it without its debug package.

Debian's image package ships System.map only as a stub (the real one is in
the 280 MB -dbg package), so the addresses come from the same kernel's
/proc/kallsyms, read in a boot with `nokaslr` on the software CPU: with KASLR
off the kernel runs at its link addresses, the ones System.map lists, on
either accelerator.
"""

from __future__ import annotations

import re

from tests.boot.session import PROMPT, GuestSession

NOKASLR_CMDLINE = "console=ttyS0 reboot=acpi panic=-1 nokaslr quiet"


def kernel_symbols(linux_assets, names: list[str]) -> dict[str, int]:
    """Each named code or data symbol's address with KASLR off."""
    session = GuestSession("--kernel", str(linux_assets.kernel), "--initrd", str(linux_assets.initrd),
                           "--accel", "tcg", "--cmdline", NOKASLR_CMDLINE)
    found = {}
    try:
        session.expect(PROMPT)
        for name in names:  # one short command each: the terminal wraps a long one's echo
            listing = session.run(f"grep -w {name} /proc/kallsyms")
            match = re.search(rf"^([0-9a-f]{{16}}) [TtDdBb] {re.escape(name)}$", listing, re.M)
            assert match, listing
            found[name] = int(match.group(1), 16)
        session.send("poweroff")
        assert session.wait()[0] == 0
    finally:
        session.close()
    return found
