"""team: expert aliases and the append-only event log

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

After adding a revision, add its id to KNOWN_REVISIONS in registry/db.py (a test checks it).

The event log is append-only in the database itself: on PostgreSQL a row trigger refuses UPDATE and
DELETE, a statement trigger refuses TRUNCATE, and an INSERT trigger stamps ``at`` (the server's
clock) and ``db_user`` (``session_user``), so a client can neither forge nor rewrite them; on
SQLite two triggers refuse UPDATE and DELETE. (A later batch migration of ``events`` on SQLite
recreates the table and must create these triggers again.)
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PG_FUNCTIONS = (
    """
    CREATE FUNCTION atmoe_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'the event log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    """
    CREATE FUNCTION atmoe_events_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.at := clock_timestamp();
        NEW.db_user := session_user;
        RETURN NEW;
    END
    $$
    """,
)
PG_TRIGGERS = (
    "CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events "
    "FOR EACH ROW EXECUTE FUNCTION atmoe_events_append_only()",
    "CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events "
    "FOR EACH STATEMENT EXECUTE FUNCTION atmoe_events_append_only()",
    "CREATE TRIGGER events_stamp BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION atmoe_events_stamp()",
)
SQLITE_TRIGGERS = tuple(
    f"CREATE TRIGGER events_no_{operation.lower()} BEFORE {operation} ON events "
    f"BEGIN SELECT RAISE(ABORT, 'the event log is append-only: {operation} refused'); END"
    for operation in ("UPDATE", "DELETE")
)


def upgrade() -> None:
    op.create_table(
        "expert_aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["expert_id"], ["experts.id"], name=op.f("fk_expert_aliases_expert_id_experts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_expert_aliases")),
        sa.UniqueConstraint("name", "alias", name=op.f("uq_expert_aliases_name_alias")),
    )
    op.create_index(op.f("ix_expert_aliases_expert_id"), "expert_aliases", ["expert_id"], unique=False)

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=True),
        sa.Column("db_user", sa.String(length=256), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=512), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_at"), "events", ["at"], unique=False)
    op.create_index(op.f("ix_events_action"), "events", ["action"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        for statement in (*PG_FUNCTIONS, *PG_TRIGGERS):
            op.execute(statement)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    # dropping the table drops its triggers (the row triggers do not fire on DROP)
    op.drop_index(op.f("ix_events_action"), table_name="events")
    op.drop_index(op.f("ix_events_at"), table_name="events")
    op.drop_table("events")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS atmoe_events_append_only()")
        op.execute("DROP FUNCTION IF EXISTS atmoe_events_stamp()")
    op.drop_index(op.f("ix_expert_aliases_expert_id"), table_name="expert_aliases")
    op.drop_table("expert_aliases")
