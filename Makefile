# pyvmm developer entry points. Everything runs from a project-local .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYVMM  := $(VENV)/bin/pyvmm

# Debian packages pyvmm needs at run time: a Python that can make the venv
# (pip brings the rest). make install and make demo need nothing more
# (with gcc and python3-dev there, make install also builds the compiled KVM exit loop
# and virtio-blk's compiled request path).
RUNTIME_PACKAGES := python3-venv
# What the tests and benchmarks use as well: binutils assembles the test
# guests; qemu-utils is the disk-image reference; acpica-tools disassembles
# our ACPI tables; gdb drives the gdb stub's tests; seabios is the firmware the
# disk-boot tests run (pyvmm finds it at run time, or is given --bios); syslinux,
# syslinux-common, isolinux, mtools, dosfstools and xorriso build the bootable
# test disks and ISOs; the rest build and inspect the Linux test guests, and
# QEMU is the peer the benchmarks measure against; gcc and python3-dev build the
# compiled KVM exit loop, whose tests run in CI beside the Python loop's.
TEST_PACKAGES := binutils gcc python3-dev make qemu-utils qemu-system-x86 acpica-tools e2fsprogs \
                 busybox-static cpio iproute2 gdb seabios \
                 syslinux syslinux-common isolinux mtools dosfstools xorriso

# Cases per fuzz test for make fuzz (the suite runs a few from a fixed seed).
FUZZ_EXAMPLES ?= 5000

.PHONY: install exit-loop blk-requests uart-ports deps deps-runtime demo demo-linux test test-fast test-kvm test-kvm-ci lint bench bench-kvm \
        fuzz test-assets kvm-unit-tests kvm-unit-tests-nested clean

# The C declarations pyvmm hands cffi (the KVM structures, liblz4's decoder) are parsed
# once here, not at every start (vmm/cffi_prebuilt.py); without this step pyvmm parses
# them when it first needs them.
CFFI_PREBUILT := vmm/kvm/_uapi_prebuilt.py boot/_lz4_prebuilt.py

install: deps-runtime $(VENV)/.installed $(CFFI_PREBUILT) exit-loop blk-requests uart-ports

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(CFFI_PREBUILT): vmm/kvm/uapi.py boot/lz4_legacy.py vmm/cffi_prebuilt.py $(VENV)/.installed
	$(PY) -m vmm.cffi_prebuilt

# The compiled KVM exit loop (vmm/kvm/exit_loop.py): pip builds it, this builds it
# again (under a second), so a changed exit_loop.c is never left unbuilt. Without a
# C compiler and Python's headers it says so and pyvmm uses the Python exit loop.
exit-loop: $(VENV)/.installed
	$(PY) -m vmm.kvm.exit_loop_build

# virtio-blk's compiled request path (devices/virtio/blk_requests.py), the same way.
blk-requests: $(VENV)/.installed
	$(PY) -m devices.virtio.blk_requests_build

# The serial port's compiled port path on the software CPU (devices/uart_ports.py), the same way.
uart-ports: $(VENV)/.installed
	$(PY) -m devices.uart_ports_build

# System packages, installed only when missing (needs root, as apt-get does);
# on a system without dpkg, installing them is left to the user.
define install_missing
	@command -v dpkg >/dev/null || exit 0; \
	missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
endef

deps-runtime:
	$(call install_missing,$(RUNTIME_PACKAGES))

deps: deps-runtime
	$(call install_missing,$(TEST_PACKAGES))

# Set up pyvmm and boot a tiny guest that prints on the serial console. The
# guest's bytes come from Python (no assembler needed, tests/guest/hello_image.py).
demo: install
	$(PY) -m tests.guest.hello_image build/hello.bin
	$(PYVMM) boot --flat build/hello.bin; status=$$?; echo "guest exited with status $$status"; [ $$status -eq 42 ]

# Boot Debian's cloud kernel with the test initramfs to a shell on this terminal
# (Ctrl-A x or `poweroff` to leave). Building the test initramfs takes the test
# packages (deps).
demo-linux: deps install test-assets
	$(PYVMM) boot --kernel $$($(PY) -c 'from tests.assets import find_linux_assets as f; print(f().kernel)') \
		--initrd $$($(PY) -c 'from tests.assets import find_linux_assets as f; print(f().initrd)') \
		--cpus 2 --stats

test: deps install test-assets
	$(PY) -m pytest -q

# The KVM tests on a real KVM: inside an L1 Linux on QEMU's software CPU, whose
# kvm-amd is real (tests/nested/). Uses both cores for a while; -s shows L1's
# console as it runs. test-kvm-ci is the subset CI runs.
test-kvm: deps install test-assets
	PYVMM_KVM_TIER=full $(PY) -m pytest -q -s tests/nested

test-kvm-ci: deps install test-assets
	PYVMM_KVM_TIER=ci $(PY) -m pytest -q -s tests/nested

# Unit tests only: no /dev/kvm, no kernel, seconds.
test-fast: install
	$(PY) -m pytest -q tests/unit

lint: install
	$(PY) -m ruff check .

# Every benchmark beside its peer; all figures also land in build/bench.json.
BENCH_JSON := build/bench.json
bench: deps install test-assets
	@mkdir -p build && rm -f $(BENCH_JSON)
	@for b in bench/bench_*.py; do PYVMM_BENCH_JSON=$(BENCH_JSON) $(PY) $$b || exit 1; done
	@echo "all figures: $(BENCH_JSON)"

# Boot time on a real KVM, pyvmm beside QEMU, inside the same L1 (minutes).
bench-kvm: deps install test-assets
	$(PY) bench/nested_kvm.py

# kvm-unit-tests (x86), built from the shared tarball in ~/.cache/pyvmm-kut, on
# pyvmm beside QEMU, software CPU and KVM (tens of minutes; ARGS="--accel tcg
# emulator realmode" narrows it). Results in build/kvm-unit-tests.json.
kvm-unit-tests: deps install
	$(PY) -m tests.conformance.kut $(ARGS)

# The same comparison on a real KVM (QEMU -enable-kvm beside pyvmm --accel kvm)
# inside the nested tier's L1 (tests/conformance/nested.py); timeouts times 2
# there, half an hour. Results in build/kvm-unit-tests-l1.json; ARGS="--console vmexit_cpuid"
# shows L1's console and narrows it.
kvm-unit-tests-nested: deps install test-assets
	$(PY) -m tests.conformance.nested $(ARGS)

test-assets: install
	$(PY) -m tests.assets

# Long fuzzing runs from a new seed each time (a failure names its seed and
# case; PYVMM_FUZZ_SEED=S FUZZ_EXAMPLES=N make fuzz replays it).
fuzz: install
	@seed=$${PYVMM_FUZZ_SEED:-$$(date +%s)}; echo "fuzzing with PYVMM_FUZZ_SEED=$$seed, $(FUZZ_EXAMPLES) cases per test"; \
	PYVMM_FUZZ_SEED=$$seed PYVMM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -k fuzz tests/unit tests/fuzz

clean:
	rm -rf build .pytest_cache $(CFFI_PREBUILT) vmm/kvm/_exit_loop*.so devices/virtio/_blk_requests*.so devices/_uart_ports*.so
