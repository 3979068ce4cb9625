"""compositions and routers: compositions, composition_experts, routers, router_aliases

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

After adding a revision, add its id to KNOWN_REVISIONS in registry/db.py (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "compositions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.String(length=512), nullable=True),
        sa.Column("base_revision", sa.String(length=256), nullable=True),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("n_groups", sa.Integer(), nullable=False),
        sa.Column("n_max", sa.Integer(), nullable=False),
        sa.Column("lam", sa.Float(), nullable=False),
        sa.Column("learn_lambda", sa.Boolean(), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=False),
        sa.Column("routing", sa.String(length=16), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("general_expert_id", sa.Integer(), nullable=True),
        sa.Column("spec_digest", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=True),
        sa.ForeignKeyConstraint(
            ["general_expert_id"],
            ["experts.id"],
            name=op.f("fk_compositions_general_expert_id_experts"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_compositions")),
        sa.UniqueConstraint("name", "spec_digest", name=op.f("uq_compositions_name_spec_digest")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_compositions_name_version")),
    )
    op.create_index(op.f("ix_compositions_general_expert_id"), "compositions", ["general_expert_id"], unique=False)

    op.create_table(
        "composition_experts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("composition_id", sa.Integer(), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("group_name", sa.String(length=64), nullable=False),
        sa.Column("group_index", sa.Integer(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["composition_id"],
            ["compositions.id"],
            name=op.f("fk_composition_experts_composition_id_compositions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["expert_id"], ["experts.id"], name=op.f("fk_composition_experts_expert_id_experts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_composition_experts")),
        sa.UniqueConstraint(
            "composition_id", "expert_id", name=op.f("uq_composition_experts_composition_id_expert_id")
        ),
        sa.UniqueConstraint(
            "composition_id",
            "group_name",
            "slot",
            name=op.f("uq_composition_experts_composition_id_group_name_slot"),
        ),
    )
    op.create_index(op.f("ix_composition_experts_expert_id"), "composition_experts", ["expert_id"], unique=False)

    op.create_table(
        "routers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("composition_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("blob_digest", sa.String(length=64), nullable=False),
        sa.Column("data_digest", sa.String(length=64), nullable=True),
        sa.Column("eval_data_digest", sa.String(length=64), nullable=True),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("library_versions", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["composition_id"],
            ["compositions.id"],
            name=op.f("fk_routers_composition_id_compositions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routers")),
        sa.UniqueConstraint("composition_id", "number", name=op.f("uq_routers_composition_id_number")),
    )
    op.create_index(op.f("ix_routers_blob_digest"), "routers", ["blob_digest"], unique=False)

    op.create_table(
        "router_aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("composition_name", sa.String(length=64), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("router_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["router_id"],
            ["routers.id"],
            name=op.f("fk_router_aliases_router_id_routers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_router_aliases")),
        sa.UniqueConstraint("composition_name", "alias", name=op.f("uq_router_aliases_composition_name_alias")),
    )
    op.create_index(op.f("ix_router_aliases_router_id"), "router_aliases", ["router_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_router_aliases_router_id"), table_name="router_aliases")
    op.drop_table("router_aliases")
    op.drop_index(op.f("ix_routers_blob_digest"), table_name="routers")
    op.drop_table("routers")
    op.drop_index(op.f("ix_composition_experts_expert_id"), table_name="composition_experts")
    op.drop_table("composition_experts")
    op.drop_index(op.f("ix_compositions_general_expert_id"), table_name="compositions")
    op.drop_table("compositions")
