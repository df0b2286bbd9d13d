"""Boot tests: the real Debian kernel and busybox initramfs (tests/assets.py, `make test-assets`).

Each test that boots Linux runs once per accelerator (`linux_accel`): on the
software CPU everywhere, and on KVM where this host's KVM can run Linux
(`pyvmm check` says so). Where it cannot (kvm_pvm, PLATFORM.md), the KVM
variant is skipped as a host limitation, and `make test-kvm` runs the same
test inside an L1 Linux whose KVM is real (tests/nested/).
"""

import pytest

from tests.assets import linux_assets, linux_module_tree  # noqa: F401 - fixtures for every boot test
from tests.conftest import HOST_LIMITATION
from tests.helpers import kvm_usable
from tests.unprivileged import unprivileged  # noqa: F401 - pyvmm as `nobody`

# The `kvm` mark lets tests/nested select exactly the KVM variants.
LINUX_ACCELERATORS = ["tcg", pytest.param("kvm", marks=pytest.mark.kvm)]


@pytest.fixture(params=LINUX_ACCELERATORS)
def linux_accel(request) -> str:
    """The --accel value of this run of the test."""
    if request.param == "kvm":
        if reason := kvm_usable():
            pytest.skip(reason)
        from vmm.kvm import quirks

        able, why = quirks.can_run_linux()
        if not able:
            pytest.skip(f"{HOST_LIMITATION} {why}; `make test-kvm` runs this test on a real KVM nested "
                        "under QEMU")
    return request.param
