"""Property test: random writes, zeroings, discards, flushes and reopens against a bytearray model."""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.image.open import create_image, open_image
from vmm.image.qcow2_check import check_qcow2
from vmm.image.qcow2_create import parse_qcow2_options

SIZE = 96 * 1024

layouts = st.sampled_from([
    ("cluster_size=512", False),
    ("cluster_size=4096", False),
    ("cluster_size=4096", True),
    ("cluster_size=1024,compat=0.10", True),
    ("cluster_size=2048,refcount_bits=2", False),
])

ranges = st.integers(0, SIZE - 1).flatmap(
    lambda start: st.tuples(st.just(start), st.integers(1, min(9000, SIZE - start))))

operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), ranges, st.integers(0, 255)),
        st.tuples(st.just("zero"), ranges),
        st.tuples(st.just("discard"), ranges),
        st.tuples(st.just("flush")),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("read"), ranges),
    ),
    max_size=40,
)


def cluster_bits_of(options: str) -> int:
    return parse_qcow2_options(options).cluster_size.bit_length() - 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts, ops=operations)
def test_image_behaves_like_a_bytearray(layout, ops):
    options, with_backing = layout
    cluster = 1 << cluster_bits_of(options)
    version2 = "compat=0.10" in options
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.qcow2")
        model = bytearray(SIZE)
        kwargs = {}
        if with_backing:
            base = os.urandom(SIZE - 5000)  # smaller than the overlay
            with open(os.path.join(tmp, "base.raw"), "wb") as f:
                f.write(base)
            model[: len(base)] = base
            kwargs = {"backing_file": "base.raw", "backing_format": "raw"}
        create_image(path, "qcow2", SIZE, options=parse_qcow2_options(options), **kwargs)
        image = open_image(path, readonly=False)
        try:
            for op in ops:
                kind = op[0]
                if kind == "write":
                    (start, length), value = op[1], op[2]
                    data = bytes([value]) * length
                    image.write(start, data)
                    model[start : start + length] = data
                elif kind == "zero":
                    start, length = op[1]
                    image.write_zeroes(start, length)
                    model[start : start + length] = bytes(length)
                elif kind == "discard":
                    start, length = op[1]
                    image.discard(start, length)
                    if not (version2 and with_backing):
                        # Whole clusters read as zeros afterwards; partial ones keep their data.
                        first = -(-start // cluster) * cluster
                        end = start + length
                        for c in range(first, end, cluster):
                            c_end = min(c + cluster, SIZE)
                            if c_end <= end:
                                model[c:c_end] = bytes(c_end - c)
                elif kind == "flush":
                    image.flush()
                elif kind == "reopen":
                    image.close()
                    image = open_image(path, readonly=False)
                else:
                    start, length = op[1]
                    assert image.read(start, length) == model[start : start + length]
            assert image.read(0, SIZE) == model
        finally:
            image.close()
        with open_image(path) as image:
            assert image.read(0, SIZE) == model
        with open_image(path, backing=False) as image:
            result = check_qcow2(image)
        assert (result.corruptions, result.leaks) == (0, 0), result.messages
