"""The nested real-KVM tier: the project's KVM tests run inside an L1 Linux under QEMU's software CPU.

QEMU's TCG with `-cpu max` emulates AMD SVM with nested paging, so an L1
Linux booted under it has a real `/dev/kvm` (kvm-amd) even on hosts whose own
KVM cannot run Linux (PLATFORM.md, "A real KVM, nested"). `l1_image` packs
this machine's Python, the project's venv and checkout, the kvm modules and
the Linux test assets into the L1 initramfs; `l1_run` boots it and runs
pytest inside; `test_kvm_tier` turns the results into one host test per
inner test. `make test-kvm` runs the full tier, `.ci/run` a subset.
"""
