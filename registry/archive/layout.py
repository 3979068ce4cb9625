"""What an archive holds and its limits: the format name and version, member names, default
bounds on members.
"""

from __future__ import annotations

import re

FORMAT = "atmoe-archive"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BLOB_PREFIX = "blobs/sha256/"
DEFAULT_MAX_MEMBERS = 10_000
DEFAULT_MAX_MEMBER_SIZE = 4 << 30  # 4 GiB
DEFAULT_MAX_TOTAL_SIZE = 64 << 30  # 64 GiB of members in all, uncompressed
MAX_MANIFEST_BYTES = 64 << 20
# JSON containers ({ and [) a manifest may open: each costs a Python object and a bomb of tiny
# objects (64 MiB of "{}") takes gigabytes once parsed; a real manifest has a few per expert file
MAX_MANIFEST_CONTAINERS = 2_000_000
CHUNK = 1 << 20
BLOB_MEMBER = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$")
