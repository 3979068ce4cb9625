"""Where the registry lives: home directory, database URL, blob store and the store's local cache.

Precedence: explicit argument, then environment (``ATMOE_HOME``, ``ATMOE_DB_URL``, ``ATMOE_STORE``,
``ATMOE_CACHE``), then the defaults ``~/.atmoe``, ``sqlite:///HOME/registry.db``, ``HOME/store`` and
``HOME/cache``. The store is a directory (or ``file://`` URL) or ``s3://BUCKET[/PREFIX]``; any other
``SCHEME://`` is refused rather than taken as a relative directory named ``SCHEME:``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from atmoe.errors import UsageError

ENV_HOME = "ATMOE_HOME"
ENV_DB_URL = "ATMOE_DB_URL"
ENV_STORE = "ATMOE_STORE"
ENV_CACHE = "ATMOE_CACHE"

DEFAULT_HOME = "~/.atmoe"
DB_FILENAME = "registry.db"
STORE_DIRNAME = "store"
CACHE_DIRNAME = "cache"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# S3 bucket names: 3-63 of lowercase letters, digits, dots and hyphens, starting and ending alphanumeric
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Location:
    """``s3://BUCKET/PREFIX``: ``prefix`` is empty or ends with ``/``."""

    bucket: str
    prefix: str = ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str
    store: Path | S3Location
    cache: Path | None = None  # where an object store's verified blobs are kept locally

    @property
    def is_remote_store(self) -> bool:
        return isinstance(self.store, S3Location)

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")


def _expand(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.expandvars(os.fspath(path))).expanduser().absolute()


def normalise_db_url(value: str) -> str:
    """A SQLAlchemy URL, or a plain file path taken as a SQLite database."""
    if "://" in value:
        return value
    return f"sqlite:///{_expand(value)}"


def parse_s3(text: str) -> S3Location:
    """``s3://BUCKET[/PREFIX]`` checked strictly (one-line ``UsageError``)."""
    parts = urlsplit(text)
    if parts.query or parts.fragment or parts.username or parts.port:
        raise UsageError(f"store {text!r}: an s3:// store is s3://BUCKET[/PREFIX], with no query, user or port")
    bucket = parts.hostname or ""
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(
            f"store {text!r}: {bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits, '.' and '-')"
        )
    segments = [unquote(segment) for segment in parts.path.split("/") if segment]
    for segment in segments:
        if segment in (".", "..") or any(ord(c) < 32 for c in segment):
            raise UsageError(f"store {text!r}: the prefix may not hold '.', '..' or control characters")
    return S3Location(bucket, "".join(segment + "/" for segment in segments))


def parse_store(value: str | os.PathLike[str]) -> Path | S3Location:
    """A store setting: a directory, ``file:///DIR``, or ``s3://BUCKET[/PREFIX]``."""
    text = os.fspath(value)
    scheme = _SCHEME.match(text)
    if scheme is None:
        return _expand(text)
    name = scheme.group(1).lower()
    if name == "s3":
        return parse_s3(text)
    if name == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"store {text!r}: a file:// store names a local directory (file:///DIR)")
        return _expand(unquote(parts.path))
    raise UsageError(
        f"store {text!r}: {name}:// stores are not served; give a directory, file:///DIR or s3://BUCKET[/PREFIX] "
        "(AWS S3, MinIO, Ceph, R2: the endpoint comes from AWS_ENDPOINT_URL)"
    )


def resolve(
    home: str | os.PathLike[str] | None = None,
    db_url: str | None = None,
    store: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    env = os.environ if env is None else env
    home_path = _expand(home or env.get(ENV_HOME) or DEFAULT_HOME)
    url = db_url or env.get(ENV_DB_URL) or f"sqlite:///{home_path / DB_FILENAME}"
    store_location = parse_store(store or env.get(ENV_STORE) or home_path / STORE_DIRNAME)
    cache = _expand(env.get(ENV_CACHE) or home_path / CACHE_DIRNAME)
    return Settings(home=home_path, db_url=normalise_db_url(url), store=store_location, cache=cache)
