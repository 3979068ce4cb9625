"""Where the registry lives: home directory, database URL and blob store.

Precedence: explicit argument, then environment (``ATMOE_HOME``, ``ATMOE_DB_URL``, ``ATMOE_STORE``),
then the defaults ``~/.atmoe``, ``sqlite:///HOME/registry.db`` and ``HOME/store``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "ATMOE_HOME"
ENV_DB_URL = "ATMOE_DB_URL"
ENV_STORE = "ATMOE_STORE"

DEFAULT_HOME = "~/.atmoe"
DB_FILENAME = "registry.db"
STORE_DIRNAME = "store"


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str
    store: Path

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


def resolve(
    home: str | os.PathLike[str] | None = None,
    db_url: str | None = None,
    store: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    env = os.environ if env is None else env
    home_path = _expand(home or env.get(ENV_HOME) or DEFAULT_HOME)
    url = db_url or env.get(ENV_DB_URL) or f"sqlite:///{home_path / DB_FILENAME}"
    store_path = _expand(store or env.get(ENV_STORE) or home_path / STORE_DIRNAME)
    return Settings(home=home_path, db_url=normalise_db_url(url), store=store_path)
