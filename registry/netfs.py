"""Is a path on a network filesystem? SQLite's locking is unreliable there, so a catalog on one gets
a warning that points to PostgreSQL.

Two independent readings, either of which decides: the ``statfs`` magic number of the filesystem
(Linux, through libc), and the fstype of the mount holding the path in ``/proc/self/mountinfo``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

# statfs f_type magic numbers of network (or possibly network) filesystems
NETWORK_FS_MAGIC: dict[int, str] = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x01021997: "9p",
    0x5346414F: "afs",
    0x6B414653: "afs",
    0x00C36400: "ceph",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x19830326: "beegfs",
    0x73757245: "coda",
    0xAAD7AAEA: "panfs",
    0x013111A8: "ibrix",
}
# fstype names in /proc/self/mountinfo
NETWORK_FS_TYPES = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs",
        "lustre", "gpfs", "beegfs", "coda", "ncpfs", "davfs", "fuse.sshfs", "fuse.s3fs",
        "fuse.rclone", "fuse.gcsfuse", "fuse.glusterfs", "fuse.juicefs", "fuse.davfs2",
        "fuse.goofys", "fuse.mountpoint-s3", "fuse.blobfuse", "fuse.blobfuse2", "fuse.cephfs",
        "fuse.ceph-fuse", "fuse.lizardfs", "fuse.moosefs", "fuse.seaweedfs", "fuse.sshfs2",
    }
)  # fmt: skip


# -- network filesystem detection --------------------------------------------------------------


def statfs_magic(path: str | os.PathLike[str]) -> int | None:
    """The statfs ``f_type`` of ``path`` (Linux), or None when it cannot be read."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
        if libc.statfs(os.fsencode(os.fspath(path)), buffer) != 0:
            return None
        # f_type is the first member, a C long
        value = ctypes.c_long.from_buffer(buffer).value
        return value & 0xFFFFFFFF
    except (OSError, AttributeError, ValueError):
        return None


def _unescape_mount(field: str) -> str:
    # the kernel writes space, tab, newline and backslash in mount points as octal escapes
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mountinfo_fstype(path: str | os.PathLike[str], mountinfo: str | None = None) -> str | None:
    """The fstype of the longest mount point containing ``path``, from /proc/self/mountinfo."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < 5 or sep + 1 >= len(fields):
            continue
        mount_point = _unescape_mount(fields[4])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), fields[sep + 1])
    return best[1] if best else None


def network_filesystem(
    path: str | os.PathLike[str],
    *,
    magic: Callable[[str], int | None] = statfs_magic,
    fstype: Callable[[str], str | None] = mountinfo_fstype,
) -> str | None:
    """Name of the network filesystem holding ``path`` (or its nearest existing parent), else None.

    FUSE is ambiguous (sshfs is remote, fuse-overlayfs is local): the mount table decides where it
    names the FUSE subtype; without one, FUSE counts as possibly remote.
    """
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    kind = fstype(str(probe))
    if kind is not None and kind in NETWORK_FS_TYPES:
        return kind
    number = magic(str(probe))
    name = NETWORK_FS_MAGIC.get(number) if number is not None else None
    if name == "fuse" and kind is not None:
        return None  # a FUSE filesystem the mount table names, and not a known remote one
    return name


_warned: set[str] = set()


def warn_network_filesystem(
    db_path: Path,
    warn: Callable[[str], None],
    detect: Callable[[Path], str | None] | None = None,
) -> str | None:
    """Warn once per process and path when a SQLite database lies on a network filesystem."""
    kind = (detect or network_filesystem)(db_path)
    if kind is None or str(db_path) in _warned:
        return kind
    _warned.add(str(db_path))
    warn(
        f"the SQLite database {db_path} is on a network filesystem ({kind}); SQLite locking is "
        "unreliable there: for a shared catalog use PostgreSQL (--db postgresql+psycopg://...)"
    )
    return kind


def default_warn(message: str) -> None:
    print(f"Warning: {message}", file=sys.stderr)
