"""Alembic environment of the registry database.

The tool runs migrations in code (``atmoe.registry.db.upgrade``): it builds the Alembic ``Config``
itself and passes an open connection in ``config.attributes["connection"]``, so that the upgrade runs
on the engine the registry configured (SQLite pragmas, BEGIN IMMEDIATE). Run from the command line
(``alembic -c migrations/alembic.ini ...``) it connects to ``sqlalchemy.url`` instead.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

from atmoe.registry.models import Base
from atmoe.registry.search import alembic_include_name

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        compare_type=True,
        include_name=alembic_include_name,  # the search index is not in models.py
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
