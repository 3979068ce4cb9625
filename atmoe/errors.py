"""The toolkit's own exceptions.

Library code raises these; only ``atmoe.cli`` turns them into one-line ``click`` errors.
Every message is a single line that says what was wrong and, where there is one, what to do.
No module here imports torch, so registry-only commands stay fast.
"""

from __future__ import annotations


class AtmoeError(Exception):
    """Base class of every error the toolkit reports to a user as one line (exit code 1)."""


class UsageError(AtmoeError, ValueError):
    """A value the user typed is malformed (exit code 2 on the command line)."""


class InvalidName(UsageError):
    """A name that looks like a path, is empty, or uses characters outside [A-Za-z0-9._-]."""


class InvalidAdapter(AtmoeError, ValueError):
    """A directory or file that is not an acceptable PEFT LoRA adapter (safetensors only)."""


class PickleRefused(InvalidAdapter):
    """Adapter weights stored as a pickle (.bin/.pt/.pth/.ckpt): never loaded, refused."""


class NotFound(AtmoeError, KeyError):
    """Base of the lookups that found nothing; a ``KeyError`` whose message is not quoted."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else f"{type(self).__name__}: not found"


class ExpertNotFound(NotFound):
    """No expert matches a reference."""


class CompositionNotFound(NotFound):
    """No composition matches a reference."""


class RouterNotFound(NotFound):
    """No router (number or alias) matches a reference."""


class GroupNotFound(NotFound):
    """A group that the catalog does not know."""


class StoreMismatch(AtmoeError):
    """A blob store that belongs to another catalog (or a new database over a store full of blobs)."""


class StoreUnavailable(AtmoeError):
    """The blob store cannot be reached or refused a request (no bucket, no access, no network), after
    the bounded retries; nothing was committed."""


class GroupConflict(AtmoeError, ValueError):
    """A new version of an expert in another group than its earlier versions."""


class InvalidComposition(AtmoeError, ValueError):
    """A composition spec that cannot be built: empty group, duplicate expert, mixed base models..."""


class ChecksumMismatch(AtmoeError):
    """A blob whose bytes no longer hash to the digest it is stored under."""


class InUse(AtmoeError):
    """Something still references the object a user asked to remove."""


class SchemaMismatch(AtmoeError):
    """The database is at a schema revision this version of the tool does not know, or is behind."""


class InvalidArchive(AtmoeError, ValueError):
    """An import archive with absolute paths, '..', links, or too many or too large members."""


class DataError(AtmoeError, ValueError):
    """A malformed training or evaluation data line; the message names the file and line number."""


class RoutingError(AtmoeError, ValueError):
    """Forced routing weights that name unknown experts or are negative or not finite."""


class ModelLoadError(AtmoeError):
    """A base model or tokenizer that cannot be loaded from the reference given."""


class PermissionDenied(AtmoeError):
    """The database role may not do this (PostgreSQL roles: reader / writer / admin); exit code 1.

    Raised before anything is written (no blob, no row); the database refuses the same write on its
    own when the tool is bypassed.
    """


class SourceUnavailable(AtmoeError):
    """A Hub source (``hf://...``) that cannot be read now: not in the local cache while the Hub may
    not be asked, an unknown revision, no network, or a gated or private repository without access."""
