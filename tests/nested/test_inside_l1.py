"""About the nested tier's L1 itself: collected only inside it (tests/nested/conftest.py).

The tier runs these in L1 beside the KVM tests (tests/nested/test_kvm_tier.py).
"""

import pytest

from tests.nested import kvm_static_keys


@pytest.mark.kvm
def test_vms_and_vcpus_coming_and_going_leave_the_kernel_text_alone():
    # Each VM and vCPU a test makes could flip a KVM static key, and with it
    # rewrite L1's kernel text while the other L1 vCPU runs it, which QEMU 7.2's
    # software CPU can get wrong for good (kvm_static_keys.py). L1's /init holds
    # the keys on: nothing below may change a byte of the kernel's or KVM's text.
    assert kvm_static_keys.HELD.exists(), "L1's /init did not hold KVM's static keys"
    assert kvm_static_keys.text_rewritten_by_new_vms() == []
