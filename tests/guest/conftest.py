"""Fixtures for the guest tests: assembled images and the accelerator parameter.

Every guest test runs once per accelerator. One whose accelerator is not
available on this host is skipped with the reason (and fails in CI, where
nothing may be skipped).
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.guest.kernel.build import build_test_kernel
from tests.helpers import GUEST_ASM, assemble, kvm_usable
from tests.unprivileged import unprivileged  # noqa: F401 - pyvmm as `nobody`
from vmm.kvm.exit_loop import LOOP_ENV, compiled_loop_built

# The `kvm` mark lets tests/nested select the KVM variants to run on a real KVM.
ACCELERATORS = [pytest.param("kvm", marks=pytest.mark.kvm)] + (["tcg"] if importlib.util.find_spec("vmm.tcg") else [])


@pytest.fixture(scope="session")
def guest_build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("guests")


@pytest.fixture
def guest(guest_build_dir):
    """guest("name") -> path of tests/guest/asm/name.S assembled to a flat binary."""

    def build(name: str):
        image = guest_build_dir / f"{name}.bin"
        if not image.exists():
            assemble(GUEST_ASM / f"{name}.S", guest_build_dir)
        return image

    return build


def use_kvm_exit_loop(loop: str, monkeypatch) -> None:
    """Run this test's KVM guests through `loop`, "compiled" or "python" (vmm/kvm/exit_loop.py);
    skipped where KVM is unusable or the compiled loop was not built."""
    if reason := kvm_usable():
        pytest.skip(reason)
    if loop == "python":
        monkeypatch.setenv(LOOP_ENV, "python")
    elif compiled_loop_built():
        monkeypatch.delenv(LOOP_ENV, raising=False)
    else:
        pytest.skip("the compiled KVM exit loop is not built (make install, with gcc and python3-dev)")


@pytest.fixture(params=ACCELERATORS)
def accel(request) -> str:
    if request.param == "kvm" and (reason := kvm_usable()):
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="session")
def test_kernel(tmp_path_factory):
    """The test kernel (tests/guest/kernel/), built into a bzImage."""
    return build_test_kernel(tmp_path_factory.mktemp("testkernel"))
