"""evaluations: stored scores of a router on a data file (atmoe-reg eval / evals)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

After adding a revision, add its id to KNOWN_REVISIONS in registry/db.py (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("router_id", sa.Integer(), nullable=False),
        sa.Column("data_digest", sa.String(length=64), nullable=False),
        sa.Column("examples", sa.Integer(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("library_versions", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=True),
        sa.ForeignKeyConstraint(
            ["router_id"], ["routers.id"], name=op.f("fk_evaluations_router_id_routers"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
    )
    op.create_index(op.f("ix_evaluations_router_id"), "evaluations", ["router_id"], unique=False)
    op.create_index(op.f("ix_evaluations_data_digest"), "evaluations", ["data_digest"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_evaluations_data_digest"), table_name="evaluations")
    op.drop_index(op.f("ix_evaluations_router_id"), table_name="evaluations")
    op.drop_table("evaluations")
