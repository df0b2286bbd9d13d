"""The nested tier's L1 archive builder (tests/nested/l1_image.py), checked by unpacking with cpio."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from tests.assets import linux_assets, linux_module_tree  # noqa: F401 - fixtures
from tests.nested.l1_image import ASSETS, Tree, add_run_modules
from vmm.run.modules import guest_modules


@pytest.fixture
def unpack(tmp_path):
    if shutil.which("cpio") is None:
        pytest.skip("cpio is not installed: apt-get install cpio")

    def run(tree: Tree):
        archive = tmp_path / "out.cpio"
        with open(archive, "wb") as out:
            tree.write(out)
        root = tmp_path / "root"
        root.mkdir()
        with open(archive, "rb") as source:
            subprocess.run(["cpio", "-id", "--quiet"], stdin=source, cwd=root, check=True)
        return root

    return run


def test_host_symlinks_on_the_way_are_reproduced(tmp_path, unpack):
    real = tmp_path / "host" / "usr" / "lib"
    real.mkdir(parents=True)
    (real / "libx.so.1.2").write_bytes(b"\x7fELF library")
    (real / "libx.so.1").symlink_to("libx.so.1.2")
    (tmp_path / "host" / "lib").symlink_to("usr/lib")  # merged /usr, as on Debian
    tree = Tree()
    tree.host_file(str(tmp_path / "host" / "lib" / "libx.so.1"))
    root = unpack(tree)
    inside = root / str(tmp_path).lstrip("/") / "host"
    assert os.readlink(inside / "lib") == "usr/lib"
    assert os.readlink(inside / "usr" / "lib" / "libx.so.1") == "libx.so.1.2"
    assert (inside / "lib" / "libx.so.1").read_bytes() == b"\x7fELF library"
    assert tree.digest() != Tree().digest()


def test_python_files_get_a_pyc_that_imports_without_its_source_mtime(tmp_path, unpack):
    package = tmp_path / "src" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 6 * 7\n")
    (package / "notes.txt").write_text("kept as it is\n")
    tree = Tree()
    tree.host_tree(str(tmp_path / "src"), "/opt/site")
    root = unpack(tree)
    site = root / "opt" / "site"
    assert (site / "pkg" / "notes.txt").read_text() == "kept as it is\n"
    pyc = site / "pkg" / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc"
    flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
    assert flags == 0b01  # hash-based, unchecked: valid whatever mtime the archive gives the source
    # The source changes and its mtime is reset: the unchecked .pyc is still what runs.
    (site / "pkg" / "__init__.py").write_text("VALUE = 0\n")
    os.utime(site / "pkg" / "__init__.py", (0, 0))
    spec = importlib.util.spec_from_file_location("pkg", site / "pkg" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.VALUE == 42


def test_the_module_subset_holds_what_pyvmm_run_loads(linux_module_tree, unpack):  # noqa: F811
    tree = Tree()
    add_run_modules(tree, linux_module_tree)
    inside = unpack(tree) / ASSETS.lstrip("/") / "modules" / linux_module_tree.name
    assert guest_modules(inside, terminal=True) == guest_modules(linux_module_tree, terminal=True)
    assert len(list(inside.rglob("*.ko"))) == len(guest_modules(linux_module_tree, terminal=True))
