"""`info` and `snapshot -l`: what `qemu-img info` shows, with its field names."""

from __future__ import annotations

import os
import time

from vmm.image.base import BlockDevice
from vmm.image.qcow2 import Qcow2Image
from vmm.image.qcow2_format import COMPRESSION_NAMES, Snapshot
from vmm.image.sizes import format_size


def image_info(image: BlockDevice) -> dict:
    """The `qemu-img info --output=json` dictionary for one image (not its backing chain)."""
    # Keys in the order qemu-img prints them, so the two outputs can be diffed.
    info: dict = {}
    if isinstance(image, Qcow2Image) and image.header.backing_file and image.header.backing_format:
        info["backing-filename-format"] = image.header.backing_format
    if isinstance(image, Qcow2Image) and image.snapshots:
        info["snapshots"] = [_snapshot_json(s) for s in image.snapshots]
    info["virtual-size"] = image.size
    info["filename"] = image.filename
    if isinstance(image, Qcow2Image):
        info["cluster-size"] = image.cluster_size
    info["format"] = image.format_name
    info["actual-size"] = os.stat(image.filename).st_blocks * 512
    if isinstance(image, Qcow2Image):
        hdr = image.header
        data: dict = {"compat": "1.1" if hdr.version >= 3 else "0.10",
                      "compression-type": COMPRESSION_NAMES[hdr.compression_type]}
        if hdr.version >= 3:
            data["lazy-refcounts"] = hdr.lazy_refcounts
        data["refcount-bits"] = 1 << hdr.refcount_order
        if hdr.version >= 3:
            data["corrupt"] = hdr.corrupt
            data["extended-l2"] = False
        info["format-specific"] = {"type": "qcow2", "data": data}
        if hdr.backing_file:
            info["full-backing-filename"] = _full_backing_name(image.filename, hdr.backing_file)
            info["backing-filename"] = hdr.backing_file
    info["dirty-flag"] = isinstance(image, Qcow2Image) and image.header.dirty
    return info


def _full_backing_name(filename: str, backing: str) -> str:
    if os.path.isabs(backing):
        return backing
    directory = os.path.dirname(filename)
    return os.path.join(directory, backing) if directory else backing


def _snapshot_json(snap: Snapshot) -> dict:
    out = {}
    if snap.icount is not None:
        out["icount"] = snap.icount
    out.update({
        "vm-clock-nsec": snap.vm_clock_nsec % 1_000_000_000,
        "name": snap.name,
        "date-sec": snap.date_sec,
        "date-nsec": snap.date_nsec,
        "vm-clock-sec": snap.vm_clock_nsec // 1_000_000_000,
        "id": snap.id,
        "vm-state-size": snap.vm_state_size,
    })
    return out


def format_info_human(info: dict) -> str:
    lines = [f"image: {info['filename']}",
             f"file format: {info['format']}",
             f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {format_size(info['actual-size'])}"]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        name = info["backing-filename"]
        full = info["full-backing-filename"]
        lines.append(f"backing file: {name}" + (f" (actual path: {full})" if full != name else ""))
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.extend(snapshot_table(info["snapshots"]))
    specific = info.get("format-specific")
    if specific:
        lines.append("Format specific information:")
        for key, value in specific["data"].items():
            shown = str(value).lower() if isinstance(value, bool) else value
            lines.append(f"    {key.replace('-', ' ')}: {shown}")
    return "\n".join(lines)


def snapshot_table(snapshots: list[dict]) -> list[str]:
    """Rows as `qemu-img snapshot -l` prints them."""
    rows = [f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for snap in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["date-sec"]))
        secs = snap["vm-clock-sec"]
        clock = (f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
                 f"{snap['vm-clock-nsec'] // 1_000_000:03d}")
        icount = str(snap["icount"]) if "icount" in snap else ""
        rows.append(f"{snap['id']:<9} {snap['name']:<16} {format_size(snap['vm-state-size']):>8}"
                    f"{date:>20}{clock:>13}{icount:>11}")
    return rows
