"""Boot tests: the real Debian kernel and busybox initramfs (tests/assets.py, `make test-assets`)."""

from tests.assets import linux_assets  # noqa: F401 - a fixture for every boot test
