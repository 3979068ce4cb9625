"""registry core: groups, experts, expert_files

Revision ID: 0001
Revises:
Create Date: 2026-11-22

After adding a revision, add its id to KNOWN_REVISIONS in registry/db.py (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Seed data, frozen here on purpose: later changes to models.DEFAULT_GROUPS must not rewrite history.
DEFAULT_GROUPS = {
    "functional": "What the expert does (diagnosis, prescribing, ...)",
    "domain": "Domain knowledge (gastroenterology, cardiology, ...)",
    "style": "Answer style (rigorous, concise, ...)",
    "general": "General experts trained on all tasks' data",
}


def upgrade() -> None:
    groups = op.create_table(
        "groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_groups")),
        sa.UniqueConstraint("name", name=op.f("uq_groups_name")),
    )
    op.create_table(
        "experts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("domain", sa.String(length=64), nullable=True),
        sa.Column("style", sa.String(length=64), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("base_model", sa.String(length=512), nullable=True),
        sa.Column("base_revision", sa.String(length=256), nullable=True),
        sa.Column("peft_type", sa.String(length=32), nullable=False),
        sa.Column("r", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("use_rslora", sa.Boolean(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("module_ranks", sa.JSON(), nullable=False),
        sa.Column("rank_pattern", sa.JSON(), nullable=False),
        sa.Column("alpha_pattern", sa.JSON(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=True),
        sa.Column("source", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["group_id"], ["groups.id"], name=op.f("fk_experts_group_id_groups")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experts")),
        sa.UniqueConstraint("name", "digest", name=op.f("uq_experts_name_digest")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_experts_name_version")),
    )
    for column in ("base_model", "digest", "domain", "group_id", "style"):
        op.create_index(op.f(f"ix_experts_{column}"), "experts", [column], unique=False)

    op.create_table(
        "expert_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name=op.f("fk_expert_files_expert_id_experts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_expert_files")),
        sa.UniqueConstraint("expert_id", "path", name=op.f("uq_expert_files_expert_id_path")),
    )
    op.create_index(op.f("ix_expert_files_sha256"), "expert_files", ["sha256"], unique=False)

    now = datetime.now(timezone.utc)
    op.bulk_insert(
        groups,
        [{"name": name, "description": description, "created_at": now} for name, description in DEFAULT_GROUPS.items()],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_expert_files_sha256"), table_name="expert_files")
    op.drop_table("expert_files")
    for column in ("base_model", "digest", "domain", "group_id", "style"):
        op.drop_index(op.f(f"ix_experts_{column}"), table_name="experts")
    op.drop_table("experts")
    op.drop_table("groups")
