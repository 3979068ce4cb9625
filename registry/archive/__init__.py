"""Export and import of a catalog subset as one tar archive (``atmoe-reg export`` / ``import``).

An archive holds ``manifest.json`` (the rows, as JSON, and the sha256 and size of every other member)
followed by ``blobs/sha256/<digest>``, one member per blob. It may be gzip-compressed.

Import trusts nothing in the file and writes nothing to the catalog until all of it has passed:

1. member headers, read one by one (never ``extractall``): only regular files named ``manifest.json``
   or ``blobs/sha256/<64 hex>``; absolute paths, ``..`` components, links, devices, duplicates,
   more than ``max_members`` members or a member above ``max_member_size`` bytes are refused;
2. every blob is streamed into a private staging directory outside the catalog while it is hashed;
   its sha256 must equal its name and the manifest's entry;
3. the manifest is checked field by field; each expert's files are laid out in a staging directory
   and run through ``validate.validate_adapter`` (config, shapes, NaN/Inf), and their content digest
   must equal the expert's; router blobs must be safetensors files; compositions may only pin
   experts of the archive, with their digests.

Only then are the blobs stored (the store hashes them again) and the rows inserted in one
transaction: an expert whose name and content digest already exist is reused, new content under a
known name becomes that name's next version; a composition whose spec (re-computed with the
target's versions) already exists is reused, and so is a router with the same weights.
"""

from __future__ import annotations

from atmoe.registry.archive.exporting import ExportReport, export_archive
from atmoe.registry.archive.importing import ImportReport, import_archive
from atmoe.registry.archive.reading import check_member_header

__all__ = ["ExportReport", "ImportReport", "check_member_header", "export_archive", "import_archive"]
