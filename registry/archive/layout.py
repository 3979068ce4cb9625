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
MAX_MANIFEST_BYTES = 256 << 20
CHUNK = 1 << 20
BLOB_MEMBER = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$")
