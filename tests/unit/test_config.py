import pytest

from vmm.config import parse_memory_size
from vmm.errors import PyvmmError


@pytest.mark.parametrize(("text", "size"), [("512", 512 << 20), ("512M", 512 << 20), ("512MiB", 512 << 20),
                                            ("2G", 2 << 30), ("64K", 64 << 10)])
def test_memory_sizes(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text", ["abc", "12Q", "-5M", ""])
def test_bad_memory_sizes(text):
    with pytest.raises(PyvmmError, match="--memory"):
        parse_memory_size(text)
