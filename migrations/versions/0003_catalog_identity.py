"""catalog identity: one row with this catalog's id, recorded in its blob store too

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

After adding a revision, add its id to KNOWN_REVISIONS in registry/db.py (a test checks it).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "catalog_identity",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_catalog_identity")),
    )
    # every catalog, new or upgraded, gets its id here; its store adopts it on first open
    op.bulk_insert(table, [{"id": uuid.uuid4().hex, "created_at": datetime.now(timezone.utc)}])


def downgrade() -> None:
    op.drop_table("catalog_identity")
